//! File-system helpers: private atomic outputs, opening inputs that must be
//! regular files, hole-preserving copies, positional reads that treat the
//! end of a file as zeros.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::cleanup;
use crate::error::{Error, IoContext, Result};
use crate::sparse::{data_extents, Range};

/// Reads `buf.len()` bytes at `offset`; bytes at or past `limit` (the
/// logical size) read as zeros.
pub fn read_at_zero_padded(file: &File, buf: &mut [u8], offset: u64, limit: u64) -> io::Result<()> {
    let avail = limit.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(avail);
    if !head.is_empty() {
        read_exact_or_zero(file, head, offset)?;
    }
    tail.fill(0);
    Ok(())
}

/// `read_exact_at`, but a file shorter than expected reads as zeros beyond
/// its end (a sparse image truncated by a tool is still the same image).
fn read_exact_or_zero(file: &File, mut buf: &mut [u8], mut offset: u64) -> io::Result<()> {
    while !buf.is_empty() {
        match file.read_at(buf, offset) {
            Ok(0) => {
                buf.fill(0);
                return Ok(());
            }
            Ok(n) => {
                buf = &mut buf[n..];
                offset += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Mode of every file an output is made of (set in the `open(2)` that
/// creates it, never changed afterwards).
pub const PRIVATE_FILE_MODE: u32 = 0o600;
/// Mode of every directory an output is made of (set in `mkdir(2)`).
pub const PRIVATE_DIR_MODE: u32 = 0o700;

/// Creates the new file `path` (refusing anything already there, a
/// dangling symbolic link included) readable and writable by its owner
/// only, from the first system call.
pub fn create_private(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(path)
}

/// Creates the new directory `path` accessible by its owner only, from the
/// first system call.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    DirBuilder::new().mode(PRIVATE_DIR_MODE).create(path)
}

/// True if anything is at `path`, a dangling symbolic link included
/// (`lstat(2)`, where `Path::exists` follows links).
pub fn occupied(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok()
}

/// Opens `path` (read-only, or read-write with `write`) when it is a
/// regular file: a symbolic link as its last component is not followed
/// (`O_NOFOLLOW`), a FIFO or device is not waited on (`O_NONBLOCK`, cleared
/// again once the file is known to be regular), and the type is checked on
/// the opened descriptor (`fstat(2)`), so the file checked is the file
/// used. Take sizes from `file.metadata()`, not from the path.
pub fn open_regular(path: &Path, write: bool) -> io::Result<File> {
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            let link = fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
            if e.raw_os_error() == Some(libc::ELOOP) && link {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "is a symbolic link (not followed)",
                )
            } else {
                e
            }
        })?;
    check_regular(&file)?;
    crate::sys::file::set_nonblocking(file.as_raw_fd(), false)?;
    Ok(file)
}

/// Refuses an opened file that is not a regular file, naming what it is.
pub fn check_regular(file: &File) -> io::Result<()> {
    let t = file.metadata()?.file_type();
    if t.is_file() {
        return Ok(());
    }
    let what = if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_char_device() || t.is_block_device() {
        "a device"
    } else {
        "not a regular file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("is {what}, not a regular file"),
    ))
}

/// True if `a` and `b` are the same file (device and inode).
pub fn same_file(a: &fs::Metadata, b: &fs::Metadata) -> bool {
    use std::os::unix::fs::MetadataExt;
    a.dev() == b.dev() && a.ino() == b.ino()
}

/// fsyncs a directory so a rename inside it is durable.
pub fn sync_dir(dir: &Path) -> Result<()> {
    let d = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    File::open(d)
        .and_then(|f| f.sync_all())
        .ctx(|| format!("syncing directory {}", d.display()))
}

