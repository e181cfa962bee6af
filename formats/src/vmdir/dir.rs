//! Opening and writing VM directories.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::manifest::{Component, Manifest};
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{create_private, open_regular, same_file, AtomicDir};
use crate::sparse::data_extents;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// An opened, structurally valid VM directory. Its manifest and every
/// component were opened once, without following symbolic links, and
/// checked to be regular files of the manifest's sizes; the component
/// files stay open, and everything read through [`VmDir::open_component`]
/// and [`VmDir::read_component`] comes from those very files, whatever
/// happens to the paths afterwards.
#[derive(Debug, Clone)]
pub struct VmDir {
    /// Where it is.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
    files: Vec<Arc<File>>,
}

impl VmDir {
    /// Reads and validates the manifest and opens every component
    /// (FORMAT.md §5.3): each must be a regular file (not a symbolic link,
    /// FIFO, device or directory) whose length is its manifest size.
    pub fn open(path: &Path) -> Result<VmDir> {
        let bad = |why: String| Error::VmDir {
            path: path.to_path_buf(),
            why,
        };
        let max = super::manifest::MAX_MANIFEST_BYTES as u64;
        let mut mfile = open_regular(&path.join(MANIFEST), false)
            .map_err(|e| bad(format!("cannot read {MANIFEST}: {e}")))?;
        let len = mfile
            .metadata()
            .map_err(|e| bad(format!("cannot read {MANIFEST}: {e}")))?
            .len();
        if len > max {
            return Err(bad(format!("{MANIFEST} is too large")));
        }
        let mut bytes = Vec::with_capacity(len as usize);
        (&mut mfile)
            .take(max + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| bad(format!("cannot read {MANIFEST}: {e}")))?;
        let manifest = Manifest::parse(&bytes).map_err(|e| bad(e.to_string()))?;
        let mut files = Vec::with_capacity(manifest.components.len());
        for (i, c) in manifest.components.iter().enumerate() {
            let name = manifest.file_name(i);
            let cannot = |e: std::io::Error| bad(format!("cannot read {name}: {e}"));
            let f = open_regular(&path.join(&name), false).map_err(cannot)?;
            let len = f.metadata().map_err(cannot)?.len();
            if len != c.size {
                return Err(bad(format!(
                    "{name} is {len} bytes, the manifest says {}",
                    c.size
                )));
            }
            files.push(Arc::new(f));
        }
        Ok(VmDir {
            path: path.to_path_buf(),
            manifest,
            files,
        })
    }

    /// Path of component `i` (for messages; read through
    /// [`VmDir::open_component`]).
    pub fn component_path(&self, i: usize) -> PathBuf {
        self.path.join(self.manifest.file_name(i))
    }

    /// Component `i` read-only: a new descriptor of the file opened and
    /// checked by [`VmDir::open`] (use positional reads: the file offset is
    /// shared).
    pub fn open_component(&self, i: usize) -> Result<File> {
        self.files[i]
            .try_clone()
            .ctx(|| format!("duplicating {}", self.component_path(i).display()))
    }

    /// Component `i` opened read-write (a disk a VM runs on), refused
    /// unless it is still the very file [`VmDir::open`] checked (same device
    /// and inode, not a symbolic link, still a regular file of its size).
    pub fn open_component_rw(&self, i: usize) -> Result<File> {
        let name = self.manifest.file_name(i);
        let bad = |why: String| Error::VmDir {
            path: self.path.clone(),
            why: format!("{name}: {why}"),
        };
        let f = open_regular(&self.path.join(&name), true)
            .map_err(|e| bad(format!("cannot open read-write: {e}")))?;
        let now = f.metadata().map_err(|e| bad(e.to_string()))?;
        let then = self.files[i].metadata().map_err(|e| bad(e.to_string()))?;
        if !same_file(&now, &then) {
            return Err(bad("replaced since the directory was opened".into()));
        }
        if now.len() != self.manifest.components[i].size {
            return Err(bad(format!(
                "is {} bytes, the manifest says {}",
                now.len(),
                self.manifest.components[i].size
            )));
        }
        Ok(f)
    }

    /// The memory component's block hashes from `memory.blocks` (FORMAT.md
    /// section 5.8), if that file is there, a regular file of the right
    /// length, and its hashes combine to the manifest's memory digest;
    /// None otherwise (it is only a cache).
    pub fn read_memory_blocks(&self) -> Option<Vec<crate::digest::Digest>> {
        use super::blocks;
        let c = self.manifest.components.first()?;
        let f = open_regular(&self.path.join(blocks::BLOCKS_FILE), false).ok()?;
        let want = blocks::expected_len(c.size);
        // The length is checked before anything is read.
        if f.metadata().ok()?.len() != want {
            return None;
        }
        let mut bytes = Vec::with_capacity(usize::try_from(want).ok()?);
        f.take(want).read_to_end(&mut bytes).ok()?;
        blocks::decode(&bytes, c.size, &c.digest)
    }

