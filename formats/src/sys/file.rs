//! File status flags (`fcntl(2)` `F_GETFL`/`F_SETFL`), duplicating a
//! descriptor (`F_DUPFD_CLOEXEC`) and starting writeback early
//! (`sync_file_range(2)`).

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::io::RawFd;

/// Sets or clears `O_NONBLOCK` on `fd`.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: F_GETFL takes no argument and only reads the descriptor's
    // flags; an invalid `fd` makes it fail with EBADF.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    let new = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    if new == flags {
        return Ok(());
    }
    // SAFETY: F_SETFL takes an int of status flags by value; nothing is
    // borrowed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, new) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Duplicates descriptor `fd` (close-on-exec), e.g. for `/dev/fd/N`.
pub fn dup(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC only reads the descriptor table; an invalid
    // `fd` fails with EBADF.
    let n = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl just returned this new descriptor; we are its only owner.
    Ok(unsafe { OwnedFd::from_raw_fd(n) })
}

/// Starts writing `fd`'s dirty pages back to disk without waiting for
/// them (`sync_file_range(SYNC_FILE_RANGE_WRITE)` over the whole file), so
/// that a later fsync has less to wait for. Failure is harmless (the
/// fsync reports real errors), so it is ignored.
pub fn start_writeback(fd: RawFd) {
    // SAFETY: sync_file_range on a descriptor the caller holds open; it
    // only starts writeback (offset 0, length 0: the whole file) and
    // borrows no memory. An invalid `fd` makes it fail with EBADF.
    unsafe {
        libc::sync_file_range(fd, 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Starts writing bytes `off..off + len` of `fd` back to disk without
/// waiting (`sync_file_range(SYNC_FILE_RANGE_WRITE)` over that range: a
/// large sequential write starts each window's writeback as it completes,
/// so the final fsync has little left). It does not make the data durable
/// (fsync does), and its failure is harmless (that fsync reports real
/// errors), so it is ignored.
pub fn start_writeback_range(fd: RawFd, off: u64, len: u64) {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    // SAFETY: sync_file_range on a descriptor the caller holds open, with
    // offsets by value; it only starts writeback and borrows no memory.
    // An invalid `fd` makes it fail with EBADF.
    unsafe {
        libc::sync_file_range(fd, off, len, libc::SYNC_FILE_RANGE_WRITE);
    }
}

/// Asks the kernel to start reading bytes `off..off + len` of `fd` into
/// the page cache (`posix_fadvise(POSIX_FADV_WILLNEED)`), so that reads of
/// them soon after find them there. It queues the reads without waiting
/// for them; its failure only means the later reads wait, so it is
/// ignored.
pub fn read_ahead(fd: RawFd, off: u64, len: u64) {
    let (Ok(off), Ok(len)) = (i64::try_from(off), i64::try_from(len)) else {
        return;
    };
    // SAFETY: posix_fadvise on a descriptor the caller holds open, with
    // offsets by value; it borrows no memory. An invalid `fd` makes it
    // fail with EBADF.
    unsafe {
        libc::posix_fadvise(fd, off, len, libc::POSIX_FADV_WILLNEED);
    }
}

/// True if `fd`'s file is on a file system of this host alone (ext2/3/4,
/// XFS, Btrfs, F2FS, tmpfs: `fstatfs(2)`'s type), where every writer goes
/// through this host's page cache, so that what it caches of the file
/// cannot be stale. False for any other (network and cluster file systems
/// among them) and if `fstatfs` fails.
pub fn on_local_fs(fd: RawFd) -> bool {
    const LOCAL: [i64; 5] = [
        0xEF53,      // ext2, ext3, ext4
        0x5846_5342, // XFS
        0x9123_683E, // Btrfs
        0xF2F5_2010, // F2FS
        0x0102_1994, // tmpfs
    ];
    // SAFETY: an all-zero statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into the struct we own and pass by
    // a valid pointer; an invalid `fd` makes it fail with EBADF.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 {
        return false;
    }
    LOCAL.contains(&(st.f_type as i64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;

    #[test]
    fn sets_and_clears() {
        let f = tempfile::tempfile().unwrap();
        let get = || {
            // SAFETY: as in `set_nonblocking`.
            unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) }
        };
        set_nonblocking(f.as_raw_fd(), true).unwrap();
        assert_ne!(get() & libc::O_NONBLOCK, 0);
        set_nonblocking(f.as_raw_fd(), false).unwrap();
        assert_eq!(get() & libc::O_NONBLOCK, 0);
        assert!(set_nonblocking(-1, false).is_err());
        assert!(dup(f.as_raw_fd()).is_ok());
        assert!(dup(987_654).is_err());
    }

    #[test]
    fn local_file_systems_are_told_apart() {
        // /tmp is ext4 or tmpfs wherever the tests run; /proc is neither.
        let f = tempfile::tempfile().unwrap();
        assert!(on_local_fs(f.as_raw_fd()));
        let p = std::fs::File::open("/proc/self/status").unwrap();
        assert!(!on_local_fs(p.as_raw_fd()));
        assert!(!on_local_fs(-1));
    }
}
