//! The control socket's file: a private default location, a socket that is
//! 0600 before anyone can reach it, no replacing of a live socket, and the
//! peer check on every connection (docs/VMM.md, "Control protocol").

use std::ffi::OsString;
use std::io::ErrorKind;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};

use kimberley_formats::fsutil;
use kimberley_formats::sys::{cred, tempdir};

use crate::error::{Error, Result};

/// A bound, listening control socket whose location and permissions have
/// been checked. Dropping it removes the socket file (if it is still ours)
/// and the private directory it created for it, if any.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
    /// (device, inode) of our socket file.
    id: (u64, u64),
    /// A directory created only for this socket (removed on drop).
    own_dir: Option<PathBuf>,
    euid: u32,
}

/// Longest path a socket address holds (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What is at the requested path before we bind.
enum Existing {
    Nothing,
    /// A socket nobody listens on (connect: ECONNREFUSED).
    Stale,
}

fn control(msg: String) -> Error {
    Error::Control(msg)
}

impl ControlSocket {
    /// Binds `path`, or when `None` a socket `PROG-PID.sock` in a private
    /// directory: `$XDG_RUNTIME_DIR/kimberley/`, else `/run/kimberley/`
    /// for root, else a fresh `kimberley-PROG-XXXXXX` directory in the
    /// temporary directory. The socket is 0600 and never reachable under
    /// `path` with another mode; a live socket at `path` is refused
    /// ("another process serves ..."), a stale one replaced, anything else
    /// refused.
    pub fn bind(path: Option<&Path>, prog: &str) -> Result<ControlSocket> {
        let euid = cred::euid();
        match path {
            Some(p) => bind_at(p, None, euid),
            None => bind_default(prog, euid),
        }
    }

    /// Where the socket is.
    pub fn path(&self) -> &Path {
        &self.path
    }

    pub(crate) fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// The next pending connection from an allowed peer (our euid or
    /// root), non-blocking; None when none is pending. Connections from
    /// other uids are closed and logged on stderr.
    pub(crate) fn accept(&self) -> Option<UnixStream> {
        loop {
            let s = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
                Err(_) => return None,
            };
            match cred::peer(s.as_raw_fd()) {
                Ok(p) if p.uid == self.euid || p.uid == 0 => {
                    if s.set_nonblocking(true).is_ok() {
                        return Some(s);
                    }
                }
                Ok(p) => eprintln!(
                    "control socket {}: refused a connection from uid {} (pid {}): only {} may use it",
                    self.path.display(),
                    p.uid,
                    p.pid,
                    if self.euid == 0 {
                        "root".to_string()
                    } else {
                        format!("uid {} and root", self.euid)
                    }
                ),
                Err(e) => eprintln!(
                    "control socket {}: refused a connection whose peer cannot be checked: {e}",
                    self.path.display()
                ),
            }
        }
    }
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        if let Ok(m) = std::fs::symlink_metadata(&self.path) {
            if (m.dev(), m.ino()) == self.id {
                let _ = std::fs::remove_file(&self.path);
            }
        }
        if let Some(d) = &self.own_dir {
            let _ = std::fs::remove_dir(d);
        }
    }
}

/// Directories for default sockets, best first.
fn default_dirs(xdg_runtime_dir: Option<OsString>, euid: u32) -> Vec<PathBuf> {
    let mut v = Vec::new();
    if let Some(x) = xdg_runtime_dir.map(PathBuf::from) {
        if x.is_absolute() {
            v.push(x.join("kimberley"));
        }
    }
    if euid == 0 {
        v.push(PathBuf::from("/run/kimberley"));
    }
    v
}

