//! Component digests: BLAKE3 over 1 MiB blocks (see FORMAT.md, "Component
//! digest"). Blocks can be hashed in parallel, and an all-zero block (a hole)
//! has a known hash, so sparse images are verified without reading holes.

use std::sync::OnceLock;

/// Size of a digest block.
pub const BLOCK_SIZE: usize = 1 << 20;
/// `BLOCK_SIZE` as u64.
pub const BLOCK: u64 = BLOCK_SIZE as u64;

const CONTEXT: &str = "kimberley 2026 component digest v1";

/// A 32-byte digest.
pub type Digest = [u8; 32];

/// Hash of one digest block.
pub fn block_hash(bytes: &[u8]) -> Digest {
    *blake3::hash(bytes).as_bytes()
}

/// Hash of an all-zero block of `len` bytes (cached for full blocks).
pub fn zero_block_hash(len: usize) -> Digest {
    static FULL: OnceLock<Digest> = OnceLock::new();
    if len == BLOCK_SIZE {
        *FULL.get_or_init(|| block_hash(&vec![0u8; BLOCK_SIZE]))
    } else {
        block_hash(&vec![0u8; len])
    }
}

/// The hash of a block's bytes, an all-zero block through the cached
/// [`zero_block_hash`] (the same value, without hashing a mebibyte).
pub fn data_block_hash(bytes: &[u8]) -> Digest {
    if crate::chunk::is_zero(bytes) {
        zero_block_hash(bytes.len())
    } else {
        block_hash(bytes)
    }
}

/// The component digest of `size` bytes whose block hashes are `hashes`,
/// in order. A list that is not `block_count(size)` long gives a digest no
/// component of that size has (for checking untrusted block lists).
pub fn combine(size: u64, hashes: &[Digest]) -> Digest {
    let mut h = ComponentHasher::new(size);
    for b in hashes {
        h.inner.update(b);
    }
    *h.inner.finalize().as_bytes()
}

/// Number of digest blocks of an image of `size` bytes.
pub fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK)
}

/// Length of block `i` of an image of `size` bytes.
pub fn block_len(size: u64, i: u64) -> usize {
    (size - i * BLOCK).min(BLOCK) as usize
}

/// Accumulates block hashes, in order, into a component digest.
pub struct ComponentHasher {
    inner: blake3::Hasher,
    size: u64,
    blocks: u64,
    /// The block hashes pushed, when asked to keep them.
    kept: Option<Vec<Digest>>,
}

impl ComponentHasher {
    /// Starts the digest of a component of `size` bytes.
    pub fn new(size: u64) -> Self {
        let mut inner = blake3::Hasher::new_derive_key(CONTEXT);
        inner.update(&size.to_le_bytes());
        ComponentHasher {
            inner,
            size,
            blocks: 0,
            kept: None,
        }
    }

    /// [`ComponentHasher::new`] that also keeps the block hashes
    /// ([`ComponentHasher::finish_kept`]).
    pub fn keeping(size: u64) -> Self {
        let mut h = Self::new(size);
        h.kept = Some(Vec::with_capacity(block_count(size) as usize));
        h
    }

    /// Index of the next block expected.
    pub fn next_block(&self) -> u64 {
        self.blocks
    }

    /// Adds the hash of the next block.
    pub fn push(&mut self, block_hash: &Digest) {
        self.inner.update(block_hash);
        self.blocks += 1;
        if let Some(k) = self.kept.as_mut() {
            k.push(*block_hash);
        }
    }

    /// [`ComponentHasher::finish`], with the block hashes when made with
    /// [`ComponentHasher::keeping`].
    pub fn finish_kept(mut self) -> (Digest, Option<Vec<Digest>>) {
        let kept = self.kept.take();
        (self.finish(), kept)
    }

    /// Ends the digest. Panics in debug builds if blocks are missing.
    pub fn finish(self) -> Digest {
        debug_assert_eq!(self.blocks, block_count(self.size));
        *self.inner.finalize().as_bytes()
    }
}

/// A component digest kept up to date while the component's file is
/// written piecemeal (live migration): per-block hashes start as those of
/// zeros (an empty sparse file), blocks written to are marked, and
/// [`BlockDigests::rehash`] re-reads and re-hashes only the marked ones.
#[derive(Debug, Clone)]
pub struct BlockDigests {
    size: u64,
    hashes: Vec<Digest>,
    stale: Vec<bool>,
}

impl BlockDigests {
    /// The digest state of an all-zero component of `size` bytes.
    pub fn zeros(size: u64) -> Self {
        let n = block_count(size);
        BlockDigests {
            size,
            hashes: (0..n)
                .map(|i| zero_block_hash(block_len(size, i)))
                .collect(),
            stale: vec![false; n as usize],
        }
    }

