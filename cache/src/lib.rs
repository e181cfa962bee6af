//! `kimberley-cache`: the cloudlet cache. A directory of overlay chains
//! fetched from OCI registries, content-addressed and verified
//! (docs/CLOUDLET.md has the layout and its rules):
//!
//! ```text
//! DIR/lock                      flock: shared while in use, exclusive for gc and eviction
//! DIR/blobs/sha256/HEX          complete blobs (overlays, chain configs), verified
//! DIR/blobs/sha256/HEX.partial  a download so far (resumed from its length)
//! DIR/blobs/sha256/HEX.lock     flock while one process adds HEX
//! DIR/manifests/sha256/HEX      manifests by digest; mtime = last use (LRU)
//! DIR/tags/REGISTRY/REPO/TAG    "sha256:HEX\n", replaced by rename
//! DIR/pins/sha256/HEX           a manifest that eviction keeps
//! DIR/bases/IDENTITY/           a base VM directory (read-only copies), by its identity
//!                               in hex; never evicted, checked again whenever used
//! DIR/bases/.IDENTITY.tmp-PID-N a base being added or removed
//! ```

pub mod bases;
pub mod error;
pub mod fetch;
pub mod quota;
pub mod store;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use kimberley_formats::fsutil::{sync_dir, temp_sibling, PRIVATE_DIR_MODE, PRIVATE_FILE_MODE};
use kimberley_formats::sys::lock::{flock, Mode};
use kimberley_registry::manifest::MAX_MANIFEST_LEN;
use kimberley_registry::{Digest, Manifest, Reference};

use error::Ctx;
pub use error::{Error, Result};
pub use store::{Begin, BlobDir, Ingest, Store, WriteStore};

/// The default cache directory: `/var/cache/kimberley` for root,
/// `${XDG_CACHE_HOME:-~/.cache}/kimberley` for anyone else.
pub fn default_dir() -> PathBuf {
    // SAFETY: geteuid(2) cannot fail and borrows nothing.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/cache/kimberley");
    }
    match std::env::var_os("XDG_CACHE_HOME").filter(|v| !v.is_empty()) {
        Some(x) => Path::new(&x).join("kimberley"),
        None => Path::new(&std::env::var_os("HOME").unwrap_or_else(|| ".".into()))
            .join(".cache/kimberley"),
    }
}

/// An open cache, locked shared (or exclusive) for as long as it lives.
pub struct Cache {
    pub root: PathBuf,
    pub blobs: BlobDir,
    pub manifests: BlobDir,
    _lock: File,
}

fn mkdir_private(p: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(p)
        .ctx(|| format!("creating {}", p.display()))
}

impl Cache {
    /// Opens (creating, 0700) the cache at `root` and locks it: `Shared`
    /// for fetching and applying, `Exclusive` for gc and eviction (waits
    /// for the others).
    pub fn open(root: &Path, mode: Mode) -> Result<Cache> {
        for sub in [
            "blobs/sha256",
            "manifests/sha256",
            "tags",
            "pins/sha256",
            "bases",
        ] {
            mkdir_private(&root.join(sub))?;
        }
        let lp = root.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .mode(PRIVATE_FILE_MODE)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&lp)
            .ctx(|| format!("opening {}", lp.display()))?;
        flock(&lock, mode, true).ctx(|| format!("locking {}", lp.display()))?;
        Ok(Cache {
            root: root.to_path_buf(),
            blobs: BlobDir {
                dir: root.join("blobs/sha256"),
            },
            manifests: BlobDir {
                dir: root.join("manifests/sha256"),
            },
            _lock: lock,
        })
    }

    /// The file of `reference`'s tag (None for a digest reference).
    pub fn tag_path(&self, r: &Reference) -> Result<Option<PathBuf>> {
        let Some(tag) = &r.tag else {
            return Ok(None);
        };
        let mut p = self.root.join("tags").join(&r.registry);
        for c in r.repository.split('/').chain([tag.as_str()]) {
            if c.is_empty() || c == "." || c == ".." || c.contains('\0') {
                return Err(Error::Layout {
                    path: self.root.display().to_string(),
                    why: format!("unusable reference {r}"),
                });
            }
            p.push(c);
        }
        Ok(Some(p))
    }

    /// What the cache's copy of `reference` is: its digest, or the tag's.
    pub fn resolve(&self, r: &Reference) -> Result<Option<Digest>> {
        if let Some(d) = r.digest {
            return Ok(self.manifests.contains(&d).then_some(d));
        }
        let Some(p) = self.tag_path(r)? else {
            return Ok(None);
        };
        match fs::read_to_string(&p) {
            Ok(s) => Ok(Digest::parse(s.trim())
                .ok()
                .filter(|d| self.manifests.contains(d))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("reading {}", p.display()), e)),
        }
    }

    /// Points `reference`'s tag at `d` (a new file renamed over the old).
    pub fn set_tag(&self, r: &Reference, d: &Digest) -> Result<()> {
        let Some(p) = self.tag_path(r)? else {
            return Ok(());
        };
        let dir = kimberley_formats::fsutil::parent_of(&p);
        mkdir_private(&dir)?;
        let tmp = temp_sibling(&p);
        let mut f = kimberley_formats::fsutil::create_private(&tmp)
            .ctx(|| format!("creating {}", tmp.display()))?;
        let r = (|| {
            f.write_all(format!("{d}\n").as_bytes())?;
            f.sync_all()?;
            fs::rename(&tmp, &p)
        })();
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io(format!("writing {}", p.display()), e));
        }
        sync_dir(&dir).map_err(|e| Error::io("syncing the cache", io::Error::other(e)))
    }

    /// Stores a manifest's bytes under their digest (verified, like every
    /// blob); returns the digest.
    pub fn put_manifest(&self, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        match self.manifests.begin(&d, bytes.len() as u64)? {
            Begin::Present(_) => {}
            Begin::Write(mut i) => {
                i.restart()?;
                i.append(bytes)?;
                i.commit()?;
            }
        }
        Ok(d)
    }

    /// The manifest `d`, parsed and checked, if the cache has it.
    pub fn manifest(&self, d: &Digest) -> Result<Option<Manifest>> {
        use std::io::Read;
        let Some(f) = self.manifests.open(d)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        f.take(MAX_MANIFEST_LEN as u64 + 1)
            .read_to_end(&mut bytes)
            .ctx(|| format!("reading manifest {d}"))?;
        Ok(Some(Manifest::decode(&bytes)?))
    }

    /// Marks manifest `d` used now (its mtime: the LRU clock).
    pub fn touch(&self, d: &Digest) -> Result<()> {
        let p = self.manifests.path(d);
        let f = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&p)
            .ctx(|| format!("opening {}", p.display()))?;
        f.set_modified(std::time::SystemTime::now())
            .ctx(|| format!("touching {}", p.display()))
    }

    /// Pins manifest `d`: eviction keeps it and its blobs.
    pub fn pin(&self, d: &Digest) -> Result<()> {
        let p = self.root.join("pins/sha256").join(d.hex());
        match kimberley_formats::fsutil::create_private(&p) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(Error::io(format!("creating {}", p.display()), e)),
        }
    }

    /// True if manifest `d` is pinned.
    pub fn pinned(&self, d: &Digest) -> bool {
        self.root.join("pins/sha256").join(d.hex()).exists()
    }
}

