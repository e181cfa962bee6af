//! A VM given as a base VMDIR plus in-memory replacements of some of its byte ranges: a chain's launch VM that is never written out.

use std::fs::File;
use std::path::PathBuf;

use super::dir::VmDir;
use super::manifest::Manifest;
use crate::diff::classify::paired;
use crate::error::{IoContext, Result};
use crate::fsutil::read_at_zero_padded;
use crate::sparse::{data_extents, Range};

/// What replaces one range of a component.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// `len` zero bytes.
    Zero(u64),
    /// These bytes.
    Data(Vec<u8>),
}

impl Piece {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            Piece::Zero(n) => *n,
            Piece::Data(d) => d.len() as u64,
        }
    }

    /// True when it replaces nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The replacements of one component: sorted, non-overlapping `(offset,
/// piece)` pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Patches {
    pieces: Vec<(u64, Piece)>,
    data_bytes: u64,
}

impl Patches {
    /// Adds `piece` at `off`, after every piece so far (the caller builds
    /// components in one increasing pass); an empty piece is dropped.
    ///
    /// # Panics
    /// If `off` is before the end of the last piece (a caller's bug).
    pub fn push(&mut self, off: u64, piece: Piece) {
        if piece.is_empty() {
            return;
        }
        let end = self.pieces.last().map(|(o, p)| o + p.len()).unwrap_or(0);
        assert!(off >= end, "patches must be added in order");
        if let Piece::Data(d) = &piece {
            self.data_bytes += d.len() as u64;
        }
        self.pieces.push((off, piece));
    }

    /// The pieces, in order.
    pub fn pieces(&self) -> &[(u64, Piece)] {
        &self.pieces
    }

    /// Bytes held in data pieces.
    pub fn data_bytes(&self) -> u64 {
        self.data_bytes
    }

    /// Writes the replacements that overlap `[off, off + buf.len())` over
    /// `buf`.
    pub fn overlay(&self, buf: &mut [u8], off: u64) {
        let end = off + buf.len() as u64;
        // The first piece that ends after `off`.
        let first = self.pieces.partition_point(|(o, p)| o + p.len() <= off);
        for (o, p) in &self.pieces[first..] {
            if *o >= end {
                break;
            }
            let a = (*o).max(off);
            let b = (o + p.len()).min(end);
            let dst = &mut buf[(a - off) as usize..(b - off) as usize];
            match p {
                Piece::Zero(_) => dst.fill(0),
                Piece::Data(d) => dst.copy_from_slice(&d[(a - o) as usize..(b - o) as usize]),
            }
        }
    }

    /// The ranges it replaces, in order.
    pub fn ranges(&self) -> impl Iterator<Item = Range> + '_ {
        self.pieces.iter().map(|(o, p)| (*o, o + p.len()))
    }
}

/// A launch VM as its base's files plus [`Patches`] per component, with
/// the manifest it has (whose digests the patches were checked against
/// when they were made, see `apply::patch`).
#[derive(Debug)]
pub struct Patched {
    /// The base whose files are read.
    pub base: VmDir,
    /// The VM's manifest (its components, the base's machine).
    pub manifest: Manifest,
    /// The base component read under each component (`None`: zeros).
    pub paired: Vec<Option<usize>>,
    /// The replacements, one list per component.
    pub patches: Vec<Patches>,
}

impl Patched {
    /// `manifest`'s VM as `base` plus `patches` (one list per component).
    pub(crate) fn new(base: VmDir, manifest: Manifest, patches: Vec<Patches>) -> Patched {
        let paired = (0..manifest.components.len())
            .map(|i| paired(&base.manifest, &manifest, i))
            .collect();
        Patched {
            base,
            manifest,
            paired,
            patches,
        }
    }

    /// Its identity (that of its manifest).
    pub fn identity(&self) -> [u8; 32] {
        self.manifest.identity()
    }

    /// What to call it in messages.
    pub fn path(&self) -> PathBuf {
        self.base.path.join("(with the parent overlays)")
    }

    /// Bytes held in data pieces, over all components.
    pub fn data_bytes(&self) -> u64 {
        self.patches.iter().map(Patches::data_bytes).sum()
    }

    /// Opens the file read under each component (`None`: zeros), with its
    /// size.
    pub fn open_files(&self) -> Result<Vec<Option<(File, u64)>>> {
        self.paired
            .iter()
            .map(|p| match p {
                Some(j) => Ok(Some((
                    self.base.open_component(*j)?,
                    self.base.manifest.components[*j].size,
                ))),
                None => Ok(None),
            })
            .collect()
    }