    /// Marks the block holding byte `offset` for re-hashing.
    pub fn mark(&mut self, offset: u64) {
        if let Some(s) = self.stale.get_mut((offset / BLOCK) as usize) {
            *s = true;
        }
    }

    /// Marks every block.
    pub fn mark_all(&mut self) {
        self.stale.fill(true);
    }

    /// Whether block `i` is marked.
    pub fn is_stale(&self, i: u64) -> bool {
        self.stale.get(i as usize).copied().unwrap_or(false)
    }

    /// Sets the hash of block `i` (computed by the caller from its bytes)
    /// and unmarks it.
    pub fn set(&mut self, i: u64, hash: Digest) {
        if let (Some(h), Some(s)) = (
            self.hashes.get_mut(i as usize),
            self.stale.get_mut(i as usize),
        ) {
            *h = hash;
            *s = false;
        }
    }

    /// The block hashes (those of marked blocks are out of date).
    pub fn hashes(&self) -> &[Digest] {
        &self.hashes
    }

    /// Blocks marked since the last [`BlockDigests::rehash`].
    pub fn stale_count(&self) -> u64 {
        self.stale.iter().filter(|&&s| s).count() as u64
    }

    /// Re-reads and re-hashes the marked blocks from `file` (holes and the
    /// end of the file read as zeros), on all cores. Returns how many.
    pub fn rehash(&mut self, file: &std::fs::File) -> std::io::Result<u64> {
        use rayon::prelude::*;
        let size = self.size;
        let todo: Vec<u64> = (0..self.stale.len() as u64)
            .filter(|&i| self.stale[i as usize])
            .collect();
        let new: Vec<(u64, Digest)> = todo
            .par_iter()
            .map(|&i| {
                let mut buf = vec![0u8; block_len(size, i)];
                crate::fsutil::read_at_zero_padded(file, &mut buf, i * BLOCK, size)?;
                Ok((i, data_block_hash(&buf)))
            })
            .collect::<std::io::Result<_>>()?;
        for (i, h) in new {
            self.hashes[i as usize] = h;
            self.stale[i as usize] = false;
        }
        Ok(todo.len() as u64)
    }

    /// The component digest. Marked blocks must have been re-hashed.
    pub fn digest(&self) -> Digest {
        debug_assert_eq!(self.stale_count(), 0);
        combine(self.size, &self.hashes)
    }
}

/// Digest of an in-memory image (tests and small components).
pub fn digest_bytes(bytes: &[u8]) -> Digest {
    let mut h = ComponentHasher::new(bytes.len() as u64);
    for b in bytes.chunks(BLOCK_SIZE) {
        h.push(&block_hash(b));
    }
    h.finish()
}

/// Lower-case hex of a digest.
pub fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// How messages and `kimberlize inspect` name a VM identity or an overlay
/// id: its first 8 bytes in hex (the wrong-base error and `inspect VMDIR`
/// print the same string).
pub fn short_id(id: &[u8]) -> String {
    hex(&id[..id.len().min(8)])
}

/// Parses 64 hex characters.
pub fn from_hex(s: &str) -> Option<Digest> {
    if s.len() != 64 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_hash_like_zeros() {
        let z = vec![0u8; BLOCK_SIZE * 2 + 5];
        let mut h = ComponentHasher::new(z.len() as u64);
        h.push(&zero_block_hash(BLOCK_SIZE));
        h.push(&zero_block_hash(BLOCK_SIZE));
        h.push(&zero_block_hash(5));
        assert_eq!(h.finish(), digest_bytes(&z));
    }

    #[test]
    fn block_digests_follow_piecemeal_writes() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let size = BLOCK * 3 + 100;
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(t.path().join("f"))
            .unwrap();
        f.set_len(size).unwrap();
        let mut img = vec![0u8; size as usize];
        let mut d = BlockDigests::zeros(size);
        assert_eq!(d.digest(), digest_bytes(&img));
        for (off, b) in [(5u64, 7u8), (BLOCK * 3 + 50, 9), (BLOCK + 4096, 1)] {
            f.write_all_at(&[b; 40], off).unwrap();
            img[off as usize..off as usize + 40].fill(b);
            d.mark(off);
        }
        assert_eq!(d.stale_count(), 3);
        assert_eq!(d.rehash(&f).unwrap(), 3);
        assert_eq!(d.digest(), digest_bytes(&img));
        // A block written back to zeros hashes as zeros again.
        f.write_all_at(&[0; 40], 5).unwrap();
        img[5..45].fill(0);
        d.mark(5);
        d.rehash(&f).unwrap();
        assert_eq!(d.digest(), digest_bytes(&img));
    }

    #[test]
    fn size_is_bound() {
        assert_ne!(digest_bytes(&[]), digest_bytes(&[0]));
        assert_eq!(
            from_hex(&hex(&digest_bytes(b"x"))),
            Some(digest_bytes(b"x"))
        );
    }
}

