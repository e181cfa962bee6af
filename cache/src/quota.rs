//! Keeping the cache within a quota (evicting the least recently used
//! chains that are not pinned) and `gc` (removing what no manifest names).
//! Both run under the cache's exclusive lock.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::Path;
use std::time::SystemTime;

use kimberley_registry::Digest;

use crate::error::{Error, Result};
use crate::Cache;

/// What eviction or gc removed.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// Manifests evicted (least recently used first).
    pub evicted: Vec<Digest>,
    /// Blobs (and partial downloads) removed.
    pub blobs_removed: usize,
    /// Bytes freed.
    pub freed: u64,
    /// Bytes the blobs take afterwards.
    pub usage: u64,
}

fn hex_name(name: &str) -> Option<Digest> {
    Digest::parse(&format!("sha256:{name}")).ok()
}

fn entries(dir: &Path) -> Result<Vec<(String, fs::Metadata)>> {
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(|e| Error::io(format!("listing {}", dir.display()), e))? {
        let e = e.map_err(|e| Error::io(format!("listing {}", dir.display()), e))?;
        let m = e
            .metadata()
            .map_err(|er| Error::io(format!("checking {}", e.path().display()), er))?;
        out.push((e.file_name().to_string_lossy().into_owned(), m));
    }
    Ok(out)
}

fn remove(p: &Path) -> Result<()> {
    match fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(format!("removing {}", p.display()), e)),
    }
}

/// Manifests with their last use.
type LastUse = Vec<(Digest, SystemTime)>;

/// Manifests with their last use, and the blobs they name.
fn manifests(cache: &Cache) -> Result<(LastUse, HashSet<Digest>)> {
    let mut list = Vec::new();
    let mut named = HashSet::new();
    for (name, meta) in entries(&cache.manifests.dir)? {
        let Some(d) = hex_name(&name) else { continue };
        match cache.manifest(&d) {
            Ok(Some(m)) => {
                named.insert(m.config.digest);
                named.extend(m.layers.iter().map(|l| l.digest));
                list.push((d, meta.modified().unwrap_or(SystemTime::UNIX_EPOCH)));
            }
            // Not a chain manifest: nothing to keep for it.
            _ => remove(&cache.manifests.path(&d))?,
        }
    }
    Ok((list, named))
}

/// Bytes the blobs (complete and partial) take.
pub fn usage(cache: &Cache) -> Result<u64> {
    Ok(entries(&cache.blobs.dir)?
        .iter()
        .filter(|(n, m)| m.is_file() && !n.ends_with(".lock"))
        .map(|(_, m)| m.len())
        .sum())
}

/// Removes blobs, partial downloads and lock files no manifest names, and
/// stale temporaries. `cache` must be opened exclusive.
pub fn gc(cache: &Cache) -> Result<Report> {
    let (_, named) = manifests(cache)?;
    let mut rep = Report::default();
    for (name, meta) in entries(&cache.blobs.dir)? {
        let stem = name
            .strip_suffix(".partial")
            .or_else(|| name.strip_suffix(".lock"))
            .unwrap_or(&name);
        let keep = hex_name(stem).is_some_and(|d| named.contains(&d)) && !name.ends_with(".lock");
        if !keep {
            remove(&cache.blobs.dir.join(&name))?;
            if !name.ends_with(".lock") {
                rep.blobs_removed += 1;
                rep.freed += meta.len();
            }
        }
    }
    rep.usage = usage(cache)?;
    Ok(rep)
}

/// Evicts least recently used, unpinned chains not in `keep` until the
/// blobs take at most `quota` bytes (or nothing more can go), then
/// collects what they named. `cache` must be opened exclusive.
pub fn evict(cache: &Cache, quota: u64, keep: &[Digest]) -> Result<Report> {
    let mut rep = gc(cache)?;
    let (mut list, _) = manifests(cache)?;
    list.retain(|(d, _)| !keep.contains(d) && !cache.pinned(d));
    list.sort_by_key(|(_, t)| *t);
    let mut candidates = list.into_iter();
    while rep.usage > quota {
        let Some((d, _)) = candidates.next() else {
            break;
        };
        untag(cache, &d)?;
        remove(&cache.manifests.path(&d))?;
        rep.evicted.push(d);
        let g = gc(cache)?;
        rep.blobs_removed += g.blobs_removed;
        rep.freed += g.freed;
        rep.usage = g.usage;
    }
    Ok(rep)
}

/// Removes every tag that points at `d`.
fn untag(cache: &Cache, d: &Digest) -> Result<()> {
    for (_, p, t) in cache.tags()? {
        if t == Some(*d) {
            remove(&p)?;
        }
    }
    Ok(())
}
