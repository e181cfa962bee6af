//! Chunk arithmetic: every image is cut into 4 KiB chunks.

/// The unit of identity for memory and disk alike.
pub const CHUNK_SIZE: usize = 4096;
/// `CHUNK_SIZE` as u64.
pub const CHUNK: u64 = CHUNK_SIZE as u64;

/// Number of chunks covering `size` bytes (the last may be short).
pub fn chunk_count(size: u64) -> u64 {
    size.div_ceil(CHUNK)
}

/// Length in bytes of chunk `index` of an image of `size` bytes (0 past the end).
pub fn chunk_len(size: u64, index: u64) -> usize {
    let start = index.saturating_mul(CHUNK);
    if start >= size {
        0
    } else {
        (size - start).min(CHUNK) as usize
    }
}

/// True when every byte is zero. Used on every page when the VMM saves
/// memory and on every chunk when diffing: 64-byte blocks are OR-folded
/// without branches (vectorised), and the scan stops at the first block
/// that is not zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    let mut blocks = bytes.chunks_exact(64);
    blocks.by_ref().all(|b| {
        b.chunks_exact(16).fold(0u128, |a, w| {
            a | u128::from_ne_bytes(w.try_into().unwrap_or([1; 16]))
        }) == 0
    }) && blocks.remainder().iter().all(|&b| b == 0)
}

/// Fast non-cryptographic hash used to find candidate matches; every match
/// is confirmed byte for byte before it is used.
pub fn fingerprint(bytes: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_lengths() {
        assert_eq!(chunk_count(0), 0);
        assert_eq!(chunk_count(1), 1);
        assert_eq!(chunk_count(4096), 1);
        assert_eq!(chunk_count(4097), 2);
        assert_eq!(chunk_len(4097, 0), 4096);
        assert_eq!(chunk_len(4097, 1), 1);
        assert_eq!(chunk_len(4097, 2), 0);
    }

    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; 4099];
        assert!(is_zero(&v));
        for i in [0, 7, 8, 4095, 4098] {
            v[i] = 1;
            assert!(!is_zero(&v[..]), "byte {i}");
            v[i] = 0;
        }
        assert!(is_zero(&v[1..]));
        // Every length around the 64-byte blocks and 16-byte words, every
        // position of the one non-zero byte, at every alignment.
        let mut buf = vec![0u8; 300];
        for start in 0..17 {
            for len in 0..=200 {
                let s = &mut buf[start..start + len];
                assert!(is_zero(s), "start {start} len {len}");
                for i in 0..len {
                    s[i] = 0x80;
                    assert!(!is_zero(s), "start {start} len {len} byte {i}");
                    s[i] = 0;
                }
            }
        }
    }
}
