//! Reads launch and base side by side in large blocks and decides, for each
//! launch chunk, in this order: unchanged at the same offset, all zero,
//! equal to a base chunk anywhere, equal to an earlier launch chunk, a delta
//! against the base chunk at the same offset when smaller, else literal.

use std::fs::File;

use rayon::prelude::*;

use super::base_index::{pack, unpack, BaseIndex, FingerprintMap, READ_BLOCK};
use super::encode::{Enc, SegmentBuilder};
use crate::chunk::{fingerprint, is_zero, CHUNK, CHUNK_SIZE};
use crate::digest::SparseHasher;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::read_at_zero_padded;
use crate::overlay::delta;
use crate::progress::Progress;
use crate::sparse::{data_extents, ExtentMap};
use crate::vmdir::{Manifest, VmDir};

/// What the parallel pass decides about one chunk.
enum Class {
    Unchanged,
    Zero,
    Base(u64),
    /// Needs the sequential self-dedup check; carries its fingerprint and a
    /// delta if one is smaller than the chunk.
    Candidate {
        fp: u64,
        delta: Option<Vec<u8>>,
    },
}

/// Totals of the launch pass.
#[derive(Debug, Default)]
pub struct ClassifyStats {
    /// Bytes of launch data read.
    pub launch_read_bytes: u64,
}

/// The base component paired with launch component `i`: the one of the same
/// kind and ordinal among its kind.
pub fn paired(base: &Manifest, launch: &Manifest, i: usize) -> Option<usize> {
    let kind = launch.components[i].kind;
    let ordinal = launch.components[..i]
        .iter()
        .filter(|c| c.kind == kind)
        .count();
    (0..base.components.len())
        .filter(|&j| base.components[j].kind == kind)
        .nth(ordinal)
}

/// Runs the launch pass, feeding decisions to `enc`.
pub fn run(
    base: &Manifest,
    launch: &VmDir,
    index: &BaseIndex<'_>,
    enc: &mut SegmentBuilder<'_>,
    progress: &Progress,
) -> Result<ClassifyStats> {
    let mut stats = ClassifyStats::default();
    let n = launch.manifest.components.len();
    let files: Vec<File> = (0..n)
        .map(|i| launch.open_component(i))
        .collect::<Result<_>>()?;
    progress.stage("diffing");
    let mut self_map = FingerprintMap::default();
    let mut lbuf = vec![0u8; READ_BLOCK];
    let mut bbuf = vec![0u8; READ_BLOCK];
    let mut other = vec![0u8; CHUNK_SIZE];
    for i in 0..n {
        let comp = i as u8;
        let size = launch.manifest.components[i].size;
        let lext = ExtentMap::new(
            data_extents(&files[i], size)
                .ctx(|| format!("reading {}", launch.component_path(i).display()))?,
        );
        let pair = paired(base, &launch.manifest, i);
        let (bsize, bext) = match pair {
            Some(p) => (index.sizes[p], Some(&index.extents[p])),
            None => (0, None),
        };
        let mut hasher = SparseHasher::new(size);
        let mut pos = 0u64;
        while pos < size {
            let len = ((size - pos) as usize).min(READ_BLOCK);
            let end = pos + len as u64;
            let l_hole = lext.is_hole(pos, end);
            let b_hole = bext.is_none_or(|e| e.is_hole(pos, end));
            let nchunks = len.div_ceil(CHUNK_SIZE) as u64;
            if l_hole && b_hole {
                enc.unchanged(nchunks)?;
                progress.advance(len as u64);
                pos = end;
                continue;
            }
            // Only data extents are read (and hashed); holes are zeros.
            let l = &mut lbuf[..len];
            stats.launch_read_bytes += read_data(&files[i], &lext, l, pos, size, |off, data| {
                hasher.feed(off, data)
            })
            .ctx(|| format!("reading {}", launch.component_path(i).display()))?;
            let b = &mut bbuf[..len];
            match (pair, bext) {
                (Some(p), Some(e)) => {
                    b.fill(0);
                    for (x, y) in e.data_in(pos, end.min(bsize)) {
                        index
                            .read_at(p, &mut b[(x - pos) as usize..(y - pos) as usize], x)
                            .ctx(|| "reading the base".into())?;
                    }
                }
                _ => b.fill(0),
            }
            let l: &[u8] = l;
            let b: &[u8] = b;
            let classes: Vec<Class> = l
                .par_chunks(CHUNK_SIZE)
                .zip(b.par_chunks(CHUNK_SIZE))
                .map(|(lc, bc)| classify(lc, bc, index))
                .collect::<Result<_>>()?;
            let first = pos / CHUNK;
            let mut unchanged = 0u64;
            for (k, class) in classes.into_iter().enumerate() {
                let chunk = first + k as u64;
                let lc = &l[k * CHUNK_SIZE..((k + 1) * CHUNK_SIZE).min(len)];
                let e = match &class {
                    Class::Unchanged => {
                        unchanged += 1;
                        continue;
                    }
                    Class::Zero => Enc::Zero,
                    &Class::Base(p) => {
                        let (c, k) = unpack(p);
                        Enc::Ref {
                            is_self: false,
                            comp: c,
                            chunk: k,
                        }
                    }
                    Class::Candidate { fp, delta } => match self_map.get(fp).copied() {
                        Some(p)
                            if same_as_earlier(
                                p,
                                lc,
                                comp,
                                first,
                                l,
                                &files,
                                &launch.manifest,
                                &mut other,
                            )? =>
                        {
                            let (c, k) = unpack(p);
                            Enc::Ref {
                                is_self: true,
                                comp: c,
                                chunk: k,
                            }
                        }
                        _ => {
                            self_map.entry(*fp).or_insert(pack(comp, chunk));
                            match delta {
                                Some(d) => Enc::Delta(d),
                                None => Enc::Literal(lc),
                            }
                        }
                    },
                };
                if unchanged > 0 {
                    enc.unchanged(unchanged)?;
                    unchanged = 0;
                }
                enc.push_chunk(comp, chunk, e, lc)?;
            }
            if unchanged > 0 {
                enc.unchanged(unchanged)?;
            }
            progress.advance(len as u64);
            pos = end;
        }
        if hasher.finish() != launch.manifest.components[i].digest {
            return Err(Error::VmDir {
                path: launch.path.clone(),
                why: format!(
                    "{} does not match its manifest digest",
                    launch.manifest.file_name(i)
                ),
            });
        }
    }
    Ok(stats)
}

