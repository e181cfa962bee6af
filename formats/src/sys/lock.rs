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