/// Makes `dir` a directory only we can use: creates it 0700, or checks an
/// existing one is a real directory, ours, without group or other access,
/// in a parent that nobody else can rename it out of.
fn private_dir(dir: &Path, euid: u32) -> std::result::Result<(), String> {
    let parent = fsutil::parent_of(dir);
    let pm = std::fs::metadata(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let open_to_others = pm.mode() & 0o022 != 0 && pm.mode() & 0o1000 == 0;
    if !pm.is_dir() || (pm.uid() != euid && pm.uid() != 0) || open_to_others {
        return Err(format!(
            "{} is not a directory owned by us or root and closed to others",
            parent.display()
        ));
    }
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("creating {}: {e}", dir.display())),
    }
    let m = std::fs::symlink_metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !m.file_type().is_dir() || m.uid() != euid || m.mode() & 0o077 != 0 {
        return Err(format!(
            "{} is not a private directory of uid {euid}",
            dir.display()
        ));
    }
    // The umask may have taken bits of ours; group and other have none.
    if m.mode() & 0o700 != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", dir.display()))?;
    }
    Ok(())
}

fn bind_default(prog: &str, euid: u32) -> Result<ControlSocket> {
    let dirs = default_dirs(std::env::var_os("XDG_RUNTIME_DIR"), euid);
    bind_in(&dirs, prog, euid)
}

/// Binds `PROG-PID.sock` in the first of `dirs` that is (or can be made)
/// private, else in a fresh private directory.
fn bind_in(dirs: &[PathBuf], prog: &str, euid: u32) -> Result<ControlSocket> {
    let name = format!("{prog}-{}.sock", std::process::id());
    for d in dirs {
        if private_dir(d, euid).is_ok() {
            return bind_at(&d.join(&name), None, euid);
        }
    }
    let prefix = std::env::temp_dir().join(format!("kimberley-{prog}-"));
    let d = tempdir::create(&prefix).map_err(|e| {
        Error::io(
            format!("creating a private directory {}*", prefix.display()),
            e,
        )
    })?;
    match bind_at(&d.join(&name), Some(d.clone()), euid) {
        Ok(s) => Ok(s),
        Err(e) => {
            let _ = std::fs::remove_dir(&d);
            Err(e)
        }
    }
}

/// Looks at what is at `path`: nothing, a stale socket, or something that
/// must not be replaced (an error).
fn probe(path: &Path) -> Result<Existing> {
    let m = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Existing::Nothing),
        Err(e) => return Err(Error::io(format!("checking {}", path.display()), e)),
    };
    if !m.file_type().is_socket() {
        return Err(control(format!(
            "{} exists and is not a socket; not replacing it",
            path.display()
        )));
    }
    match connect(path) {
        Ok(_) => Err(control(format!(
            "another process serves {}",
            path.display()
        ))),
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => Ok(Existing::Stale),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(Existing::Nothing),
        Err(e) => Err(control(format!(
            "{} exists and cannot be probed ({e}); not replacing it",
            path.display()
        ))),
    }
}

/// `p` as a socket address: itself, or when it is longer than an address
/// holds, the same file through `/proc/self/fd` (with the open directory
/// that keeps that path valid).
fn addressable(p: &Path) -> std::io::Result<(PathBuf, Option<std::fs::File>)> {
    if p.as_os_str().len() <= MAX_SOCKET_PATH {
        return Ok((p.to_path_buf(), None));
    }
    let name = p
        .file_name()
        .ok_or_else(|| std::io::Error::from(ErrorKind::InvalidInput))?;
    let d = std::fs::File::open(fsutil::parent_of(p))?;
    let short = PathBuf::from(format!("/proc/self/fd/{}", d.as_raw_fd())).join(name);
    Ok((short, Some(d)))
}

fn connect(p: &Path) -> std::io::Result<UnixStream> {
    let (a, _dir) = addressable(p)?;
    UnixStream::connect(a)
}