/// The parent directory of `path` ("." for a bare name).
pub fn parent_of(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// A temporary sibling name for `path`: `.NAME.tmp-PID-N`. Anything with
/// this shape is an unfinished output.
pub fn temp_sibling(path: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let n = N.fetch_add(1, Ordering::Relaxed);
    parent_of(path).join(format!(".{name}.tmp-{}-{n}", std::process::id()))
}

/// A file being written under a temporary name, private (0600) from its
/// creation; [`AtomicFile::commit`] fsyncs and renames it into place.
/// Dropped uncommitted, or interrupted by SIGINT/SIGTERM (see
/// [`crate::cleanup`]), it is removed. Creating one removes the stale
/// temporaries of dead processes next to it ([`crate::cleanup::sweep`]).
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
    overwrite: bool,
    reg: cleanup::Registered,
}

impl AtomicFile {
    /// Creates the temporary file next to `dest`. Unless `overwrite`,
    /// refuses anything at `dest` (a dangling symbolic link included), now
    /// and at the commit.
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        if !overwrite && occupied(dest) {
            return Err(Error::Exists(dest.to_path_buf()));
        }
        cleanup::sweep(&parent_of(dest));
        let tmp = temp_sibling(dest);
        let (file, reg) = cleanup::create(&tmp, dest, cleanup::Kind::File, || create_private(&tmp))
            .ctx(|| format!("creating {}", tmp.display()))?;
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            dest: dest.to_path_buf(),
            overwrite,
            reg,
        })
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("file present until commit")
    }

    /// fsync, rename into place (without replacing anything unless
    /// `overwrite`), fsync the directory. On failure the temporary file is
    /// removed.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.as_ref().expect("file present until commit");
        file.sync_all()
            .ctx(|| format!("syncing {}", self.tmp.display()))?;
        cleanup::commit(&self.reg, || {
            if self.overwrite {
                // rename(2) replaces whatever is at `dest` (a link itself,
                // never its target) atomically.
                fs::rename(&self.tmp, &self.dest)
                    .ctx(|| format!("renaming {} to {}", self.tmp.display(), self.dest.display()))
            } else {
                rename_noreplace(&self.tmp, &self.dest)
            }
        })?;
        self.file = None;
        sync_dir(&parent_of(&self.dest))
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn renameat2(from: &Path, to: &Path, flags: libc::c_uint) -> Result<(), io::Error> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
    };
    let (a, b) = (c(from)?, c(to)?);
    // SAFETY: both pointers are valid NUL-terminated strings that outlive
    // the call; AT_FDCWD makes the paths relative to the working directory.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            flags,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// rename(2) that fails with [`Error::Exists`] instead of replacing.
pub fn rename_noreplace(from: &Path, to: &Path) -> Result<()> {
    match renameat2(from, to, libc::RENAME_NOREPLACE) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Err(Error::Exists(to.to_path_buf())),
        Err(e) => Err(Error::io(
            format!("renaming {} to {}", from.display(), to.display()),
            e,
        )),
    }
}

/// Atomically swaps two paths (both must exist).
pub fn exchange(a: &Path, b: &Path) -> Result<()> {
    renameat2(a, b, libc::RENAME_EXCHANGE)
        .ctx(|| format!("swapping {} and {}", a.display(), b.display()))
}

/// A scratch directory, removed with its contents when dropped, or when
/// SIGINT/SIGTERM interrupts the process (see [`crate::cleanup`]).
#[derive(Debug)]
pub struct ScratchDir {
    path: PathBuf,
    _reg: cleanup::Registered,
}

impl ScratchDir {
    /// A new name for a scratch directory next to `near`
    /// (`.NAME.tmp-PID-N`), registered for removal; whoever fills it
    /// creates it (e.g. with [`AtomicDir`], whose commit renames into it).
    pub fn next_to(near: &Path) -> ScratchDir {
        cleanup::sweep(&parent_of(near));
        let path = temp_sibling(near);
        let _reg = cleanup::register(&path, &path, cleanup::Kind::Scratch);
        ScratchDir { path, _reg }
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A directory being filled under a temporary name; committed by rename.
/// Dropped uncommitted, it is removed with its contents.
///
/// Fill it with [`create_private`] so its files are private too.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
    replace: bool,
    reg: cleanup::Registered,
}

impl AtomicDir {
    /// Creates the temporary directory, private (0700) from its creation.
    /// Refuses anything at `dest` (a dangling symbolic link included), now
    /// and at the commit.
    pub fn create(dest: &Path) -> Result<Self> {
        if occupied(dest) {
            return Err(Error::Exists(dest.to_path_buf()));
        }
        Self::start(dest, false)
    }

