//! Block hashes of guest memory (SUMS): what the receiver of a hypervisor
//! stream holds is checked against the source's memory before COMMIT, and
//! blocks that differ are sent again.

use std::fs::File;

use rayon::prelude::*;

use crate::protocol::{SUM_BLOCK, SUM_LEN};

/// Blocks of [`SUM_BLOCK`] bytes in `size` bytes of memory.
pub fn blocks(size: u64) -> u64 {
    size.div_ceil(SUM_BLOCK)
}

/// The hash of one block: XXH3-128 (little-endian). Not a cryptographic
/// hash, on purpose: it compares two copies of the same guest's memory,
/// both reached through the authenticated channel, to catch pages the
/// hypervisor failed to send, and it runs while the guest is paused
/// (docs/MIGRATION.md, "QEMU guests": why not BLAKE3).
pub fn sum(b: &[u8]) -> [u8; SUM_LEN] {
    xxhash_rust::xxh3::xxh3_128(b).to_le_bytes()
}

/// The hash of `len` zero bytes (a block in a hole).
pub fn zero_sum(len: usize) -> [u8; SUM_LEN] {
    static FULL: std::sync::OnceLock<[u8; SUM_LEN]> = std::sync::OnceLock::new();
    if len == SUM_BLOCK as usize {
        *FULL.get_or_init(|| sum(&vec![0u8; SUM_BLOCK as usize]))
    } else {
        sum(&vec![0u8; len])
    }
}

/// The hashes of every block of the first `size` bytes of `f` (read in
/// parallel; bytes past the end of the file count as zeros). Only blocks
/// that hold data are read: a block wholly in a hole hashes as zeros
/// without a read (a received memory file is sparse where the guest's
/// pages are zero).
pub fn file_sums(f: &File, size: u64) -> std::io::Result<Vec<[u8; SUM_LEN]>> {
    let n = blocks(size) as usize;
    let mut data = vec![false; n];
    for (start, end) in kimberley_formats::sparse::data_extents(f, size)? {
        let (first, last) = (start / SUM_BLOCK, end.div_ceil(SUM_BLOCK));
        for d in &mut data[(first as usize).min(n)..(last as usize).min(n)] {
            *d = true;
        }
    }
    (0..blocks(size))
        .into_par_iter()
        .map_init(
            || vec![0u8; SUM_BLOCK as usize],
            |buf, i| {
                let off = i * SUM_BLOCK;
                let len = (size - off).min(SUM_BLOCK) as usize;
                if !data[i as usize] {
                    return Ok(zero_sum(len));
                }
                let b = &mut buf[..len];
                kimberley_formats::fsutil::read_at_zero_padded(f, b, off, u64::MAX)?;
                Ok(sum(b))
            },
        )
        .collect()
}

/// Indices of the 4 KiB pages of the blocks where `ours` and `theirs`
/// differ (a block missing from `theirs` differs), within `size` bytes.
pub fn differing_pages(ours: &[[u8; SUM_LEN]], theirs: &[[u8; SUM_LEN]], size: u64) -> Vec<u64> {
    let per = SUM_BLOCK / crate::protocol::CHUNK;
    let pages = size.div_ceil(crate::protocol::CHUNK);
    let mut out = Vec::new();
    for (i, h) in ours.iter().enumerate() {
        if theirs.get(i) != Some(h) {
            let first = i as u64 * per;
            out.extend(first..(first + per).min(pages));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    #[test]
    fn differing_blocks_give_their_pages() {
        let mut f = tempfile::tempfile().unwrap();
        let size = 3 * SUM_BLOCK + 4096;
        f.write_all(&vec![7u8; size as usize]).unwrap();
        let ours = file_sums(&f, size).unwrap();
        assert_eq!(ours.len(), 4);
        let mut theirs = ours.clone();
        assert!(differing_pages(&ours, &theirs, size).is_empty());
        theirs[1] = [0; SUM_LEN];
        theirs.pop();
        let per = SUM_BLOCK / 4096;
        let want: Vec<u64> = (per..2 * per).chain([3 * per]).collect();
        assert_eq!(differing_pages(&ours, &theirs, size), want);
        // A changed byte changes its block's hash only.
        f.write_all_at(&[8], SUM_BLOCK + 5).unwrap();
        let again = file_sums(&f, size).unwrap();
        assert_eq!(
            (0..4).filter(|&i| again[i] != ours[i]).collect::<Vec<_>>(),
            vec![1]
        );
    }

    #[test]
    fn holes_hash_as_the_zeros_they_read_as() {
        let f = tempfile::tempfile().unwrap();
        // Data in block 2 only (straddling into block 3), a hole around
        // it, and a size past the file's end.
        let size = 6 * SUM_BLOCK + 100;
        f.write_all_at(&[9u8; 4096], 3 * SUM_BLOCK - 2048).unwrap();
        let got = file_sums(&f, size).unwrap();
        let mut plain = vec![0u8; size as usize];
        plain[(3 * SUM_BLOCK - 2048) as usize..][..4096].fill(9);
        let want: Vec<_> = plain.chunks(SUM_BLOCK as usize).map(sum).collect();
        assert_eq!(got, want);
        assert_eq!(got[0], zero_sum(SUM_BLOCK as usize));
        assert_eq!(got[6], sum(&[0u8; 100]));
        assert_ne!(got[2], got[0]);
        assert_ne!(got[3], got[0]);
    }
}
