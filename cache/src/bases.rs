//! Base VMs in the cache by identity (`DIR/bases/HEX/`): private copies
//! verified when added, found by identity (or by an overlay's keyed
//! commitment to it), and checked again, every digest, each time one is
//! opened for use.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use kimberley_formats::digest::hex;
use kimberley_formats::fsutil::{create_private, rename_noreplace, temp_sibling, AtomicDir};
use kimberley_formats::vmdir::import::copy_reflink;
use kimberley_formats::vmdir::{total_size, VmDir, MANIFEST};

use crate::error::{Ctx, Error, Result};
use crate::Cache;

/// A base's files are read-only: nothing of the cache's writes them.
const BASE_FILE_MODE: u32 = 0o400;

/// What [`Cache::add_base`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Added {
    /// The base was copied in.
    New,
    /// The cache already held a base of this identity (maybe added by
    /// another process meanwhile); nothing was copied.
    Present,
}

/// A base VM the cache holds.
#[derive(Debug, Clone)]
pub struct CachedBase {
    /// Its identity (the directory's name).
    pub identity: [u8; 32],
    /// Its manifest's name, if the manifest reads.
    pub name: Option<String>,
    /// Its components' total size, if the manifest reads.
    pub bytes: Option<u64>,
}

/// The identity a directory name spells (64 lower-case hex digits).
fn identity_of(name: &str) -> Option<[u8; 32]> {
    if name.len() != 64 || !name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    kimberley_formats::digest::from_hex(name)
}

fn read_only(f: &fs::File, p: &Path) -> Result<()> {
    f.set_permissions(fs::Permissions::from_mode(BASE_FILE_MODE))
        .ctx(|| format!("making {} read-only", p.display()))
}

impl Cache {
    /// The directory of bases.
    pub fn bases_dir(&self) -> PathBuf {
        self.root.join("bases")
    }

    /// Where the base of identity `id` is kept.
    pub fn base_path(&self, id: &[u8; 32]) -> PathBuf {
        self.bases_dir().join(hex(id))
    }

    /// Adds the VM directory `src` as a base: copies its components
    /// (sharing extents where the file system can, else in the kernel,
    /// holes kept) and its manifest into a temporary directory, checks
    /// every digest of the copy (so a source that does not match its
    /// manifest, or changed while it was copied, is refused), and renames
    /// it to `bases/IDENTITY` without replacing anything: of two processes
    /// adding the same base, one renames and the other finds it present.
    pub fn add_base(&self, src: &Path) -> Result<([u8; 32], Added)> {
        let vm = VmDir::open(src)?;
        let id = vm.identity();
        let dest = self.base_path(&id);
        if fs::symlink_metadata(&dest).is_ok_and(|m| m.is_dir()) {
            return Ok((id, Added::Present));
        }
        let dir = match AtomicDir::create(&dest) {
            Ok(d) => d,
            Err(kimberley_formats::Error::Exists(_)) => return Ok((id, Added::Present)),
            Err(e) => return Err(e.into()),
        };
        for (i, c) in vm.manifest.components.iter().enumerate() {
            let p = dir.path().join(vm.manifest.file_name(i));
            let dst = create_private(&p).ctx(|| format!("creating {}", p.display()))?;
            copy_reflink(&vm.open_component(i)?, c.size, &dst)?;
            dst.sync_all().ctx(|| format!("syncing {}", p.display()))?;
            read_only(&dst, &p)?;
        }
        let mp = dir.path().join(MANIFEST);
        let mut mf = create_private(&mp).ctx(|| format!("creating {}", mp.display()))?;
        mf.write_all(&vm.manifest.encode())
            .and_then(|()| mf.sync_all())
            .ctx(|| format!("writing {}", mp.display()))?;
        read_only(&mf, &mp)?;
        // What the cache keeps is the copy: it is what must verify.
        let copy = VmDir::open(dir.path())?;
        let as_src = |e: kimberley_formats::Error| match e {
            kimberley_formats::Error::VmDir { why, .. } => kimberley_formats::Error::VmDir {
                path: src.to_path_buf(),
                why,
            },
            e => e,
        };
        if copy.identity() != id {
            return Err(Error::Vm(as_src(kimberley_formats::Error::VmDir {
                path: src.to_path_buf(),
                why: "changed while it was copied".into(),
            })));
        }
        copy.verify().map_err(as_src)?;
        match dir.commit(true) {
            Ok(()) => Ok((id, Added::New)),
            Err(kimberley_formats::Error::Exists(_)) => Ok((id, Added::Present)),
            Err(e) => Err(e.into()),
        }
    }

    /// The bases the cache holds, by identity.
    pub fn bases(&self) -> Result<Vec<CachedBase>> {
        let mut out = Vec::new();
        for id in self.base_ids()? {
            let vm = VmDir::open(&self.base_path(&id)).ok();
            out.push(CachedBase {
                identity: id,
                name: vm.as_ref().map(|v| v.manifest.name.clone()),
                bytes: vm.as_ref().map(|v| total_size(&v.manifest.components)),
            });
        }
        Ok(out)
    }