    /// The data extents of component `i` read from `files` (from
    /// [`Patched::open_files`]): the base file's, cut at the component's
    /// size, and every replaced range.
    pub fn extents(&self, i: usize, files: &[Option<(File, u64)>]) -> Result<Vec<Range>> {
        let size = self.manifest.components[i].size;
        let mut all: Vec<Range> = match &files[i] {
            Some((f, fsize)) => data_extents(f, (*fsize).min(size))
                .ctx(|| format!("reading {}", self.base.path.display()))?,
            None => Vec::new(),
        };
        all.extend(self.patches[i].ranges());
        Ok(merge_ranges(all))
    }

    /// Reads `buf.len()` bytes of component `i` at `off` from `files`.
    pub fn read_at(
        &self,
        i: usize,
        files: &[Option<(File, u64)>],
        buf: &mut [u8],
        off: u64,
    ) -> std::io::Result<()> {
        match &files[i] {
            Some((f, fsize)) => read_at_zero_padded(f, buf, off, *fsize)?,
            None => buf.fill(0),
        }
        self.patches[i].overlay(buf, off);
        Ok(())
    }

    /// The whole of component `i` (for small ones: the state blob).
    pub fn read_component(&self, i: usize) -> Result<Vec<u8>> {
        let files = self.open_files()?;
        let size = usize::try_from(self.manifest.components[i].size)
            .map_err(|_| crate::error::Error::Invalid("a component is too large".into()))?;
        let mut buf = vec![0u8; size];
        self.read_at(i, &files, &mut buf, 0)
            .ctx(|| format!("reading {}", self.base.path.display()))?;
        Ok(buf)
    }
}

impl Patched {
    /// Writes it out as the VMDIR `out` (which must not exist), without
    /// fsync: for a backend that restores only directories.
    pub fn write_to(&self, out: &std::path::Path) -> Result<VmDir> {
        let mut w = super::dir::VmDirWriter::create(out)?;
        w.set_sync(false);
        let files = self.open_files()?;
        for (i, c) in self.manifest.components.iter().enumerate() {
            let name = self.manifest.file_name(i);
            let dst = w.create_file(&name)?;
            let what = || format!("writing {}", out.join(&name).display());
            if let Some((src, fsize)) = &files[i] {
                crate::fsutil::copy_sparse(src, (*fsize).min(c.size), &dst, |_, _| Ok(()))?;
            }
            dst.set_len(c.size).ctx(what)?;
            for (off, piece) in self.patches[i].pieces() {
                match piece {
                    Piece::Data(d) => std::os::unix::fs::FileExt::write_all_at(&dst, d, *off),
                    Piece::Zero(n) => crate::sys::punch::punch_hole(&dst, *off, *n),
                }
                .ctx(what)?;
            }
        }
        let path = w.commit(&self.manifest)?;
        VmDir::open(&path)
    }
}

/// Sorts `r` and merges overlapping or touching ranges.
fn merge_ranges(mut r: Vec<Range>) -> Vec<Range> {
    r.retain(|(a, b)| a < b);
    r.sort_unstable();
    let mut out: Vec<Range> = Vec::with_capacity(r.len());
    for (a, b) in r {
        match out.last_mut() {
            Some(last) if a <= last.1 => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_replaces_only_what_overlaps() {
        let mut p = Patches::default();
        p.push(2, Piece::Data(vec![1, 2, 3]));
        p.push(5, Piece::Data(vec![4]));
        p.push(8, Piece::Zero(2));
        p.push(12, Piece::Data(vec![]));
        assert_eq!(p.pieces().len(), 3, "an empty piece is dropped");
        assert_eq!(p.data_bytes(), 4);
        let mut buf = [9u8; 12];
        p.overlay(&mut buf, 0);
        assert_eq!(buf, [9, 9, 1, 2, 3, 4, 9, 9, 0, 0, 9, 9]);
        let mut buf = [7u8; 4];
        p.overlay(&mut buf, 3);
        assert_eq!(buf, [2, 3, 4, 7]);
        let mut buf = [7u8; 2];
        p.overlay(&mut buf, 9);
        assert_eq!(buf, [0, 7]);
        assert_eq!(
            p.ranges().collect::<Vec<_>>(),
            vec![(2, 5), (5, 6), (8, 10)]
        );
    }

    #[test]
    #[should_panic(expected = "in order")]
    fn out_of_order_pieces_are_a_bug() {
        let mut p = Patches::default();
        p.push(4, Piece::Zero(4));
        p.push(6, Piece::Zero(1));
    }

    #[test]
    fn ranges_merge() {
        assert_eq!(
            merge_ranges(vec![(5, 9), (0, 2), (2, 3), (8, 10), (4, 4)]),
            vec![(0, 3), (5, 10)]
        );
    }
}
