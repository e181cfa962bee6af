//! Punching holes into files (`fallocate(FALLOC_FL_PUNCH_HOLE)`): a range
//! becomes zeros that take no space.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Deallocates `len` bytes at `offset` of `f`, keeping its size; the range
/// reads as zeros afterwards. Fails where the file system cannot punch.
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let (off, len) = match (i64::try_from(offset), i64::try_from(len)) {
        (Ok(o), Ok(l)) => (o, l),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    // SAFETY: fallocate on a descriptor owned by `f`, which outlives the
    // call; no memory is passed.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}