    fn base_ids(&self) -> Result<Vec<[u8; 32]>> {
        let dir = self.bases_dir();
        let mut ids = Vec::new();
        let list = match fs::read_dir(&dir) {
            Ok(l) => l,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(ids),
            Err(e) => return Err(Error::io(format!("listing {}", dir.display()), e)),
        };
        for e in list {
            let e = e.ctx(|| format!("listing {}", dir.display()))?;
            let is_dir = e.file_type().is_ok_and(|t| t.is_dir());
            if let (true, Some(id)) = (is_dir, identity_of(&e.file_name().to_string_lossy())) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// The identity of a base the cache holds for which `matches` is true
    /// (an overlay's `base_id` is the identity itself, or a keyed
    /// commitment to it that only the key can test).
    pub fn find_base(&self, matches: &dyn Fn(&[u8; 32]) -> bool) -> Result<Option<[u8; 32]>> {
        Ok(self.base_ids()?.into_iter().find(|id| matches(id)))
    }

    /// Opens the base `id` for use, checked again: its manifest must have
    /// the identity it is kept under, and every component its digest. A
    /// base that fails is removed from the cache and reported
    /// ([`Error::TamperedBase`]); the [`VmDir`] returned reads the very
    /// files that were checked.
    pub fn open_base(&self, id: &[u8; 32]) -> Result<VmDir> {
        let p = self.base_path(id);
        if !fs::symlink_metadata(&p).is_ok_and(|m| m.is_dir()) {
            return Err(Error::Missing(format!("base VM {}", hex(id))));
        }
        let checked = VmDir::open(&p).and_then(|vm| {
            if vm.identity() != *id {
                return Err(kimberley_formats::Error::VmDir {
                    path: p.clone(),
                    why: format!("its manifest has identity {}", hex(&vm.identity())),
                });
            }
            vm.verify()?;
            Ok(vm)
        });
        match checked {
            Ok(vm) => Ok(vm),
            Err(kimberley_formats::Error::VmDir { why, .. }) => {
                self.remove_base(id)?;
                Err(Error::TamperedBase {
                    identity: hex(id),
                    why,
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Removes the base `id` (renamed away first, so nothing ever sees
    /// half of it); false if the cache did not hold it.
    pub fn remove_base(&self, id: &[u8; 32]) -> Result<bool> {
        let p = self.base_path(id);
        let gone = temp_sibling(&p);
        match rename_noreplace(&p, &gone) {
            Ok(()) => {}
            Err(kimberley_formats::Error::Io { source, .. })
                if source.kind() == io::ErrorKind::NotFound =>
            {
                return Ok(false)
            }
            Err(e) => return Err(e.into()),
        }
        fs::remove_dir_all(&gone).ctx(|| format!("removing {}", gone.display()))?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimberley_formats::sys::lock::Mode;
    use kimberley_formats::testkit::{make_pair, PairSpec};

    fn cache(t: &Path) -> Cache {
        Cache::open(&t.join("cache"), Mode::Shared).unwrap()
    }

    /// Adding keeps a read-only copy under its identity; a second add
    /// finds it; opening it checks it; removing it removes it.
    #[test]
    fn bases_by_identity() {
        let t = tempfile::tempdir().unwrap();
        let p = make_pair(t.path(), &PairSpec::default()).unwrap();
        let c = cache(t.path());
        let (id, added) = c.add_base(&p.base).unwrap();
        assert_eq!(added, Added::New);
        assert_eq!(id, VmDir::open(&p.base).unwrap().identity());
        assert_eq!(c.add_base(&p.base).unwrap(), (id, Added::Present));
        let vm = c.open_base(&id).unwrap();
        assert_eq!(vm.path, c.base_path(&id));
        for e in fs::read_dir(c.base_path(&id)).unwrap() {
            let mode = e.unwrap().metadata().unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o400);
        }
        let listed = c.bases().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].identity, id);
        assert_eq!(c.find_base(&|x| *x == id).unwrap(), Some(id));
        assert_eq!(c.find_base(&|_| false).unwrap(), None);
        // Nothing temporary is left beside it.
        assert_eq!(fs::read_dir(c.bases_dir()).unwrap().count(), 1);
        assert!(c.remove_base(&id).unwrap());
        assert!(!c.remove_base(&id).unwrap());
        assert!(matches!(c.open_base(&id), Err(Error::Missing(_))));
    }

    /// A VM directory whose bytes do not match its manifest is not added.
    #[test]
    fn a_base_that_does_not_verify_is_not_added() {
        let t = tempfile::tempdir().unwrap();
        let p = make_pair(t.path(), &PairSpec::default()).unwrap();
        let vm = VmDir::open(&p.base).unwrap();
        let f = fs::OpenOptions::new()
            .write(true)
            .open(vm.component_path(0))
            .unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"X", 4096).unwrap();
        let c = cache(t.path());
        let e = c.add_base(&p.base).unwrap_err();
        assert!(e.to_string().contains("does not match"), "{e}");
        assert_eq!(fs::read_dir(c.bases_dir()).unwrap().count(), 0);
    }
}
