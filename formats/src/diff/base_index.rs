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
        let total: u64 = idx.extents.iter().map(|e| e.data_bytes()).sum();
        progress.stage("indexing base", total);
        let mut buf = vec![0u8; READ_BLOCK];
        for i in 0..n {
            let size = idx.sizes[i];
            let mut hasher = SparseHasher::new(size);
            let extents = idx.extents[i].extents().to_vec();
            let mut done = 0u64;
            for (s, e) in extents {
                // Align to chunks so fingerprints are of whole chunks.
                let mut pos = (s - s % CHUNK).max(done);
                while pos < e {
                    let len = ((e - pos) as usize)
                        .min(READ_BLOCK)
                        .next_multiple_of(CHUNK_SIZE);
                    let len = len.min((size - pos) as usize);
                    let b = &mut buf[..len];
                    read_at_zero_padded(&idx.files[i], b, pos, size)
                        .ctx(|| format!("reading {}", base.component_path(i).display()))?;
                    hasher.feed(pos, b);
                    let first = pos / CHUNK;
                    let fps: Vec<(u64, u64)> = b
                        .par_chunks(CHUNK_SIZE)
                        .enumerate()
                        .filter(|(_, c)| !is_zero(c))
                        .map(|(k, c)| (fingerprint(c), first + k as u64))
                        .collect();
                    for (fp, chunk) in fps {
                        // Only whole chunks are indexed (a short last chunk
                        // can only match another short chunk).
                        if chunk_len(size, chunk) == CHUNK_SIZE {
                            idx.map.entry(fp).or_insert(pack(i as u8, chunk));
                        }
                    }
                    idx.read_bytes += len as u64;
                    progress.advance(len as u64);
                    pos += len as u64;
                }
                done = done.max(pos);
            }
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
