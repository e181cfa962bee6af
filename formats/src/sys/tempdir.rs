//! `mkdtemp(3)`: a new directory with an unpredictable name, mode 0700.

use std::ffi::{CString, OsString};
use std::io;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// Creates the directory `{prefix}XXXXXX` (six random characters), private
/// to us (0700 whatever the umask), and returns its path. It fails rather
/// than use a directory that already exists.
pub fn create(prefix: &Path) -> io::Result<PathBuf> {
    let mut t = prefix.as_os_str().as_bytes().to_vec();
    t.extend_from_slice(b"XXXXXX");
    let c = CString::new(t).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let mut buf = c.into_bytes_with_nul();
    // SAFETY: `buf` is a writable NUL-terminated template ending in
    // "XXXXXX"; mkdtemp replaces those six bytes in place and returns
    // either NULL or a pointer into `buf`.
    let r = unsafe { libc::mkdtemp(buf.as_mut_ptr().cast()) };
    if r.is_null() {
        return Err(io::Error::last_os_error());
    }
    buf.pop();
    let p = PathBuf::from(OsString::from_vec(buf));
    // mkdir(2) gave 0700 minus the umask: only ever narrower than 0700,
    // so widening it to exactly 0700 opens nothing to anyone else.
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o700))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn private_and_fresh() {
        let t = std::env::temp_dir().join("kimberley-tempdir-test-");
        let a = create(&t).unwrap();
        let b = create(&t).unwrap();
        assert_ne!(a, b);
        let m = std::fs::symlink_metadata(&a).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o777, 0o700);
        assert!(a
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("kimberley-tempdir-test-"));
        std::fs::remove_dir(&a).unwrap();
        std::fs::remove_dir(&b).unwrap();
        assert!(create(Path::new("/nonexistent-dir/x-")).is_err());
    }
}
