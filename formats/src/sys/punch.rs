//! Punching holes into files (`fallocate(FALLOC_FL_PUNCH_HOLE)`) and
//! zeroing ranges in place (`FALLOC_FL_ZERO_RANGE`).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Deallocates `len` bytes at `offset` of `f`, keeping its size; the range
/// reads as zeros afterwards. Fails where the file system cannot punch.
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Makes `len` bytes at `offset` of `f` read as zeros while keeping them
/// allocated, keeping the file's size. Fails where the file system cannot
/// (then the caller writes zeros).
pub fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Whether `e` says the file system does not support the `fallocate`
/// mode (as opposed to an I/O error): the caller may write zeros instead.
pub fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL)
    )
}

fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    // SAFETY: fallocate on a descriptor owned by `f`, which outlives the
    // call; no memory is passed.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