/// A chain the cache holds (`kimberlize cache list`).
#[derive(Debug, Clone)]
pub struct ChainEntry {
    /// Its manifest's digest.
    pub digest: Digest,
    /// The manifest.
    pub manifest: Manifest,
    /// Its last use (the LRU clock).
    pub last_use: std::time::SystemTime,
    /// Eviction keeps it.
    pub pinned: bool,
    /// The tags that point at it (`REGISTRY/REPO:TAG`).
    pub tags: Vec<String>,
    /// Every blob it names is in the cache.
    pub complete: bool,
}

/// A tag file: the tag (`REGISTRY/REPO:TAG`), its path, and the digest it
/// names (None if unreadable).
pub type TagEntry = (String, PathBuf, Option<Digest>);

impl Cache {
    /// Every tag file under `DIR/tags`, sorted.
    pub fn tags(&self) -> Result<Vec<TagEntry>> {
        let top = self.root.join("tags");
        let mut out = Vec::new();
        let mut stack = vec![top.clone()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).ctx(|| format!("listing {}", dir.display()))? {
                let e = e.ctx(|| format!("listing {}", dir.display()))?;
                let p = e.path();
                let t = e.file_type().ctx(|| format!("checking {}", p.display()))?;
                if t.is_dir() {
                    stack.push(p);
                } else if t.is_file() && !e.file_name().to_string_lossy().starts_with('.') {
                    let rel = p.strip_prefix(&top).unwrap_or(&p);
                    let name = match (rel.parent(), rel.file_name()) {
                        (Some(repo), Some(tag)) => {
                            format!("{}:{}", repo.display(), tag.to_string_lossy())
                        }
                        _ => rel.display().to_string(),
                    };
                    let d = fs::read_to_string(&p)
                        .ok()
                        .and_then(|s| Digest::parse(s.trim()).ok());
                    out.push((name, p, d));
                }
            }
        }
        out.sort();
        Ok(out)
    }

    /// The chains the cache holds (manifests that read as chains), least
    /// recently used first.
    pub fn chains(&self) -> Result<Vec<ChainEntry>> {
        let tags = self.tags()?;
        let dir = &self.manifests.dir;
        let mut out = Vec::new();
        for e in fs::read_dir(dir).ctx(|| format!("listing {}", dir.display()))? {
            let e = e.ctx(|| format!("listing {}", dir.display()))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let Ok(d) = Digest::parse(&format!("sha256:{name}")) else {
                continue;
            };
            let Ok(Some(manifest)) = self.manifest(&d) else {
                continue;
            };
            let last_use = e
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            let complete = std::iter::once(&manifest.config)
                .chain(&manifest.layers)
                .all(|x| self.blobs.contains(&x.digest));
            out.push(ChainEntry {
                digest: d,
                last_use,
                pinned: self.pinned(&d),
                tags: tags
                    .iter()
                    .filter(|(_, _, t)| *t == Some(d))
                    .map(|(n, _, _)| n.clone())
                    .collect(),
                complete,
                manifest,
            });
        }
        out.sort_by_key(|c| c.last_use);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_and_manifests() {
        let t = tempfile::tempdir().unwrap();
        let c = Cache::open(&t.path().join("c"), Mode::Shared).unwrap();
        let r = Reference::parse("127.0.0.1:5000/apps/office:v1").unwrap();
        assert_eq!(c.resolve(&r).unwrap(), None);
        let d = c.put_manifest(b"{}").unwrap();
        c.set_tag(&r, &d).unwrap();
        assert_eq!(c.resolve(&r).unwrap(), Some(d));
        assert_eq!(c.resolve(&r.with_digest(d)).unwrap(), Some(d));
        let p = c.tag_path(&r).unwrap().unwrap();
        assert!(p.ends_with("tags/127.0.0.1:5000/apps/office/v1"));
        // Not a chain manifest: stored bytes, but refused when read.
        assert!(c.manifest(&d).is_err());
        // A hand-made reference cannot leave the tags directory.
        let evil = Reference {
            repository: "../../x".into(),
            ..r
        };
        assert!(c.tag_path(&evil).is_err());
    }
}
