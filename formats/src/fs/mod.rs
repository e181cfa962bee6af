//! File systems inside raw disk images, read without mounting them: which
//! blocks an ext4 file system (bare or in a GPT/MBR partition) leaves free.
//!
//! Everything here is pure over a [`ReadAt`] byte source and caps what it
//! allocates; bad input is an error, never a panic. [`free_space`] is the
//! entry point `kimberlize import --trim` uses.

pub mod ext4;
pub mod part;

use std::io;

/// A byte source read at offsets (a disk image).
pub trait ReadAt {
    /// Fills `buf` from `offset`; an error if the source ends first.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// The source's length in bytes.
    fn len(&self) -> u64;
    /// True when the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let src = usize::try_from(offset)
            .ok()
            .and_then(|o| Some(o..o.checked_add(buf.len())?))
            .and_then(|r| self.get(r))
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn len(&self) -> u64 {
        <[u8]>::len(self) as u64
    }
}

/// Why a file system or partition table was not used for trimming.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// Reading the source failed.
    #[error("reading {what}: {source}")]
    Read {
        /// What was being read.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// No ext4 superblock magic.
    #[error("not an ext4 file system")]
    NotExt4,
    /// A feature or layout this reader does not understand.
    #[error("ext4 {0} is not supported")]
    Unsupported(String),
    /// Not cleanly unmounted, needs journal recovery, or has errors.
    #[error("ext4 file system is not clean: {0}")]
    Unclean(String),
    /// Inconsistent or out-of-range structures.
    #[error("{0}")]
    Corrupt(String),
}

/// Reads `buf.len()` bytes at `offset`, naming `what` on failure.
pub(crate) fn read(
    src: &(impl ReadAt + ?Sized),
    buf: &mut [u8],
    offset: u64,
    what: impl FnOnce() -> String,
) -> Result<(), FsError> {
    src.read_exact_at(buf, offset)
        .map_err(|source| FsError::Read {
            what: what(),
            source,
        })
}

/// Free byte ranges found on a disk, and what was left as it is.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FreeSpace {
    /// Half-open byte ranges of the disk that no file system uses, sorted
    /// and disjoint.
    pub ranges: Vec<(u64, u64)>,
    /// File systems whose free blocks are in `ranges`.
    pub file_systems: u32,
    /// One line per file system or partition left as it is, and why.
    pub notes: Vec<String>,
}

impl FreeSpace {
    /// Bytes in `ranges`.
    pub fn bytes(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a).sum()
    }
}

/// Finds the free blocks of the ext4 file systems on the disk `src`: a
/// bare file system, or the partitions of a GPT or MBR table. Whatever is
/// not understood is left out of the ranges with a note; errors reading
/// `src` are errors.
pub fn free_space(src: &(impl ReadAt + ?Sized)) -> Result<FreeSpace, FsError> {
    let mut out = FreeSpace::default();
    let len = src.len();
    // A bare file system, else a partition table; the bare file system's
    // refusal is the note when there is no table either.
    let bare = match ext4::free_blocks(src, 0, len) {
        Ok(f) => {
            out.ranges = f.ranges;
            out.file_systems = 1;
            return Ok(out);
        }
        Err(e @ FsError::Read { .. }) => return Err(e),
        Err(FsError::NotExt4) => None,
        Err(e) => Some(e),
    };
    let table = match (part::read_table(src), bare) {
        (Err(e @ FsError::Read { .. }), _) => return Err(e),
        (Ok(Some(t)), _) => t,
        (_, Some(e)) | (Err(e), None) => {
            out.notes.push(format!("{e}; left as it is"));
            return Ok(out);
        }
        (Ok(None), None) => {
            out.notes
                .push("no ext4 file system or partition table found; left as it is".to_string());
            return Ok(out);
        }
    };
    out.notes.extend(table.notes.iter().cloned());
    for p in &table.parts {
        let name = format!("{} partition {}", table.kind, p.number);
        if let Some(q) = table
            .parts
            .iter()
            .find(|q| q.number != p.number && q.overlaps(p))
        {
            out.notes.push(format!(
                "{name} overlaps partition {}; left as it is",
                q.number
            ));
            continue;
        }
        match ext4::free_blocks(src, p.start, p.len) {
            Ok(f) => {
                out.ranges.extend(f.ranges);
                out.file_systems += 1;
            }
            Err(e @ FsError::Read { .. }) => return Err(e),
            Err(e) => out.notes.push(format!("{name}: {e}; left as it is")),
        }
    }
    out.ranges.sort_unstable();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_file_system_and_gpt_partitions_are_found() {
        let fs = ext4::tests::tiny();
        let bare = free_space(&fs[..]).unwrap();
        assert_eq!(bare.ranges, vec![(8 << 10, 16 << 10)]);
        assert_eq!(bare.file_systems, 1);
        // Partition 1 at LBA 40 holds the file system, 2 at 100 holds junk.
        let mut d = part::tests::gpt(200, &[(40, 71), (100, 131)]);
        d[40 * 512..40 * 512 + fs.len()].copy_from_slice(&fs);
        d[100 * 512..132 * 512].fill(0x5A);
        let s = free_space(&d[..]).unwrap();
        assert_eq!(
            s.ranges,
            vec![(40 * 512 + (8 << 10), 40 * 512 + (16 << 10))]
        );
        assert_eq!(s.file_systems, 1);
        assert_eq!(
            s.notes,
            vec!["GPT partition 2: not an ext4 file system; left as it is"]
        );
    }

    #[test]
    fn overlapping_partitions_are_left_as_they_are() {
        let fs = ext4::tests::tiny();
        let mut d = part::tests::gpt(200, &[(40, 71), (60, 90)]);
        d[40 * 512..40 * 512 + fs.len()].copy_from_slice(&fs);
        let s = free_space(&d[..]).unwrap();
        assert_eq!(s.ranges, vec![]);
        assert_eq!(s.file_systems, 0);
        assert!(s.notes[0].contains("overlaps partition 2"), "{:?}", s.notes);
    }

    #[test]
    fn anything_else_is_left_as_it_is_with_a_note() {
        for d in [vec![], vec![0u8; 4096], vec![0xFFu8; 1 << 16]] {
            let s = free_space(&d[..]).unwrap();
            assert_eq!(s.ranges, vec![]);
            assert_eq!(s.notes.len(), 1, "{:?}", s.notes);
        }
        // A broken file system: the reason is in the note.
        let mut fs = ext4::tests::tiny();
        fs[1024 + 0x3A] = 0;
        let s = free_space(&fs[..]).unwrap();
        assert!(
            s.notes[0].contains("not cleanly unmounted"),
            "{:?}",
            s.notes
        );
    }
}
