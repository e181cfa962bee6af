//! Opening and writing VM directories.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use super::manifest::{Component, Manifest};
use crate::digest::SparseHasher;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::{read_at_zero_padded, AtomicDir};
use crate::sparse::data_extents;

/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";

/// An opened, structurally valid VM directory.
#[derive(Debug, Clone)]
pub struct VmDir {
    /// Where it is.
    pub path: PathBuf,
    /// Its manifest.
    pub manifest: Manifest,
}

impl VmDir {
    /// Reads and validates the manifest and checks every component file
    /// exists with its logical size.
    pub fn open(path: &Path) -> Result<VmDir> {
        let bad = |why: String| Error::VmDir {
            path: path.to_path_buf(),
            why,
        };
        let mpath = path.join(MANIFEST);
        let meta = fs::metadata(&mpath).map_err(|e| bad(format!("cannot read {MANIFEST}: {e}")))?;
        if meta.len() > super::manifest::MAX_MANIFEST_BYTES as u64 {
            return Err(bad(format!("{MANIFEST} is too large")));
        }
        let bytes = fs::read(&mpath).map_err(|e| bad(format!("cannot read {MANIFEST}: {e}")))?;
        let manifest = Manifest::parse(&bytes).map_err(|e| bad(e.to_string()))?;
        let dir = VmDir {
            path: path.to_path_buf(),
            manifest,
        };
        for i in 0..dir.manifest.components.len() {
            let p = dir.component_path(i);
            let len = fs::metadata(&p)
                .map_err(|e| bad(format!("cannot read {}: {e}", dir.manifest.file_name(i))))?
                .len();
            if len != dir.manifest.components[i].size {
                return Err(bad(format!(
                    "{} is {len} bytes, the manifest says {}",
                    dir.manifest.file_name(i),
                    dir.manifest.components[i].size
                )));
            }
        }
        Ok(dir)
    }

    /// Path of component `i`.
    pub fn component_path(&self, i: usize) -> PathBuf {
        self.path.join(self.manifest.file_name(i))
    }

    /// Opens component `i` read-only.
    pub fn open_component(&self, i: usize) -> Result<File> {
        let p = self.component_path(i);
        File::open(&p).ctx(|| format!("opening {}", p.display()))
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

/// Digest of a (sparse) file, reading only its data extents.
pub fn digest_file(f: &File, size: u64) -> std::io::Result<[u8; 32]> {
    let mut h = SparseHasher::new(size);
    let mut buf = vec![0u8; 8 << 20];
    for (start, end) in data_extents(f, size)? {
        let mut pos = start;
        while pos < end {
            let n = ((end - pos) as usize).min(buf.len());
            read_at_zero_padded(f, &mut buf[..n], pos, size)?;
            h.feed(pos, &buf[..n]);
            pos += n as u64;
        }
    }
    Ok(h.finish())
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

    /// Creates the file for component `name` (e.g. `memory.raw`).
    pub fn create_file(&self, name: &str) -> Result<File> {
        let p = self.dir.path().join(name);
        OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .ctx(|| format!("creating {}", p.display()))
    }

    /// Checks the files match `manifest`'s sizes, fsyncs them, writes the
    /// manifest and renames the directory into place.
    pub fn commit(self, manifest: &Manifest) -> Result<PathBuf> {
        manifest
            .validate()
            .map_err(|e| Error::Invalid(e.to_string()))?;
        for (i, c) in manifest.components.iter().enumerate() {
            let p = self.dir.path().join(manifest.file_name(i));
            let f = OpenOptions::new()
                .write(true)
                .open(&p)
                .ctx(|| format!("opening {}", p.display()))?;
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
        let mut f = File::create(&mp).ctx(|| format!("creating {}", mp.display()))?;
        std::io::Write::write_all(&mut f, &manifest.encode())
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
    }
}
