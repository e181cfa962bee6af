//! Reads the base once: verifies its component digests and indexes every
//! non-zero chunk by fingerprint, so launch chunks equal to any base chunk
//! are found. The base is a VMDIR, or a chain's launch VM held as its base
//! plus in-memory changes ([`Base::Patched`]).

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
use crate::vmdir::manifest::Manifest;
use crate::vmdir::patched::{Patched, Patches};
use crate::vmdir::VmDir;

/// The VM a diff is relative to.
#[derive(Debug, Clone, Copy)]
pub enum Base<'a> {
    /// A VMDIR, verified against its manifest while it is indexed.
    Dir(&'a VmDir),
    /// A chain's launch VM never written out, already verified when its
    /// patches were made (`apply::patch`).
    Patched(&'a Patched),
}

impl<'a> From<&'a VmDir> for Base<'a> {
    fn from(d: &'a VmDir) -> Self {
        Base::Dir(d)
    }
}

impl<'a> From<&'a Patched> for Base<'a> {
    fn from(p: &'a Patched) -> Self {
        Base::Patched(p)
    }
}

impl Base<'_> {
    /// Its manifest.
    pub fn manifest(&self) -> &Manifest {
        match self {
            Base::Dir(d) => &d.manifest,
            Base::Patched(p) => &p.manifest,
        }
    }

    /// Its identity.
    pub fn identity(&self) -> [u8; 32] {
        self.manifest().identity()
    }

    /// What to call it in messages.
    pub fn path(&self) -> std::path::PathBuf {
        match self {
            Base::Dir(d) => d.path.clone(),
            Base::Patched(p) => p.path(),
        }
    }
}

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
pub struct BaseIndex<'a> {
    /// The file read under each component, with how much of it to read
    /// (`None`: zeros).
    files: Vec<Option<(File, u64)>>,
    /// What replaces some of the files' bytes, one list per component.
    patches: Option<&'a [Patches]>,
    /// Component sizes.
    pub sizes: Vec<u64>,
    /// Data extents per component.
    pub extents: Vec<ExtentMap>,
    /// Fingerprint → first base chunk with it.
    pub map: FingerprintMap,
    /// Bytes of data read.
    pub read_bytes: u64,
}

impl<'a> BaseIndex<'a> {
    /// Reads, verifies (a VMDIR) and indexes `base`.
    pub fn build(base: Base<'a>, progress: &Progress) -> Result<BaseIndex<'a>> {
        let manifest = base.manifest();
        let n = manifest.components.len();
        let mut idx = BaseIndex {
            files: Vec::with_capacity(n),
            patches: None,
            sizes: Vec::with_capacity(n),
            extents: Vec::with_capacity(n),
            map: FingerprintMap::default(),
            read_bytes: 0,
        };
        let name = |i: usize| match base {
            Base::Dir(d) => d.component_path(i).display().to_string(),
            Base::Patched(p) => format!("{} (component {i})", p.path().display()),
        };
        match base {
            Base::Dir(d) => {
                for i in 0..n {
                    let f = d.open_component(i)?;
                    let size = manifest.components[i].size;
                    let ext = ExtentMap::new(
                        data_extents(&f, size).ctx(|| format!("reading {}", name(i)))?,
                    );
                    idx.files.push(Some((f, size)));
                    idx.sizes.push(size);
                    idx.extents.push(ext);
                }
            }
            Base::Patched(p) => {
                let files = p.open_files()?;
                for i in 0..n {
                    let size = manifest.components[i].size;
                    idx.extents.push(ExtentMap::new(p.extents(i, &files)?));
                    idx.sizes.push(size);
                }
                // Never read past the component from its base's file.
                idx.files = files
                    .into_iter()
                    .zip(&idx.sizes)
                    .map(|(f, &size)| f.map(|(f, fsize)| (f, fsize.min(size))))
                    .collect();
                idx.patches = Some(&p.patches);
            }
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
                    idx.read_at(i, &mut batch.buf[at..], pos)
                        .ctx(|| format!("reading {}", name(i)))?;
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
            // A patched VM was checked when its patches were made.
            if let Base::Dir(d) = base {
                if hasher.finish() != manifest.components[i].digest {
                    return Err(Error::VmDir {
                        path: d.path.clone(),
                        why: format!(
                            "{} does not match its manifest digest",
                            manifest.file_name(i)
                        ),
                    });
                }
            }
        }
        Ok(idx)
    }

    /// Reads `buf.len()` bytes of base component `comp` at `off` (zero past
    /// its end).
    pub fn read_at(&self, comp: usize, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        match &self.files[comp] {
            Some((f, limit)) => read_at_zero_padded(f, buf, off, *limit)?,
            None => buf.fill(0),
        }
        if let Some(p) = self.patches {
            p[comp].overlay(buf, off);
        }
        Ok(())
    }

    /// Reads base chunk `(comp, chunk)` into `buf` (zero past the end).
    pub fn read_chunk(&self, comp: u8, chunk: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(usize::from(comp), buf, chunk * CHUNK)
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
