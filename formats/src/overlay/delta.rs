//! In-place chunk deltas: a list of (offset, length, bytes) patches against
//! the base chunk at the same position.

use crate::le::Reader;

/// A gap shorter than this between two changed runs is absorbed into one
/// patch (a new patch costs 4 bytes of header).
const MERGE_GAP: usize = 8;

/// Encodes the patches turning `base` into `new` (same length), or `None`
/// when the encoding would not be smaller than `limit` bytes.
pub fn encode(base: &[u8], new: &[u8], limit: usize) -> Option<Vec<u8>> {
    debug_assert_eq!(base.len(), new.len());
    let n = new.len();
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut i = 0;
    while i < n {
        // Skip equal 8-byte words quickly.
        if i + 8 <= n && base[i..i + 8] == new[i..i + 8] {
            i += 8;
            continue;
        }
        if base[i] == new[i] {
            i += 1;
            continue;
        }
        let start = i;
        while i < n && base[i] != new[i] {
            i += 1;
        }
        match runs.last_mut() {
            Some((_, end)) if start - *end < MERGE_GAP => *end = i,
            _ => runs.push((start, i)),
        }
    }
    let size = 2 + runs.iter().map(|(a, b)| 4 + b - a).sum::<usize>();
    if size >= limit || runs.len() > u16::MAX as usize {
        return None;
    }
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(runs.len() as u16).to_le_bytes());
    for (a, b) in runs {
        out.extend_from_slice(&(a as u16).to_le_bytes());
        out.extend_from_slice(&((b - a) as u16).to_le_bytes());
        out.extend_from_slice(&new[a..b]);
    }
    Some(out)
}

/// Why a delta does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad delta: {0}")]
pub struct DeltaError(pub &'static str);

/// Checks a delta against a chunk of `len` bytes; returns its encoded size.
/// `bytes` may continue past the delta.
pub fn validate(bytes: &[u8], len: usize) -> Result<usize, DeltaError> {
    let truncated = |_| DeltaError("truncated");
    let mut c = Reader::new(bytes, "delta");
    let n = c.u16().map_err(truncated)?;
    if n == 0 {
        return Err(DeltaError("no patches"));
    }
    let mut prev_end = 0usize;
    for k in 0..n {
        let off = usize::from(c.u16().map_err(truncated)?);
        let l = usize::from(c.u16().map_err(truncated)?);
        if l == 0 || (k > 0 && off < prev_end) || off + l > len {
            return Err(DeltaError("patch out of order or out of range"));
        }
        c.take(l).map_err(truncated)?;
        prev_end = off + l;
    }
    Ok(bytes.len() - c.remaining())
}

/// Applies a validated delta to `chunk` in place.
pub fn apply(bytes: &[u8], chunk: &mut [u8]) {
    let n = u16::from_le_bytes([bytes[0], bytes[1]]) as usize;
    let mut p = 2;
    for _ in 0..n {
        let off = u16::from_le_bytes([bytes[p], bytes[p + 1]]) as usize;
        let l = u16::from_le_bytes([bytes[p + 2], bytes[p + 3]]) as usize;
        p += 4;
        chunk[off..off + l].copy_from_slice(&bytes[p..p + l]);
        p += l;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_small_changes() {
        let base: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let mut new = base.clone();
        new[0] ^= 1;
        new[5] ^= 1; // merged with the first
        new[1000..1010].fill(0xAA);
        new[4095] = 0;
        let d = encode(&base, &new, 4096).unwrap();
        assert_eq!(validate(&d, 4096).unwrap(), d.len());
        let mut out = base.clone();
        apply(&d, &mut out);
        assert_eq!(out, new);
        assert!(d.len() < 40, "{}", d.len());
    }

    #[test]
    fn refuses_when_not_smaller() {
        let base = vec![0u8; 4096];
        let new = vec![1u8; 4096];
        assert!(encode(&base, &new, 4096).is_none());
    }

    #[test]
    fn validate_refuses_bad() {
        assert!(validate(&[0, 0], 4096).is_err());
        assert!(validate(&[1, 0, 0, 16, 1, 0, 9], 4096).is_err()); // off 4096
        assert!(validate(&[1, 0, 0, 0, 2, 0, 9], 4096).is_err()); // truncated
    }
}
