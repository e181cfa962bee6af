//! Reads the base once: verifies its component digests and indexes every
//! non-zero chunk by fingerprint, so launch chunks equal to any base chunk
//! are found.

use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};

use rayon::prelude::*;

use crate::chunk::{chunk_len, fingerprint, is_zero, CHUNK, CHUNK_SIZE};
use crate::digest::SparseHasher;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::read_at_zero_padded;
use crate::progress::Progress;
use crate::sparse::{data_extents, ExtentMap};
use crate::vmdir::VmDir;

/// Keys are already hashes: use them as they are.
#[derive(Default, Clone, Copy)]
pub struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// A map from fingerprints to packed positions.
pub type FingerprintMap = HashMap<u64, u64, BuildHasherDefault<IdentityHasher>>;

/// Packs (component, chunk) into a u64.
pub fn pack(comp: u8, chunk: u64) -> u64 {
    (u64::from(comp) << 56) | chunk
}

/// Inverse of [`pack`].
pub fn unpack(p: u64) -> (u8, u64) {
    ((p >> 56) as u8, p & ((1 << 56) - 1))
}

/// Size of the blocks the base and launch are read in.
pub const READ_BLOCK: usize = 8 << 20;

/// The base, opened and indexed.
pub struct BaseIndex {
    /// Open component files.
    pub files: Vec<File>,
    /// Component sizes.
    pub sizes: Vec<u64>,
    /// Data extents per component.
    pub extents: Vec<ExtentMap>,
    /// Fingerprint → first base chunk with it.
    pub map: FingerprintMap,
    /// Bytes of data read.
    pub read_bytes: u64,
}

impl BaseIndex {
    /// Reads, verifies and indexes `base`.
    pub fn build(base: &VmDir, progress: &Progress) -> Result<BaseIndex> {
        let n = base.manifest.components.len();
        let mut idx = BaseIndex {
            files: Vec::with_capacity(n),
            sizes: Vec::with_capacity(n),
            extents: Vec::with_capacity(n),
            map: FingerprintMap::default(),
            read_bytes: 0,
        };
        for i in 0..n {
            let f = base.open_component(i)?;
            let size = base.manifest.components[i].size;
            let ext = ExtentMap::new(
                data_extents(&f, size)
                    .ctx(|| format!("reading {}", base.component_path(i).display()))?,
            );
            idx.files.push(f);
            idx.sizes.push(size);
            idx.extents.push(ext);
        }
        progress.stage("indexing base");
        // Data extents can be small and many (a filesystem image): pieces
        // are gathered into one batch of up to READ_BLOCK bytes, so the
        // parallel fingerprinting runs once per batch, not per extent.
        let mut batch = Batch::default();
        for i in 0..n {
            let size = idx.sizes[i];
            let mut hasher = SparseHasher::new(size);
            let extents = idx.extents[i].extents().to_vec();
            let mut done = 0u64;
            let mut read = 0u64;
            for (s, e) in extents {
                // Align to chunks so fingerprints are of whole chunks.
                let mut pos = (s - s % CHUNK).max(done);
                while pos < e {
                    let room = READ_BLOCK - batch.buf.len();
                    let len = ((e - pos) as usize)
                        .next_multiple_of(CHUNK_SIZE)
                        .min(room)
                        .min((size - pos) as usize);
                    let at = batch.buf.len();
                    batch.buf.resize(at + len, 0);
                    read_at_zero_padded(&idx.files[i], &mut batch.buf[at..], pos, size)
                        .ctx(|| format!("reading {}", base.component_path(i).display()))?;
                    hasher.feed(pos, &batch.buf[at..]);
                    batch.pieces.push((at, pos / CHUNK));
                    idx.read_bytes += len as u64;
                    progress.advance(len as u64);
                    read += len as u64;
                    pos += len as u64;
                    if batch.buf.len() >= READ_BLOCK {
                        batch.index(&mut idx.map, i as u8, size);
                    }
                }
                done = done.max(pos);
            }
            batch.index(&mut idx.map, i as u8, size);
            // Holes count as done: the run's total is the components' sizes.
            progress.advance(size.saturating_sub(read));
            if hasher.finish() != base.manifest.components[i].digest {
                return Err(Error::VmDir {
                    path: base.path.clone(),
                    why: format!(
                        "{} does not match its manifest digest",
                        base.manifest.file_name(i)
                    ),
                });
            }
        }
        Ok(idx)
    }

    /// Reads base chunk `(comp, chunk)` into `buf` (zero past the end).
    pub fn read_chunk(&self, comp: u8, chunk: u64, buf: &mut [u8]) -> Result<()> {
        let c = usize::from(comp);
        read_at_zero_padded(&self.files[c], buf, chunk * CHUNK, self.sizes[c])
            .ctx(|| "reading the base".into())
    }
}

/// Pieces of one component's data read for fingerprinting together.
#[derive(Default)]
struct Batch {
    buf: Vec<u8>,
    /// (offset in `buf`, first chunk) of each piece; pieces are whole
    /// chunks except possibly the component's last.
    pieces: Vec<(usize, u64)>,
}

impl Batch {
    /// Fingerprints every non-zero whole chunk in the batch (in parallel)
    /// and indexes the first occurrence of each; empties the batch.
    fn index(&mut self, map: &mut FingerprintMap, comp: u8, size: u64) {
        let pieces = &self.pieces;
        // Chunk k of the buffer belongs to the last piece starting at or
        // before it.
        let chunk_of = |k: usize| {
            let at = k * CHUNK_SIZE;
            let p = pieces.partition_point(|&(o, _)| o <= at) - 1;
            pieces[p].1 + ((at - pieces[p].0) / CHUNK_SIZE) as u64
        };
        let fps: Vec<(u64, u64)> = self
            .buf
            .par_chunks(CHUNK_SIZE)
            .enumerate()
            .filter(|(_, c)| c.len() == CHUNK_SIZE && !is_zero(c))
            .map(|(k, c)| (fingerprint(c), chunk_of(k)))
            .collect();
        for (fp, chunk) in fps {
            // Only whole chunks are indexed (a short last chunk can only
            // match another short chunk).
            if chunk_len(size, chunk) == CHUNK_SIZE {
                map.entry(fp).or_insert(pack(comp, chunk));
            }
        }
        self.buf.clear();
        self.pieces.clear();
    }
}
