//! File-system helpers: atomic outputs, hole-preserving copies, positional
//! reads that treat the end of a file as zeros.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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

/// A file being written under a temporary name; [`AtomicFile::commit`]
/// fsyncs and renames it into place. Dropped uncommitted, it is removed.
pub struct AtomicFile {
    file: Option<File>,
    tmp: PathBuf,
    dest: PathBuf,
}

impl AtomicFile {
    /// Creates the temporary file next to `dest`. Refuses an existing `dest`
    /// unless `overwrite`.
    pub fn create(dest: &Path, overwrite: bool) -> Result<Self> {
        if !overwrite && dest.exists() {
            return Err(Error::Exists(dest.to_path_buf()));
        }
        let tmp = temp_sibling(dest);
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&tmp)
            .ctx(|| format!("creating {}", tmp.display()))?;
        Ok(AtomicFile {
            file: Some(file),
            tmp,
            dest: dest.to_path_buf(),
        })
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        self.file.as_ref().expect("file present until commit")
    }

    /// fsync, rename into place, fsync the directory.
    pub fn commit(mut self) -> Result<()> {
        let file = self.file.take().expect("file present until commit");
        file.sync_all()
            .ctx(|| format!("syncing {}", self.tmp.display()))?;
        drop(file);
        // rename(2) replaces an existing destination atomically (`overwrite`
        // was checked at creation).
        fs::rename(&self.tmp, &self.dest)
            .ctx(|| format!("renaming {} to {}", self.tmp.display(), self.dest.display()))?;
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

/// A scratch directory, removed with its contents when dropped.
#[derive(Debug)]
pub struct ScratchDir(pub PathBuf);

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A directory being filled under a temporary name; committed by rename.
/// Dropped uncommitted, it is removed with its contents.
pub struct AtomicDir {
    tmp: PathBuf,
    dest: PathBuf,
    done: bool,
    replace: bool,
}

impl AtomicDir {
    /// Creates the temporary directory. Refuses an existing `dest`.
    pub fn create(dest: &Path) -> Result<Self> {
        if dest.exists() {
            return Err(Error::Exists(dest.to_path_buf()));
        }
        Self::start(dest, false)
    }

    fn start(dest: &Path, replace: bool) -> Result<Self> {
        let tmp = temp_sibling(dest);
        fs::create_dir(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        Ok(AtomicDir {
            tmp,
            dest: dest.to_path_buf(),
            done: false,
            replace,
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
            exchange(&self.tmp, &self.dest)?;
            // The old directory is now at the temporary name.
            fs::remove_dir_all(&self.tmp)
                .ctx(|| format!("removing the old {}", self.dest.display()))?;
        } else {
            rename_noreplace(&self.tmp, &self.dest)?;
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