    fn start(dest: &Path, replace: bool) -> Result<Self> {
        cleanup::sweep(&parent_of(dest));
        let tmp = temp_sibling(dest);
        let ((), reg) =
            cleanup::create(&tmp, dest, cleanup::Kind::Dir, || create_private_dir(&tmp))
                .ctx(|| format!("creating {}", tmp.display()))?;
        Ok(AtomicDir {
            tmp,
            dest: dest.to_path_buf(),
            done: false,
            replace,
            reg,
        })
    }

    /// Like [`AtomicDir::create`], for a `dest` that exists and is to be
    /// replaced as a whole at commit (swapped atomically, then removed).
    pub fn create_replacing(dest: &Path) -> Result<Self> {
        if !dest.is_dir() {
            return Err(Error::Invalid(format!(
                "{} is not a directory",
                dest.display()
            )));
        }
        Self::start(dest, true)
    }

    /// The temporary directory to fill.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The final name.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Syncs the directory (when `sync`), renames it into place (refusing
    /// to replace an existing one), syncs the parent.
    pub fn commit(mut self, sync: bool) -> Result<()> {
        if sync {
            sync_dir(&self.tmp)?;
        }
        if self.replace {
            cleanup::commit(&self.reg, || exchange(&self.tmp, &self.dest))?;
            // The old directory is now at the temporary name.
            fs::remove_dir_all(&self.tmp)
                .ctx(|| format!("removing the old {}", self.dest.display()))?;
        } else {
            cleanup::commit(&self.reg, || rename_noreplace(&self.tmp, &self.dest))?;
        }
        self.done = true;
        if sync {
            sync_dir(&parent_of(&self.dest))?;
        }
        Ok(())
    }
}

impl Drop for AtomicDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = fs::remove_dir_all(&self.tmp);
        }
    }
}