/// A directory removed (with what is left in it) when dropped.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Binds a socket inside a fresh private directory next to `path`, makes
/// it 0600 there, then moves it to `path`: without replacing anything, or
/// swapping it with a stale socket (and swapping back if that turned out
/// to be live after all).
fn bind_at(path: &Path, own_dir: Option<PathBuf>, euid: u32) -> Result<ControlSocket> {
    let name = path
        .file_name()
        .ok_or_else(|| control(format!("{} is not a file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = fsutil::parent_of(path);
    for _ in 0..3 {
        let existing = probe(path)?;
        // `.NAME.XXXXXX/sock` (`.XXXXXX` for a very long NAME).
        let prefix = if name.len() <= 64 {
            parent.join(format!(".{name}."))
        } else {
            parent.join(".")
        };
        let tmp = TempDir(tempdir::create(&prefix).map_err(|e| {
            Error::io(
                format!("creating a private directory in {}", parent.display()),
                e,
            )
        })?);
        let inner = tmp.0.join("sock");
        let listener = addressable(&inner)
            .and_then(|(a, _dir)| UnixListener::bind(a))
            .map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
        std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| Error::io(format!("chmod {}", inner.display()), e))?;
        let m = std::fs::symlink_metadata(&inner)
            .map_err(|e| Error::io(format!("stat {}", inner.display()), e))?;
        match existing {
            Existing::Nothing => match fsutil::rename_noreplace(&inner, path) {
                Ok(()) => {}
                // Something appeared meanwhile: look again.
                Err(kimberley_formats::Error::Exists(_)) => continue,
                Err(e) => return Err(e.into()),
            },
            Existing::Stale => {
                if let Err(e) = fsutil::exchange(&inner, path) {
                    if std::fs::symlink_metadata(path).is_err() {
                        continue; // it went away meanwhile: look again
                    }
                    return Err(e.into());
                }
                // The old socket is now `inner`: unless it still refuses
                // connections, put it back.
                match connect(&inner) {
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
                    _ => {
                        let _ = fsutil::exchange(&inner, path);
                        return Err(control(format!(
                            "another process serves {}",
                            path.display()
                        )));
                    }
                }
            }
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("set socket non-blocking", e))?;
        return Ok(ControlSocket {
            listener,
            path: path.to_path_buf(),
            id: (m.dev(), m.ino()),
            own_dir,
            euid,
        });
    }
    Err(control(format!(
        "{} keeps changing while binding it",
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn default_locations() {
        let x = Some(OsString::from("/run/user/1000"));
        assert_eq!(
            default_dirs(x.clone(), 1000),
            [PathBuf::from("/run/user/1000/kimberley")]
        );
        assert_eq!(
            default_dirs(x, 0),
            [
                PathBuf::from("/run/user/1000/kimberley"),
                PathBuf::from("/run/kimberley")
            ]
        );
        assert_eq!(default_dirs(None, 0), [PathBuf::from("/run/kimberley")]);
        assert!(default_dirs(None, 1000).is_empty());
        assert!(default_dirs(Some("relative".into()), 1000).is_empty());
    }

    #[test]
    fn private_dir_checks() {
        let euid = cred::euid();
        let t = tempdir::create(&std::env::temp_dir().join("kimberley-ctl-test-")).unwrap();
        let _g = TempDir(t.clone());
        let d = t.join("kimberley");
        private_dir(&d, euid).unwrap();
        assert_eq!(mode(&d), 0o700);
        private_dir(&d, euid).unwrap();
        // Open to others: refused, not repaired.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(private_dir(&d, euid).is_err());
        // Someone else's: refused.
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(private_dir(&d, euid + 1).is_err());
        // A symlink to a private directory: refused.
        let l = t.join("link");
        std::os::unix::fs::symlink(&d, &l).unwrap();
        assert!(private_dir(&l, euid).is_err());
        // In a parent others may write to (no sticky bit): refused.
        let open = t.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(private_dir(&open.join("kimberley"), euid).is_err());
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o1777)).unwrap();
        private_dir(&open.join("kimberley"), euid).unwrap();
    }

    #[test]
    fn falls_back_to_a_fresh_private_directory() {
        let euid = cred::euid();
        let t = tempdir::create(&std::env::temp_dir().join("kimberley-ctl-test-")).unwrap();
        let _g = TempDir(t.clone());
        let open = t.join("open");
        std::fs::create_dir(&open).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
        let s = bind_in(&[open.join("kimberley")], "test", euid).unwrap();
        let d = s.path().parent().unwrap().to_path_buf();
        let tmp_prefix = std::env::temp_dir().join("kimberley-test-");
        assert!(
            d.to_string_lossy()
                .starts_with(&*tmp_prefix.to_string_lossy()),
            "{d:?}"
        );
        assert_eq!(d.file_name().unwrap().len(), "kimberley-test-".len() + 6);
        assert_eq!(
            s.path().file_name().unwrap().to_string_lossy(),
            format!("test-{}.sock", std::process::id())
        );
        assert_eq!(mode(&d), 0o700);
        assert_eq!(mode(s.path()), 0o600);
        // A second one gets another directory.
        let s2 = bind_in(&[], "test", euid).unwrap();
        assert_ne!(s2.path(), s.path());
        drop(s);
        drop(s2);
        assert!(!d.exists(), "the private directory was left behind");
        assert!(!open.join("kimberley").exists());
    }

    #[test]
    fn replaces_stale_refuses_live_and_others() {
        let euid = cred::euid();
        let t = tempdir::create(&std::env::temp_dir().join("kimberley-ctl-test-")).unwrap();
        let _g = TempDir(t.clone());
        let p = t.join("ctl.sock");
        // Stale: a socket file nobody listens on.
        drop(UnixListener::bind(&p).unwrap());
        let s = bind_at(&p, None, euid).unwrap();
        assert_eq!(mode(&p), 0o600);
        // Live: refused, and the live one stays.
        let e = bind_at(&p, None, euid).unwrap_err().to_string();
        assert!(e.contains("another process serves"), "{e}");
        assert!(UnixStream::connect(&p).is_ok());
        drop(s);
        assert!(!p.exists());
        // Not a socket, or a symlink: refused and kept.
        std::fs::write(&p, b"precious").unwrap();
        let e = bind_at(&p, None, euid).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read(&p).unwrap(), b"precious");
        std::fs::remove_file(&p).unwrap();
        std::os::unix::fs::symlink("/nonexistent", &p).unwrap();
        assert!(bind_at(&p, None, euid).is_err());
        std::fs::remove_file(&p).unwrap();
        // Nothing left behind next to it.
        assert_eq!(std::fs::read_dir(&t).unwrap().count(), 0);
    }

    #[test]
    fn long_paths() {
        let euid = cred::euid();
        let t = tempdir::create(&std::env::temp_dir().join("kimberley-ctl-test-")).unwrap();
        let _g = TempDir(t.clone());
        let base = t.as_os_str().len() + 1;
        // The longest name; a short name in a deep directory; a path
        // longer than a socket address (clients may use a relative one).
        let long = t.join("s".repeat(MAX_SOCKET_PATH - base));
        let d = t.join("d".repeat(MAX_SOCKET_PATH - base - 7));
        std::fs::create_dir(&d).unwrap();
        for p in [long, d.join("a.sock"), d.join("longer.sock")] {
            assert!(p.as_os_str().len() >= MAX_SOCKET_PATH);
            let s = bind_at(&p, None, euid).unwrap();
            assert!(connect(&p).is_ok());
            // Live: refused; stale: replaced.
            let e = bind_at(&p, None, euid).unwrap_err().to_string();
            assert!(e.contains("another process serves"), "{e}");
            drop(s);
            drop(UnixListener::bind(addressable(&p).unwrap().0).unwrap());
            let s = bind_at(&p, None, euid).unwrap();
            assert!(connect(&p).is_ok());
            drop(s);
            assert!(!p.exists());
        }
        assert_eq!(std::fs::read_dir(&t).unwrap().count(), 1);
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
    }

    #[test]
    fn drop_leaves_a_replaced_socket_alone() {
        let euid = cred::euid();
        let t = tempdir::create(&std::env::temp_dir().join("kimberley-ctl-test-")).unwrap();
        let _g = TempDir(t.clone());
        let p = t.join("ctl.sock");
        let s = bind_at(&p, None, euid).unwrap();
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"someone else's").unwrap();
        drop(s);
        assert_eq!(std::fs::read(&p).unwrap(), b"someone else's");
    }
}
