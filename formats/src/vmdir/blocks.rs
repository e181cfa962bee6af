//! `memory.blocks` (FORMAT.md section 5.8): an optional cache of the memory
//! component's block hashes beside it, encoded and checked without I/O
//! here, read and written through the VMDIR types.

use crate::digest::{block_count, combine, Digest};

/// The file's name in a VMDIR.
pub const BLOCKS_FILE: &str = "memory.blocks";

/// Its first 8 bytes.
pub const MAGIC: &[u8; 8] = b"KIMBLKH1";

/// Bytes before the hashes: the magic and le64(component size).
pub const HEADER_LEN: usize = 16;

/// The file for a memory component of `size` bytes whose 1 MiB block
/// hashes are `hashes` (FORMAT.md section 3), in order.
pub fn encode(size: u64, hashes: &[Digest]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER_LEN + 32 * hashes.len());
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&size.to_le_bytes());
    for h in hashes {
        v.extend_from_slice(h);
    }
    v
}

/// The largest file a reader reads for a component of `size` bytes.
pub fn expected_len(size: u64) -> u64 {
    HEADER_LEN as u64 + 32 * block_count(size)
}

/// The block hashes in `bytes` if they are those of a memory component of
/// `size` bytes with component digest `digest`: the magic, the size, the
/// length and the digest they combine to must all match (FORMAT.md section
/// 5.8); None otherwise (the cache is then ignored).
pub fn decode(bytes: &[u8], size: u64, digest: &Digest) -> Option<Vec<Digest>> {
    if bytes.len() as u64 != expected_len(size) {
        return None;
    }
    let (head, body) = bytes.split_at(HEADER_LEN);
    if &head[..8] != MAGIC || head[8..16] != size.to_le_bytes() {
        return None;
    }
    let hashes: Vec<Digest> = body
        .chunks_exact(32)
        .map(|c| c.try_into().expect("32-byte pieces"))
        .collect();
    (combine(size, &hashes) == *digest).then_some(hashes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{block_hash, digest_bytes, BLOCK};

    fn image() -> (Vec<u8>, Vec<Digest>) {
        let img: Vec<u8> = (0..2 * BLOCK as usize + 5000)
            .map(|i| (i % 253) as u8)
            .collect();
        let hashes = img.chunks(BLOCK as usize).map(block_hash).collect();
        (img, hashes)
    }

    #[test]
    fn round_trip_and_every_check() {
        let (img, hashes) = image();
        let (size, digest) = (img.len() as u64, digest_bytes(&img));
        let file = encode(size, &hashes);
        assert_eq!(file.len() as u64, expected_len(size));
        assert_eq!(decode(&file, size, &digest), Some(hashes.clone()));
        // Another size, digest, magic, length, or one hash changed: ignored.
        assert_eq!(decode(&file, size + 1, &digest), None);
        assert_eq!(decode(&file, size, &[0; 32]), None);
        let mut bad = file.clone();
        bad[0] ^= 1;
        assert_eq!(decode(&bad, size, &digest), None);
        assert_eq!(decode(&file[..file.len() - 1], size, &digest), None);
        let mut longer = file.clone();
        longer.push(0);
        assert_eq!(decode(&longer, size, &digest), None);
        let mut forged = file;
        forged[HEADER_LEN + 40] ^= 1;
        assert_eq!(decode(&forged, size, &digest), None);
        // An empty component has no blocks.
        assert_eq!(decode(&encode(0, &[]), 0, &digest_bytes(&[])), Some(vec![]));
    }
}
