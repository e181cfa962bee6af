//! CHUNKS message bodies: a batch of 4 KiB memory pages or disk blocks,
//! zero chunks as a flag, the rest literal, the whole body one zstd frame.

use anyhow::{bail, Result};

use crate::wire::Cursor;

/// Chunk size (memory pages and disk blocks alike).
pub const CHUNK: usize = 4096;
/// Chunks per CHUNKS message at most.
pub const BATCH: usize = 256;
/// Entry kind: literal 4 KiB follow in the data area.
pub const KIND_DATA: u64 = 0;
/// Entry kind: the chunk is all zero.
pub const KIND_ZERO: u64 = 1;
/// Largest decompressed body.
pub const MAX_PLAIN: usize = 8 + BATCH * 8 + BATCH * CHUNK;
/// zstd level for chunks.
pub const LEVEL: i32 = 1;

/// True if `b` is all zero.
pub fn is_zero(b: &[u8]) -> bool {
    let (words, rest) = b.as_chunks::<16>();
    words.iter().fold(0u128, |a, w| a | u128::from_ne_bytes(*w)) == 0
        && rest.iter().all(|&x| x == 0)
}

/// Builds and compresses a body. `chunks` are (index, Some(bytes)) for
/// data and (index, None) for zero.
pub fn encode(target: u32, chunks: &[(u64, Option<&[u8]>)]) -> Vec<u8> {
    let n = chunks.len();
    let data = chunks.iter().filter(|c| c.1.is_some()).count();
    let mut plain = Vec::with_capacity(8 + n * 8 + data * CHUNK);
    plain.extend_from_slice(&target.to_le_bytes());
    plain.extend_from_slice(&(n as u32).to_le_bytes());
    for (i, d) in chunks {
        let kind = if d.is_some() { KIND_DATA } else { KIND_ZERO };
        plain.extend_from_slice(&(i | kind << 56).to_le_bytes());
    }
    for (_, d) in chunks {
        if let Some(d) = d {
            plain.extend_from_slice(d);
        }
    }
    zstd::bulk::compress(&plain, LEVEL).expect("compressing to memory")
}

/// A decoded body.
pub struct Decoded {
    /// 0 = memory, 1 + i = disk i.
    pub target: u32,
    /// (chunk index, literal bytes or None for zero).
    pub entries: Vec<(u64, Option<std::ops::Range<usize>>)>,
    /// The plaintext the ranges point into.
    pub plain: Vec<u8>,
}

/// Decompresses and parses a body (every field checked).
pub fn decode(body: &[u8]) -> Result<Decoded> {
    let plain = zstd::bulk::decompress(body, MAX_PLAIN)
        .map_err(|e| anyhow::anyhow!("protocol error: CHUNKS does not decompress: {e}"))?;
    let mut c = Cursor::new(&plain, "CHUNKS");
    let target = c.u32()?;
    let n = c.u32()? as usize;
    if n == 0 || n > BATCH {
        bail!("protocol error: CHUNKS with {n} entries");
    }
    let mut entries = Vec::with_capacity(n);
    let mut data_off = 8 + n * 8;
    for _ in 0..n {
        let e = c.u64()?;
        let (idx, kind) = (e & ((1 << 56) - 1), e >> 56);
        match kind {
            KIND_DATA => {
                entries.push((idx, Some(data_off..data_off + CHUNK)));
                data_off += CHUNK;
            }
            KIND_ZERO => entries.push((idx, None)),
            k => bail!("protocol error: chunk kind {k}"),
        }
    }
    if data_off != plain.len() {
        bail!("protocol error: CHUNKS data length does not match its entries");
    }
    Ok(Decoded {
        target,
        entries,
        plain,
    })
}