    /// The whole of component `i` (the state blob, at most
    /// `MAX_STATE_SIZE` bytes; any component small enough to hold in
    /// memory), read from the opened file.
    pub fn read_component(&self, i: usize) -> Result<Vec<u8>> {
        let size = self.manifest.components[i].size;
        let mut buf = vec![
            0u8;
            usize::try_from(size).map_err(|_| {
                Error::Invalid(format!(
                    "{} is too large to read whole",
                    self.manifest.file_name(i)
                ))
            })?
        ];
        self.files[i]
            .read_exact_at(&mut buf, 0)
            .ctx(|| format!("reading {}", self.component_path(i).display()))?;
        Ok(buf)
    }

    /// Recomputes every component digest and compares with the manifest.
    pub fn verify(&self) -> Result<()> {
        for (i, c) in self.manifest.components.iter().enumerate() {
            let f = self.open_component(i)?;
            let d = digest_file(&f, c.size)
                .ctx(|| format!("reading {}", self.component_path(i).display()))?;
            if d != c.digest {
                return Err(Error::VmDir {
                    path: self.path.clone(),
                    why: format!(
                        "{} does not match its manifest digest",
                        self.manifest.file_name(i)
                    ),
                });
            }
        }
        Ok(())
    }

    /// The VM identity (see [`Manifest::identity`]).
    pub fn identity(&self) -> [u8; 32] {
        self.manifest.identity()
    }
}

/// Digest of a (sparse) file, reading only the 1 MiB blocks that hold
/// data (each with one read, on all cores): a memory file with data
/// scattered in thousands of small extents costs a read per touched
/// block, not per extent.
pub fn digest_file(f: &File, size: u64) -> std::io::Result<[u8; 32]> {
    Ok(crate::digest::combine(size, &block_hashes_file(f, size)?))
}

/// The block hashes (FORMAT.md section 3) of the first `size` bytes of
/// `f`: only the blocks holding data are read, on all cores.
pub fn block_hashes_file(f: &File, size: u64) -> std::io::Result<Vec<crate::digest::Digest>> {
    let mut d = crate::digest::BlockDigests::zeros(size);
    for (start, end) in data_extents(f, size)? {
        let mut b = start - start % crate::digest::BLOCK;
        while b < end {
            d.mark(b);
            b += crate::digest::BLOCK;
        }
    }
    d.rehash(f)?;
    Ok(d.hashes().to_vec())
}

/// Builds a new VM directory under a temporary name; `commit` writes the
/// manifest last and renames the directory into place.
pub struct VmDirWriter {
    dir: AtomicDir,
    sync: bool,
}

impl VmDirWriter {
    /// Starts a new VMDIR at `dest` (which must not exist).
    pub fn create(dest: &Path) -> Result<Self> {
        Ok(VmDirWriter {
            dir: AtomicDir::create(dest)?,
            sync: true,
        })
    }

    /// Starts a new version of the existing VMDIR `dest`, which `commit`
    /// replaces as a whole (atomically).
    pub fn replacing(dest: &Path) -> Result<Self> {
        Ok(VmDirWriter {
            dir: AtomicDir::create_replacing(dest)?,
            sync: true,
        })
    }

    /// With `false`, `commit` skips fsync (the rename stays atomic, but a
    /// crash may lose the data): for transient VMs that are soft state.
    pub fn set_sync(&mut self, sync: bool) {
        self.sync = sync;
    }

    /// The temporary directory being filled.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Creates the file for component `name` (from
    /// [`super::file_name`]), private (0600) from its creation.
    pub fn create_file(&self, name: &str) -> Result<File> {
        let p = self.dir.path().join(name);
        create_private(&p).ctx(|| format!("creating {}", p.display()))
    }

    /// Writes `memory.blocks` (FORMAT.md section 5.8): the block hashes of
    /// a memory component of `size` bytes, for a later restore that needs
    /// them (private, like every file of the directory).
    pub fn write_memory_blocks(&self, size: u64, hashes: &[crate::digest::Digest]) -> Result<()> {
        use std::io::Write;
        let name = super::blocks::BLOCKS_FILE;
        self.create_file(name)?
            .write_all(&super::blocks::encode(size, hashes))
            .ctx(|| format!("writing {name}"))
    }

