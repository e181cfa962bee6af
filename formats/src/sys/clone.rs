//! Copying file contents inside the kernel: `FICLONE` (share the extents, copy on write) and `copy_file_range(2)`.

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;

/// Makes `dst` share all of `src`'s extents (a reflink; `dst` becomes a
/// copy of `src`, size included). Fails (EOPNOTSUPP, EXDEV, EINVAL) where
/// the file system cannot share extents between the two files.
pub fn ficlone(dst: &File, src: &File) -> io::Result<()> {
    // SAFETY: FICLONE takes the source descriptor as its integer argument;
    // both descriptors are owned by `File`s that outlive the call and no
    // memory is passed.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Copies up to `len` bytes from `src` at `src_off` to `dst` at `dst_off`
/// in the kernel; returns how many were copied (0: `src` ended). The file
/// offsets of both descriptors are not used or changed.
pub fn copy_file_range(
    src: &File,
    src_off: u64,
    dst: &File,
    dst_off: u64,
    len: usize,
) -> io::Result<usize> {
    let (mut s, mut d) = match (i64::try_from(src_off), i64::try_from(dst_off)) {
        (Ok(s), Ok(d)) => (s, d),
        _ => return Err(io::Error::from_raw_os_error(libc::EINVAL)),
    };
    // SAFETY: both descriptors are owned by `File`s that outlive the call;
    // the offset pointers point to live, exclusively borrowed locals.
    let n =
        unsafe { libc::copy_file_range(src.as_raw_fd(), &mut s, dst.as_raw_fd(), &mut d, len, 0) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}
