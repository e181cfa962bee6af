//! CHUNKS message bodies: a batch of 4 KiB memory pages or disk blocks,
//! zero chunks as a flag, the rest literal, the whole body one zstd frame.
//! Pure encode and decode.

use kimberley_formats::le::{Reader, Writer};

use crate::protocol::{ProtocolError, CHUNK as CHUNK_U64};

/// Chunk size (memory pages and disk blocks alike).
pub const CHUNK: usize = CHUNK_U64 as usize;
/// Chunks per CHUNKS message at most.
pub const BATCH: usize = 256;
/// Entry kind: literal 4 KiB follow in the data area.
pub const KIND_DATA: u64 = 0;
/// Entry kind: the chunk is all zero.
pub const KIND_ZERO: u64 = 1;
/// Entry kind: the chunk of a shared disk changed in place (no data: the
/// receiver reads it from the shared file).
pub const KIND_SHARED: u64 = 2;
/// Largest chunk index (56 bits).
pub const MAX_INDEX: u64 = (1 << 56) - 1;
/// Largest decompressed body.
pub const MAX_PLAIN: usize = 8 + BATCH * 8 + BATCH * CHUNK;
/// zstd level for chunks.
pub const LEVEL: i32 = 1;

/// Builds and compresses a body. `chunks` are (index, Some(bytes)) for
/// data and (index, None) for zero; at most [`BATCH`] of them.
pub fn encode(target: u32, chunks: &[(u64, Option<&[u8]>)]) -> Vec<u8> {
    assert!(!chunks.is_empty() && chunks.len() <= BATCH, "batch size");
    let data = chunks.iter().filter(|c| c.1.is_some()).count();
    let mut w = Writer::with_capacity(8 + chunks.len() * 8 + data * CHUNK);
    w.u32(target);
    w.u32(chunks.len() as u32);
    for (i, d) in chunks {
        let kind = if d.is_some() { KIND_DATA } else { KIND_ZERO };
        w.u64(i | kind << 56);
    }
    for (_, d) in chunks {
        if let Some(d) = d {
            assert_eq!(d.len(), CHUNK, "chunk size");
            w.raw(d);
        }
    }
    zstd::bulk::compress(&w.into_inner(), LEVEL).expect("compressing to memory")
}

/// Builds a body of "changed in place" entries for a shared disk.
pub fn encode_shared(target: u32, indices: &[u64]) -> Vec<u8> {
    assert!(!indices.is_empty() && indices.len() <= BATCH, "batch size");
    let mut w = Writer::with_capacity(8 + indices.len() * 8);
    w.u32(target);
    w.u32(indices.len() as u32);
    for i in indices {
        w.u64(i | KIND_SHARED << 56);
    }
    zstd::bulk::compress(&w.into_inner(), LEVEL).expect("compressing to memory")
}

/// One chunk of a decoded body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Literal bytes: this range of [`Decoded::plain`].
    Data(std::ops::Range<usize>),
    /// All zero.
    Zero,
    /// Changed in place on a shared disk.
    Shared,
}

/// A decoded body.
#[derive(Debug)]
pub struct Decoded {
    /// 0 = memory, 1 + i = disk i.
    pub target: u32,
    /// (chunk index, what it holds).
    pub entries: Vec<(u64, Entry)>,
    /// The plaintext the ranges point into.
    pub plain: Vec<u8>,
}

/// Decompresses (at most [`MAX_PLAIN`] bytes) and parses a body, checking
/// every field.
pub fn decode(body: &[u8]) -> Result<Decoded, ProtocolError> {
    let plain = zstd::bulk::decompress(body, MAX_PLAIN)
        .map_err(|e| ProtocolError::Invalid(format!("CHUNKS does not decompress: {e}")))?;
    let mut r = Reader::new(&plain, "CHUNKS");
    let target = r.u32()?;
    let n = r.u32()? as usize;
    if n == 0 || n > BATCH {
        return Err(ProtocolError::Invalid(format!("CHUNKS with {n} entries")));
    }
    let mut entries = Vec::with_capacity(n);
    let mut data_off = 8 + n * 8;
    for _ in 0..n {
        let e = r.u64()?;
        let (idx, kind) = (e & MAX_INDEX, e >> 56);
        match kind {
            KIND_DATA => {
                entries.push((idx, Entry::Data(data_off..data_off + CHUNK)));
                data_off += CHUNK;
            }
            KIND_ZERO => entries.push((idx, Entry::Zero)),
            KIND_SHARED => entries.push((idx, Entry::Shared)),
            k => return Err(ProtocolError::Invalid(format!("chunk kind {k}"))),
        }
    }
    if data_off != plain.len() {
        return Err(ProtocolError::Invalid(
            "CHUNKS data length does not match its entries".into(),
        ));
    }
    Ok(Decoded {
        target,
        entries,
        plain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_refusals() {
        let a = vec![7u8; CHUNK];
        let body = encode(2, &[(5, Some(&a)), (9, None)]);
        let d = decode(&body).unwrap();
        assert_eq!(d.target, 2);
        assert_eq!(d.entries.len(), 2);
        assert_eq!(d.entries[0].0, 5);
        let Entry::Data(r) = d.entries[0].1.clone() else {
            panic!("data expected")
        };
        assert_eq!(&d.plain[r], &a[..]);
        assert_eq!(d.entries[1], (9, Entry::Zero));
        let d = decode(&encode_shared(1, &[3, 4])).unwrap();
        assert_eq!(d.entries, vec![(3, Entry::Shared), (4, Entry::Shared)]);
        // Not zstd; a data entry without its bytes; an unknown kind.
        assert!(decode(b"nope").is_err());
        let mut p = Writer::new();
        p.u32(0);
        p.u32(1);
        p.u64(0);
        assert!(decode(&zstd::bulk::compress(&p.into_inner(), 1).unwrap()).is_err());
        let mut p = Writer::new();
        p.u32(0);
        p.u32(1);
        p.u64(3 << 56);
        assert!(decode(&zstd::bulk::compress(&p.into_inner(), 1).unwrap()).is_err());
        let mut p = Writer::new();
        p.u32(0);
        p.u32(0);
        assert!(decode(&zstd::bulk::compress(&p.into_inner(), 1).unwrap()).is_err());
    }
}