    /// Checks the files match `manifest`'s sizes, fsyncs them, writes the
    /// manifest and renames the directory into place.
    pub fn commit(self, manifest: &Manifest) -> Result<PathBuf> {
        manifest
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        for (i, c) in manifest.components.iter().enumerate() {
            let p = self.dir.path().join(manifest.file_name(i));
            let f = open_regular(&p, false).ctx(|| format!("opening {}", p.display()))?;
            let len = f.metadata().ctx(|| format!("stat {}", p.display()))?.len();
            if len != c.size {
                return Err(Error::Invalid(format!(
                    "{} has the wrong size",
                    p.display()
                )));
            }
            if self.sync {
                f.sync_all().ctx(|| format!("syncing {}", p.display()))?;
            }
        }
        let mp = self.dir.path().join(MANIFEST);
        let f = create_private(&mp).ctx(|| format!("creating {}", mp.display()))?;
        f.write_all_at(&manifest.encode(), 0)
            .ctx(|| format!("writing {}", mp.display()))?;
        if self.sync {
            f.sync_all().ctx(|| format!("syncing {}", mp.display()))?;
        }
        let dest = self.dir.dest().to_path_buf();
        self.dir.commit(self.sync)?;
        Ok(dest)
    }
}

/// Convenience for components built in memory (tests, state blobs).
pub fn component_of(kind: super::Kind, bytes: &[u8]) -> Component {
    Component {
        kind,
        size: bytes.len() as u64,
        digest: crate::digest::digest_bytes(bytes),
        trimmed: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fsutil::tests::{in_child_with_umask_000, mode};
    use crate::vmdir::Kind;
    use std::fs;
    use std::os::unix::fs::MetadataExt;
    use std::time::Duration;

    #[test]
    fn digest_file_reads_touched_blocks_and_equals_the_dense_digest() {
        use std::os::unix::fs::FileExt;
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("sparse");
        let size = 5 * crate::digest::BLOCK + 100;
        let f = fs::OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        f.set_len(size).unwrap();
        let mut dense = vec![0u8; size as usize];
        // Scattered pages, a run across a block boundary, the partial last
        // block's final bytes, and written zeros (data that reads as zero).
        let b = crate::digest::BLOCK;
        for (off, len, byte) in [
            (4096, 4096, 1u8),
            (3 * 4096, 10, 2),
            (b - 10, 20, 3),
            (3 * b, 4096, 0),
            (size - 7, 7, 4),
        ] {
            let data = vec![byte; len];
            f.write_all_at(&data, off).unwrap();
            dense[off as usize..off as usize + len].copy_from_slice(&data);
        }
        assert_eq!(
            digest_file(&f, size).unwrap(),
            crate::digest::digest_bytes(&dense)
        );
        // An all-hole file, and an empty one.
        let h = t.path().join("holes");
        let hf = fs::File::create(&h).unwrap();
        hf.set_len(2 * b).unwrap();
        assert_eq!(
            digest_file(&hf, 2 * b).unwrap(),
            crate::digest::digest_bytes(&vec![0; 2 * b as usize])
        );
        assert_eq!(
            digest_file(&hf, 0).unwrap(),
            crate::digest::digest_bytes(&[])
        );
    }

    /// A VMDIR at `dir/name` (memory, a disk of `disk` bytes, state).
    fn make(dir: &Path, name: &str, disk: usize) -> PathBuf {
        let parts: [(Kind, &str, Vec<u8>); 3] = [
            (Kind::Memory, "memory.raw", vec![7; 8192]),
            (Kind::Disk, "disk0.raw", vec![9; disk]),
            (Kind::State, "state.bin", b"state blob".to_vec()),
        ];
        let w = VmDirWriter::create(&dir.join(name)).unwrap();
        let mut m = Manifest {
            name: name.into(),
            vcpus: 1,
            components: Vec::new(),
            machine: None,
        };
        for (kind, file, bytes) in parts {
            let f = w.create_file(file).unwrap();
            std::os::unix::fs::FileExt::write_all_at(&f, &bytes, 0).unwrap();
            m.components.push(component_of(kind, &bytes));
        }
        w.commit(&m).unwrap()
    }

    /// `VmDir::open` on another thread: a FIFO must not block it.
    fn open_within(p: &Path, t: Duration) -> Result<VmDir> {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = p.to_path_buf();
        std::thread::spawn(move || tx.send(VmDir::open(&p)));
        rx.recv_timeout(t)
            .unwrap_or_else(|_| panic!("VmDir::open blocked for {t:?}"))
    }

    #[test]
    fn a_symlinked_component_is_refused() {
        let t = tempfile::tempdir().unwrap();
        for file in [MANIFEST, "memory.raw", "disk0.raw", "state.bin"] {
            let vm = make(t.path(), &format!("vm-{file}"), 4096);
            VmDir::open(&vm).unwrap();
            // The host file holds the very bytes the manifest expects: only
            // the link itself is wrong.
            let host = t.path().join(format!("host-{file}"));
            fs::rename(vm.join(file), &host).unwrap();
            std::os::unix::fs::symlink(&host, vm.join(file)).unwrap();
            let before = (
                fs::read(&host).unwrap(),
                fs::metadata(&host).unwrap().mtime_nsec(),
            );
            let e = VmDir::open(&vm).expect_err(file);
            assert_eq!(e.exit_code(), 7, "{file}: {e}");
            assert!(e.to_string().contains(file), "{e}");
            let after = (
                fs::read(&host).unwrap(),
                fs::metadata(&host).unwrap().mtime_nsec(),
            );
            assert_eq!(before, after);
        }
    }

    #[test]
    fn a_fifo_or_directory_component_is_refused_without_blocking() {
        let t = tempfile::tempdir().unwrap();
        let limit = Duration::from_secs(5);
        // An empty disk, so a FIFO has the manifest's size.
        for file in [MANIFEST, "disk0.raw"] {
            let vm = make(t.path(), &format!("fifo-{file}"), 0);
            fs::remove_file(vm.join(file)).unwrap();
            let ok = std::process::Command::new("mkfifo")
                .arg(vm.join(file))
                .status()
                .unwrap();
            assert!(ok.success());
            let e = open_within(&vm, limit).expect_err(file);
            assert_eq!(e.exit_code(), 7, "{file}: {e}");
        }
        for file in [MANIFEST, "disk0.raw"] {
            let vm = make(t.path(), &format!("dir-{file}"), 0);
            fs::remove_file(vm.join(file)).unwrap();
            fs::create_dir(vm.join(file)).unwrap();
            let e = open_within(&vm, limit).expect_err(file);
            assert_eq!(e.exit_code(), 7, "{file}: {e}");
        }
    }

    #[test]
    fn components_come_from_the_files_that_were_checked() {
        let t = tempfile::tempdir().unwrap();
        let vm = make(t.path(), "vm", 4096);
        let dir = VmDir::open(&vm).unwrap();
        fs::rename(vm.join("state.bin"), t.path().join("old-state")).unwrap();
        fs::write(vm.join("state.bin"), b"other blob").unwrap();
        assert_eq!(dir.read_component(2).unwrap(), b"state blob");
        let mut buf = [0u8; 4];
        dir.open_component(2)
            .unwrap()
            .read_exact_at(&mut buf, 0)
            .unwrap();
        assert_eq!(&buf, b"stat");

        let disk = vm.join("disk0.raw");
        dir.open_component_rw(1)
            .unwrap()
            .write_all_at(&[9], 0)
            .unwrap();
        let host = t.path().join("host");
        fs::rename(&disk, &host).unwrap();
        std::os::unix::fs::symlink(&host, &disk).unwrap();
        let e = dir.open_component_rw(1).unwrap_err();
        assert_eq!(e.exit_code(), 7);
        assert!(e.to_string().contains("symbolic link"), "{e}");
        fs::remove_file(&disk).unwrap();
        fs::copy(&host, &disk).unwrap();
        let e = dir.open_component_rw(1).unwrap_err();
        assert!(e.to_string().contains("replaced"), "{e}");
    }

    #[test]
    fn a_new_vmdir_is_private_from_creation() {
        if !in_child_with_umask_000("vmdir::dir::tests::a_new_vmdir_is_private_from_creation") {
            return;
        }
        let t = tempfile::tempdir().unwrap();
        let w = VmDirWriter::create(&t.path().join("vm")).unwrap();
        assert_eq!(mode(w.path()), 0o700);
        let f = w.create_file("memory.raw").unwrap();
        assert_eq!(mode(&w.path().join("memory.raw")), 0o600);
        drop(f);
        drop(w);
        let vm = make(t.path(), "vm", 4096);
        assert_eq!(mode(&vm), 0o700);
        for file in [MANIFEST, "memory.raw", "disk0.raw", "state.bin"] {
            assert_eq!(mode(&vm.join(file)), 0o600, "{file}");
        }
    }
}