/// Digest of an image presented as increasing `(offset, bytes)` data pieces;
/// gaps (holes) count as zeros and cost nothing for whole blocks. Full blocks
/// are hashed in parallel batches.
pub struct SparseHasher {
    size: u64,
    hasher: ComponentHasher,
    /// Full blocks waiting to be hashed, and the partly filled current one.
    pending: Vec<Vec<u8>>,
    cur: Vec<u8>,
    /// Offset of the start of `cur`'s block.
    cur_block: u64,
}

const BATCH: usize = 8;

impl SparseHasher {
    /// [`SparseHasher::new`] that keeps the block hashes
    /// ([`SparseHasher::finish_kept`]).
    pub fn keeping(size: u64) -> Self {
        SparseHasher {
            hasher: ComponentHasher::keeping(size),
            ..Self::new(size)
        }
    }

    /// Starts hashing an image of `size` bytes.
    pub fn new(size: u64) -> Self {
        SparseHasher {
            size,
            hasher: ComponentHasher::new(size),
            pending: Vec::new(),
            cur: Vec::with_capacity(BLOCK_SIZE),
            cur_block: 0,
        }
    }

    /// Feeds data at `offset` (must not go backwards; gaps are zeros).
    pub fn feed(&mut self, mut offset: u64, mut data: &[u8]) {
        while !data.is_empty() {
            let block = offset / BLOCK;
            self.advance_to(block);
            let in_block = (offset - block * BLOCK) as usize;
            if self.cur.len() < in_block {
                self.cur.resize(in_block, 0);
            }
            debug_assert_eq!(self.cur.len(), in_block, "data fed backwards");
            let room = block_len(self.size, block) - in_block;
            let n = room.min(data.len());
            self.cur.extend_from_slice(&data[..n]);
            data = &data[n..];
            offset += n as u64;
            if self.cur.len() == block_len(self.size, block) {
                self.close_current();
            }
        }
    }

    /// Closes blocks before `block` (padding with zeros).
    fn advance_to(&mut self, block: u64) {
        while self.cur_block < block {
            if self.cur.is_empty() {
                // A whole block of hole: flush the batch, push the zero hash.
                self.flush();
                self.hasher
                    .push(&zero_block_hash(block_len(self.size, self.cur_block)));
                self.cur_block += 1;
            } else {
                self.cur.resize(block_len(self.size, self.cur_block), 0);
                self.close_current();
            }
        }
    }

    fn close_current(&mut self) {
        let full = std::mem::replace(&mut self.cur, Vec::with_capacity(BLOCK_SIZE));
        self.pending.push(full);
        self.cur_block += 1;
        if self.pending.len() >= BATCH {
            self.flush();
        }
    }

    fn flush(&mut self) {
        use rayon::prelude::*;
        let hashes: Vec<Digest> = self.pending.par_iter().map(|b| block_hash(b)).collect();
        for h in &hashes {
            self.hasher.push(h);
        }
        self.pending.clear();
    }

    /// The digest (the rest of the image is zeros).
    pub fn finish(self) -> Digest {
        self.finish_kept().0
    }

    /// [`SparseHasher::finish`], with the block hashes when made with
    /// [`SparseHasher::keeping`].
    pub fn finish_kept(mut self) -> (Digest, Option<Vec<Digest>>) {
        let blocks = block_count(self.size);
        self.advance_to(blocks);
        self.flush();
        std::mem::replace(&mut self.hasher, ComponentHasher::new(0)).finish_kept()
    }
}

#[cfg(test)]
mod sparse_tests {
    use super::*;

    #[test]
    fn sparse_feed_matches_dense() {
        let size = 3 * BLOCK + 100;
        let mut img = vec![0u8; size as usize];
        for (i, b) in img.iter_mut().enumerate().skip(BLOCK_SIZE + 10).take(5000) {
            *b = i as u8 | 1;
        }
        img[size as usize - 1] = 9;
        let mut h = SparseHasher::new(size);
        h.feed(BLOCK + 10, &img[BLOCK_SIZE + 10..BLOCK_SIZE + 5010]);
        h.feed(size - 1, &[9]);
        assert_eq!(h.finish(), digest_bytes(&img));
        assert_eq!(SparseHasher::new(0).finish(), digest_bytes(&[]));
    }
}