/// Copies the data extents of `src` (logical size `size`) into the new file
/// `dst`, leaving holes as holes and written zeros as written zeros. Calls
/// `on_block(offset, bytes)` for every data block copied (for hashing).
pub fn copy_sparse(
    src: &File,
    size: u64,
    dst: &File,
    mut on_block: impl FnMut(u64, &[u8]) -> Result<()>,
) -> Result<Vec<Range>> {
    dst.set_len(size).ctx(|| "sizing a copy".into())?;
    let extents = data_extents(src, size).ctx(|| "finding data extents".into())?;
    let mut buf = vec![0u8; 8 << 20];
    for &(start, end) in &extents {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            read_at_zero_padded(src, &mut buf[..n], pos, size)
                .ctx(|| "reading a source image".into())?;
            dst.write_all_at(&buf[..n], pos)
                .ctx(|| "writing a copy".into())?;
            on_block(pos, &buf[..n])?;
            pos += n as u64;
        }
    }
    Ok(extents)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use std::process::Command;

    const CHILD: &str = "KIMBERLEY_TEST_UMASK_CHILD";

    /// The permission bits of `p` (not following a symbolic link).
    pub(crate) fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    /// The umask is per process: reruns test `name` (its full path) in a
    /// child started with umask 000 and asserts it passed. Returns true in
    /// that child, which then runs the test body.
    pub(crate) fn in_child_with_umask_000(name: &str) -> bool {
        if std::env::var(CHILD).as_deref() == Ok(name) {
            // Show the umask really is 000: a plain create is world-writable.
            let t = tempfile::tempdir().unwrap();
            let p = t.path().join("control");
            File::create(&p).unwrap();
            assert_eq!(mode(&p), 0o666, "the child's umask is not 000");
            return true;
        }
        let exe = std::env::current_exe().unwrap();
        let o = Command::new("sh")
            .args(["-c", "umask 000 && exec \"$0\" \"$@\""])
            .arg(exe)
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, name)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("1 passed"),
            "{name} under umask 000:\n{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        false
    }

    #[test]
    fn outputs_are_private_from_creation() {
        if !in_child_with_umask_000("fsutil::tests::outputs_are_private_from_creation") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("key");
        let f = AtomicFile::create(&key, false).unwrap();
        // What a watcher on the directory can open before the commit.
        assert_eq!(mode(&f.tmp), 0o600, "temporary file");
        f.commit().unwrap();
        assert_eq!(mode(&key), 0o600);

        let json = t.path().join("stats.json");
        let f = AtomicFile::create(&json, true).unwrap();
        assert_eq!(mode(&f.tmp), 0o600, "temporary file (overwrite)");
        f.commit().unwrap();
        assert_eq!(mode(&json), 0o600);

        let d = t.path().join("vm");
        let a = AtomicDir::create(&d).unwrap();
        assert_eq!(mode(a.path()), 0o700, "temporary directory");
        a.commit(false).unwrap();
        assert_eq!(mode(&d), 0o700);
    }

    #[test]
    fn open_regular_refuses_links_fifos_and_directories() {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        fs::write(p("file"), b"data").unwrap();
        std::os::unix::fs::symlink(p("file"), p("link")).unwrap();
        std::os::unix::fs::symlink(p("nothing"), p("dangling")).unwrap();
        fs::create_dir(p("dir")).unwrap();
        let ok = Command::new("mkfifo").arg(p("fifo")).status().unwrap();
        assert!(ok.success());
        for write in [false, true] {
            let f = open_regular(&p("file"), write).unwrap();
            assert_eq!(f.metadata().unwrap().len(), 4);
            for (n, why) in [
                ("link", "symbolic link"),
                ("dangling", "symbolic link"),
                ("fifo", "FIFO"),
            ] {
                let e = open_regular(&p(n), write).expect_err(n).to_string();
                assert!(e.contains(why), "{n}: {e}");
            }
            assert!(open_regular(&p("dir"), write).is_err());
            assert!(open_regular(&p("nothing"), write).is_err());
        }
        let e = open_regular(&p("dir"), false).unwrap_err().to_string();
        assert!(e.contains("directory"), "{e}");
        // A device: opened without blocking, then refused.
        let e = open_regular(Path::new("/dev/null"), false).unwrap_err();
        assert!(e.to_string().contains("device"), "{e}");
        // The file it returns blocks again (O_NONBLOCK cleared).
        let f = open_regular(&p("file"), false).unwrap();
        // SAFETY: F_GETFL only reads the flags of a descriptor we own.
        let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
    }

    #[test]
    fn occupied_sees_dangling_links() {
        let t = tempfile::tempdir().unwrap();
        let l = t.path().join("l");
        assert!(!occupied(&l));
        std::os::unix::fs::symlink(t.path().join("nothing"), &l).unwrap();
        assert!(occupied(&l) && !l.exists());
    }

    #[test]
    fn no_replace_commit_keeps_a_dangling_symlink() {
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let target = t.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, &out).unwrap();
        // Present before: refused at creation.
        assert!(matches!(
            AtomicFile::create(&out, false),
            Err(Error::Exists(_))
        ));
        assert!(matches!(AtomicDir::create(&out), Err(Error::Exists(_))));
        // Appearing meanwhile: refused at commit.
        fs::remove_file(&out).unwrap();
        let f = AtomicFile::create(&out, false).unwrap();
        let tmp = f.tmp.clone();
        std::os::unix::fs::symlink(&target, &out).unwrap();
        assert!(matches!(f.commit(), Err(Error::Exists(_))));
        assert_eq!(fs::read_link(&out).unwrap(), target);
        assert!(!target.exists() && !tmp.exists());
    }
}
