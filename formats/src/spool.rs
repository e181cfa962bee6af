//! A private scratch file for bytes that must wait until what precedes them is known: nameless (`O_TMPFILE`) and 0600 from its creation, gone when dropped.
//!
//! A version-2 overlay's coverage map lists every data segment's length
//! and precedes them (FORMAT.md section 10.5), so the diff writer keeps
//! the compressed segments here, not in memory, until the map is written.
//! The file never has a name: the kernel frees it when the last descriptor
//! closes, on every exit path (an error, a panic, a signal, `SIGKILL`).
//! A file system without `O_TMPFILE` gets a file created exclusively,
//! mode 0600, under a random name, unlinked before anything is written
//! to it.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Appends smaller than this are gathered into one write.
const GATHER: usize = 1 << 20;

/// An append-only scratch file read back by offset.
#[derive(Debug)]
pub struct Spool {
    file: File,
    /// Bytes appended, gathered ones included.
    len: u64,
    /// Small appends not written yet (they start at `len - gathered.len()`).
    gathered: Vec<u8>,
}

impl Spool {
    /// Creates an empty spool in `dir`, or in `$TMPDIR` (`/tmp` when
    /// unset) for `None`.
    pub fn create(dir: Option<&Path>) -> io::Result<Spool> {
        let dir: PathBuf = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let file = match open_tmpfile(&dir) {
            Ok(f) => f,
            // No O_TMPFILE in this kernel (EISDIR, EINVAL) or file system
            // (EOPNOTSUPP).
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
                ) =>
            {
                create_unlinked(&dir)?
            }
            Err(e) => return Err(e),
        };
        Ok(Spool {
            file,
            len: 0,
            gathered: Vec::new(),
        })
    }

    /// Appends `bytes`; returns the offset they start at. Small appends
    /// (a working set's 4 KiB chunks) are gathered into 1 MiB writes.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<u64> {
        let at = self.len;
        if self.gathered.len() + bytes.len() > GATHER {
            self.write_gathered()?;
        }
        if bytes.len() >= GATHER {
            self.file.write_all_at(bytes, at)?;
        } else {
            if self.gathered.capacity() == 0 {
                self.gathered.reserve_exact(GATHER);
            }
            self.gathered.extend_from_slice(bytes);
        }
        self.len += bytes.len() as u64;
        Ok(at)
    }

    fn write_gathered(&mut self) -> io::Result<()> {
        if !self.gathered.is_empty() {
            let at = self.len - self.gathered.len() as u64;
            self.file.write_all_at(&self.gathered, at)?;
            self.gathered.clear();
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset` (all of them were appended).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the spool",
            ));
        }
        self.write_gathered()?;
        self.file.read_exact_at(buf, offset)
    }
}

/// `open(dir, O_TMPFILE | O_EXCL | O_RDWR, 0600)`: a file without a name
/// that can never be given one (`O_EXCL`), 0600 whatever the umask (which
/// only narrows).
fn open_tmpfile(dir: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_TMPFILE | libc::O_EXCL)
        .open(dir)
}

/// The fallback: a new file (`O_CREAT | O_EXCL`, 0600) under a random
/// name in `dir`, unlinked at once. Only a `SIGKILL` between the two calls
/// leaves it behind, empty, under a name [`crate::cleanup`] does not know.
pub(crate) fn create_unlinked(dir: &Path) -> io::Result<File> {
    let mut name = String::from(".kimberley-spool-");
    for b in crate::crypto::keys::random::<8>().map_err(io::Error::other)? {
        name.push_str(&format!("{b:02x}"));
    }
    let path = dir.join(name);
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)?;
    std::fs::remove_file(&path)?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn check_private(s: &Spool) {
        let m = s.file.metadata().unwrap();
        assert!(m.is_file());
        assert_eq!(m.mode() & 0o7777, 0o600);
        assert_eq!(m.nlink(), 0, "the spool has no name");
    }

    #[test]
    fn private_nameless_and_reads_back() {
        let t = tempfile::tempdir().unwrap();
        let mut s = Spool::create(Some(t.path())).unwrap();
        check_private(&s);
        assert_eq!(s.len, 0);
        assert_eq!(s.append(b"hello ").unwrap(), 0);
        assert_eq!(s.append(b"world").unwrap(), 6);
        assert_eq!(s.len, 11);
        let mut b = [0u8; 5];
        s.read_at(&mut b, 6).unwrap();
        assert_eq!(&b, b"world");
        assert!(s.read_at(&mut b, 7).is_err(), "past what was appended");
        // Gathered appends, one that does not fit the gathered ones, and
        // one larger than they may be: each reads back where it was put.
        let mut rng = crate::testkit::Rng(3);
        let mut put = Vec::new();
        for n in [4096, GATHER - 4096, 4096, 3 * GATHER / 2, 1, 4096] {
            let mut v = vec![0u8; n];
            rng.fill(&mut v);
            put.push((s.append(&v).unwrap(), v));
        }
        for (at, v) in put.iter().rev() {
            let mut got = vec![0u8; v.len()];
            s.read_at(&mut got, *at).unwrap();
            assert!(&got == v, "{} bytes at {at}", v.len());
        }
        assert_eq!(s.file.metadata().unwrap().len(), s.len);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
        assert!(Spool::create(Some(&t.path().join("missing"))).is_err());
    }

    #[test]
    fn the_fallback_leaves_no_name_either() {
        let t = tempfile::tempdir().unwrap();
        let f = create_unlinked(t.path()).unwrap();
        let s = Spool {
            file: f,
            len: 0,
            gathered: Vec::new(),
        };
        check_private(&s);
        assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
    }
}
