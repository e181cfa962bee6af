//! Opening a path strictly beneath a directory (`openat2` with
//! `RESOLVE_BENEATH`, no symlinks, no magic links) and linking an open file
//! to a new name: for paths a peer names, which must not escape a
//! directory the user allowed.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::Path;

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// Opens `rel` (a relative path) beneath the directory `dir`, read-write,
/// failing if resolving it would leave `dir` or meet any symlink (EXDEV,
/// ELOOP), and never blocking on a FIFO or device.
pub fn open_beneath(dir: &File, rel: &Path) -> io::Result<File> {
    if rel.is_absolute() {
        return Err(io::Error::from_raw_os_error(libc::EXDEV));
    }
    let c = cstr(rel)?;
    // SAFETY: open_how is a plain C struct; all-zero is its "no options"
    // value, and we set the fields we use below.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `dir` is an open descriptor, `c` a NUL-terminated string and
    // `how` a valid open_how of the size passed; all outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            c.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor that nothing else owns.
    Ok(unsafe { File::from_raw_fd(fd as i32) })
}

/// Gives the open file `f` the additional name `dst` (a hard link made
/// through `/proc/self/fd`, so the file linked is the one opened, not
/// whatever a path names now). `dst` must not exist and must be on the
/// same file system.
pub fn link_open_file(f: &File, dst: &Path) -> io::Result<()> {
    let src = cstr(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())))?;
    let d = cstr(dst)?;
    // SAFETY: both are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::linkat(
            libc::AT_FDCWD,
            src.as_ptr(),
            libc::AT_FDCWD,
            d.as_ptr(),
            libc::AT_SYMLINK_FOLLOW,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stays_beneath_and_refuses_symlinks() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("d");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("sub/f"), b"x").unwrap();
        std::fs::write(t.path().join("outside"), b"secret").unwrap();
        std::os::unix::fs::symlink(t.path().join("outside"), d.join("link")).unwrap();
        std::os::unix::fs::symlink("sub", d.join("dirlink")).unwrap();
        let dir = File::open(&d).unwrap();
        assert!(open_beneath(&dir, Path::new("sub/f")).is_ok());
        assert!(open_beneath(&dir, Path::new("../outside")).is_err());
        assert!(open_beneath(&dir, Path::new("link")).is_err());
        assert!(open_beneath(&dir, Path::new("dirlink/f")).is_err());
        assert!(open_beneath(&dir, &t.path().join("outside")).is_err());
        let f = open_beneath(&dir, Path::new("sub/f")).unwrap();
        link_open_file(&f, &t.path().join("linked")).unwrap();
        assert_eq!(std::fs::read(t.path().join("linked")).unwrap(), b"x");
        assert!(link_open_file(&f, &t.path().join("linked")).is_err());
    }
}
