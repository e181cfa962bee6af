//! Bringing a chain from a registry into the cache (`kimberlize fetch`),
//! and reading a layer from the cache or, while it arrives, from the
//! registry (`dekimberlize --from`).

use std::fs::File;
use std::io::{self, Read};

use kimberley_registry::client::Client;
use kimberley_registry::{Descriptor, Digest, Manifest, Reference};

use crate::error::{Error, Result};
use crate::store::{Begin, Ingest, Store, WriteStore};
use crate::Cache;

/// What a fetch did.
#[derive(Debug, Clone, Default)]
pub struct FetchReport {
    /// The manifest's digest.
    pub manifest: Option<Digest>,
    /// Blobs downloaded (whole or resumed).
    pub fetched: usize,
    /// Blobs the cache already had.
    pub cached: usize,
    /// Bytes received for blobs.
    pub bytes: u64,
    /// The manifest was new to the cache, or the tag moved.
    pub new_manifest: bool,
}

impl FetchReport {
    /// True if the cache holds anything it did not before.
    pub fn changed(&self) -> bool {
        self.new_manifest || self.fetched > 0
    }
}

/// Gets the manifest `r` names: from the cache for a digest it has, else
/// from the registry (stored, and the tag pointed at it). Returns the
/// digest, the manifest, and whether it was new or moved the tag.
pub fn manifest(cache: &Cache, client: &Client, r: &Reference) -> Result<(Digest, Manifest, bool)> {
    if let Some(d) = r.digest {
        if let Some(m) = cache.manifest(&d)? {
            return Ok((d, m, false));
        }
    }
    let (d, bytes) = client.get_manifest(r)?;
    let m = Manifest::decode(&bytes)?;
    let new = !cache.manifests.contains(&d) || cache.resolve(r)? != Some(d);
    cache.put_manifest(&bytes)?;
    Ok((d, m, new))
}

/// Brings the chain `r` names into the cache: the manifest, the config
/// and every layer (resuming partial downloads), each verified before it
/// becomes visible; then points the tag at it and marks it used.
/// `progress` gets (bytes received, bytes to receive).
pub fn fetch(
    cache: &Cache,
    client: &Client,
    r: &Reference,
    progress: &dyn Fn(u64, u64),
) -> Result<FetchReport> {
    let (d, m, new) = manifest(cache, client, r)?;
    let mut rep = FetchReport {
        manifest: Some(d),
        new_manifest: new,
        ..Default::default()
    };
    let wanted: Vec<&Descriptor> = std::iter::once(&m.config).chain(&m.layers).collect();
    let total: u64 = wanted
        .iter()
        .filter(|x| !cache.blobs.contains(&x.digest))
        .map(|x| x.size)
        .sum();
    for desc in wanted {
        match cache.blobs.begin(&desc.digest, desc.size)? {
            Begin::Present(_) => rep.cached += 1,
            Begin::Write(mut ing) => {
                let before = rep.bytes;
                download(client, &mut ing, &mut |n| {
                    rep.bytes = before + n;
                    progress(rep.bytes, total);
                })?;
                ing.commit()?;
                rep.fetched += 1;
            }
        }
    }
    cache.set_tag(r, &d)?;
    cache.touch(&d)?;
    Ok(rep)
}

/// Downloads the rest of `ing`'s blob into it (from its offset, with
/// `Range`), reading, hashing and writing in parallel
/// ([`Ingest::append_from`]); `got` is told the bytes received in this
/// call.
fn download(client: &Client, ing: &mut Ingest, got: &mut dyn FnMut(u64)) -> Result<()> {
    let d = ing.digest();
    let mut s = client.get_blob(&d, ing.offset())?;
    if s.start != ing.offset() {
        ing.restart()?;
    }
    ing.append_from(&mut s.reader, got)
}

/// A layer to read: the cache's complete blob, or the registry's bytes
/// teed into the cache as they arrive (verified at the end: a mismatch is
/// a read error and the partial download is removed).
pub fn open_layer(
    cache: &Cache,
    client: Option<&Client>,
    desc: &Descriptor,
) -> Result<Box<dyn Read + Send>> {
    match cache.blobs.begin(&desc.digest, desc.size)? {
        Begin::Present(f) => Ok(Box::new(io::BufReader::with_capacity(1 << 20, f))),
        Begin::Write(ing) => {
            let Some(client) = client else {
                return Err(Error::Missing(format!("blob {}", desc.digest)));
            };
            // What the cache has so far is read first, then the rest.
            let have = ing.offset();
            let partial = File::open(cache.blobs.partial(&desc.digest))
                .map_err(|e| Error::io(format!("opening the partial blob {}", desc.digest), e))?;
            let s = client.get_blob(&desc.digest, have)?;
            let mut ing = ing;
            let head: Box<dyn Read + Send> = if s.start == have {
                Box::new(partial.take(have))
            } else {
                ing.restart()?;
                Box::new(io::empty())
            };
            // Large reads: each one is a write to the partial file.
            Ok(Box::new(io::BufReader::with_capacity(
                1 << 20,
                Tee {
                    head,
                    body: s.reader,
                    ing: Some(ing),
                },
            )))
        }
    }
}

struct Tee {
    head: Box<dyn Read + Send>,
    body: Box<dyn Read + Send>,
    ing: Option<Ingest>,
}

impl Read for Tee {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.head.read(buf)?;
        if n > 0 {
            return Ok(n);
        }
        let Some(ing) = self.ing.as_mut() else {
            return Ok(0);
        };
        let n = self.body.read(buf)?;
        if n > 0 {
            ing.append(&buf[..n]).map_err(io::Error::other)?;
            return Ok(n);
        }
        // The end: the blob becomes visible only if it verifies.
        let ing = self.ing.take().expect("checked above");
        ing.commit().map_err(io::Error::other)?;
        Ok(0)
    }
}

impl Store for Cache {
    fn open(&self, d: &Digest) -> Result<Option<File>> {
        self.blobs.open(d)
    }
    fn contains(&self, d: &Digest) -> bool {
        self.blobs.contains(d)
    }
}
