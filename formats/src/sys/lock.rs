//! Advisory whole-file locks (`flock(2)`), released when the file closes.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Shared or exclusive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// A new open file description of the file `file` is open on (through
/// `/proc/self/fd`, read-only): it holds a lock of its own, unlike a
/// duplicated descriptor, which shares `file`'s. The same inode, never a
/// file found again by its path.
pub fn reopen(file: &File) -> io::Result<File> {
    let f = File::open(format!("/proc/self/fd/{}", file.as_raw_fd()))?;
    let (a, b) = (f.metadata()?, file.metadata()?);
    if std::os::unix::fs::MetadataExt::ino(&a) != std::os::unix::fs::MetadataExt::ino(&b)
        || std::os::unix::fs::MetadataExt::dev(&a) != std::os::unix::fs::MetadataExt::dev(&b)
    {
        return Err(io::Error::other("reopened a different file"));
    }
    Ok(f)
}

/// Takes the lock on `file`, waiting for it (`block`) or failing with
/// `WouldBlock` if another holder has it. Interrupted waits are retried.
pub fn flock(file: &File, mode: Mode, block: bool) -> io::Result<()> {
    let mut op = match mode {
        Mode::Shared => libc::LOCK_SH,
        Mode::Exclusive => libc::LOCK_EX,
    };
    if !block {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock(2) on a descriptor `file` keeps open for the call;
        // it borrows no memory.
        if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reopened_file_holds_its_own_lock() {
        let t = tempfile::NamedTempFile::new().unwrap();
        let a = t.reopen().unwrap();
        let dup = a.try_clone().unwrap();
        let fresh = reopen(&a).unwrap();
        flock(&a, Mode::Shared, true).unwrap();
        // A duplicate shares the lock (converting it), a reopened file not.
        flock(&dup, Mode::Exclusive, false).unwrap();
        flock(&dup, Mode::Shared, false).unwrap();
        flock(&fresh, Mode::Shared, false).unwrap();
        let e = flock(&a, Mode::Exclusive, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn exclusive_excludes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("l");
        let a = File::create(&p).unwrap();
        let b = File::open(&p).unwrap();
        flock(&a, Mode::Shared, true).unwrap();
        flock(&b, Mode::Shared, false).unwrap();
        drop(b);
        let b = File::open(&p).unwrap();
        let e = flock(&b, Mode::Exclusive, false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        drop(a);
        flock(&b, Mode::Exclusive, false).unwrap();
    }
}