/// Fills `buf` with the image's bytes at `pos`: zeros, then the data
/// extents read over them. Calls `on_data` for each piece read; returns the
/// bytes read.
fn read_data(
    f: &File,
    ext: &ExtentMap,
    buf: &mut [u8],
    pos: u64,
    size: u64,
    mut on_data: impl FnMut(u64, &[u8]),
) -> std::io::Result<u64> {
    buf.fill(0);
    let mut n = 0;
    for (a, b) in ext.data_in(pos, pos + buf.len() as u64) {
        let piece = &mut buf[(a - pos) as usize..(b - pos) as usize];
        read_at_zero_padded(f, piece, a, size)?;
        on_data(a, piece);
        n += b - a;
    }
    Ok(n)
}

fn classify(lc: &[u8], bc: &[u8], index: &BaseIndex<'_>) -> Result<Class> {
    if lc == bc {
        return Ok(Class::Unchanged);
    }
    if is_zero(lc) {
        return Ok(Class::Zero);
    }
    let fp = fingerprint(lc);
    if lc.len() == CHUNK_SIZE {
        if let Some(&p) = index.map.get(&fp) {
            let (c, k) = unpack(p);
            let mut buf = [0u8; CHUNK_SIZE];
            index.read_chunk(c, k, &mut buf)?;
            if buf[..] == *lc {
                return Ok(Class::Base(p));
            }
        }
    }
    let delta = if is_zero(bc) {
        None
    } else {
        delta::encode(bc, lc, lc.len())
    };
    Ok(Class::Candidate { fp, delta })
}

/// Confirms that the earlier launch chunk `p` equals `lc` byte for byte.
#[allow(clippy::too_many_arguments)]
fn same_as_earlier(
    p: u64,
    lc: &[u8],
    comp: u8,
    block_first: u64,
    block: &[u8],
    files: &[File],
    launch: &Manifest,
    other: &mut [u8],
) -> Result<bool> {
    let (c, k) = unpack(p);
    let size = launch.components[usize::from(c)].size;
    let len = crate::chunk::chunk_len(size, k);
    if len != lc.len() {
        return Ok(false);
    }
    if c == comp && k >= block_first {
        let off = ((k - block_first) as usize) * CHUNK_SIZE;
        return Ok(&block[off..off + len] == lc);
    }
    let o = &mut other[..len];
    read_at_zero_padded(&files[usize::from(c)], o, k * CHUNK, size)
        .ctx(|| "reading the launch VM".into())?;
    Ok(o == lc)
}
