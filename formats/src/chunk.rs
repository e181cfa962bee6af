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

/// True when every byte is zero (vectorises well).
pub fn is_zero(bytes: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle part of the slice.
        unsafe { bytes.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0)
        && suffix.iter().all(|&b| b == 0)
        && words
            .chunks(8)
            .all(|w| w.iter().fold(0, |a, &x| a | x) == 0)
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
    }
}
