//! `kimberlize push`, `fetch`, `gc` and `cache`: overlay chains to and
//! from OCI registries, and the cloudlet cache with its base VMs.

use std::fs::File;
use std::io::Read;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use kimberley_cache::bases::Added;
use kimberley_cache::fetch;
use kimberley_cache::quota;
use kimberley_cache::Cache;
use kimberley_cli::exit;
use kimberley_cli::oci::{cache_error, reference, registry_error};
use kimberley_cli::progress as units;
use kimberley_cli::run::{quiet_exit, with_code};
use kimberley_formats::overlay::header::HEADER_LEN;
use kimberley_formats::sys::lock::Mode;
use kimberley_registry::client::BlobSource;
use kimberley_registry::manifest::{check_chain, ChainConfig, LayerInfo};
use kimberley_registry::{Client, Digest, Manifest};

use crate::cli::{
    AddBaseArgs, CacheArgs, CacheCommand, FetchArgs, GcArgs, ListArgs, PushArgs, RemoveBaseArgs,
};

/// Reads an overlay file: its header's annotations, digest and size.
fn layer(path: &Path) -> Result<(LayerInfo, File)> {
    let name = path.display().to_string();
    let f = kimberley_formats::fsutil::open_regular(path, false)
        .with_context(|| format!("opening {name}"))?;
    let size = f
        .metadata()
        .with_context(|| format!("checking {name}"))?
        .len();
    let mut header = Vec::with_capacity(HEADER_LEN);
    let mut hasher = kimberley_registry::Sha256Writer::new(std::io::sink());
    let mut buf = vec![0u8; 1 << 20];
    let mut r = &f;
    loop {
        let n = r
            .read(&mut buf)
            .with_context(|| format!("reading {name}"))?;
        if n == 0 {
            break;
        }
        if header.len() < HEADER_LEN {
            let k = (HEADER_LEN - header.len()).min(n);
            header.extend_from_slice(&buf[..k]);
        }
        hasher.absorb(&buf[..n]);
    }
    if hasher.len() != size {
        anyhow::bail!("{name} changed while it was read");
    }
    let (digest, _) = hasher.finish();
    let info = LayerInfo::from_header(&name, &header, digest, size)
        .map_err(|e| with_code(exit::CORRUPT, e.to_string()))?;
    Ok((info, f))
}

pub fn push(a: PushArgs) -> Result<()> {
    let t0 = Instant::now();
    let r = reference(&a.reference)?;
    let mut layers = Vec::new();
    let mut files = Vec::new();
    for p in &a.overlays {
        let (l, f) = layer(p)?;
        layers.push(l);
        files.push(f);
    }
    check_chain(&layers).map_err(registry_error)?;
    let config = ChainConfig::of(&layers).encode();
    let manifest = Manifest::for_chain(&layers, &config).map_err(registry_error)?;
    let bytes = manifest.encode();
    let mdigest = Digest::of(&bytes);
    if let Some(want) = r.digest {
        if want != mdigest {
            return Err(kimberley_cli::run::usage(format!(
                "{r}: the chain's manifest is {mdigest}, not the digest given"
            )));
        }
    }
    let mut opts = a.registry.options();
    opts.chunk_size = a.chunk_size;
    let client = Client::new(&r, &opts, true).map_err(registry_error)?;
    client.ping().map_err(registry_error)?;
    let mut sent = 0u64;
    let all = std::iter::once((
        manifest.config.digest,
        config.len() as u64,
        &config as &dyn BlobSource,
        "the chain config".to_string(),
    ))
    .chain(
        layers
            .iter()
            .zip(&files)
            .zip(&a.overlays)
            .map(|((l, f), p)| {
                (
                    l.digest,
                    l.size,
                    f as &dyn BlobSource,
                    p.display().to_string(),
                )
            }),
    );
    for (d, size, f, name) in all {
        if client.blob_size(&d).map_err(registry_error)?.is_some() {
            if !a.quiet {
                eprintln!("{name}: {d} is already in the registry");
            }
            continue;
        }
        let mut mounted = false;
        for from in &a.mount_from {
            if client.mount_blob(&d, from).map_err(registry_error)? {
                mounted = true;
                if !a.quiet {
                    eprintln!("{name}: {d} mounted from {from}");
                }
                break;
            }
        }
        if mounted {
            continue;
        }
        let t = Instant::now();
        let quiet = a.quiet;
        client
            .upload_blob(&d, f, size, &|n| {
                if !quiet && size > a.chunk_size {
                    eprintln!("{name}: {} of {}", units::bytes(n), units::bytes(size));
                }
            })
            .map_err(registry_error)?;
        sent += size;
        if !a.quiet {
            eprintln!(
                "{name}: pushed {d} ({}, {})",
                units::bytes(size),
                units::rate(size, t.elapsed())
            );
        }
    }
    let pushed = client
        .put_manifest(r.tag.as_deref(), &bytes)
        .map_err(registry_error)?;
    debug_assert_eq!(pushed, mdigest);
    println!("{}", r.with_digest(mdigest));
    if !a.quiet {
        eprintln!(
            "pushed {r}: {} overlay{}, {} sent in {}",
            layers.len(),
            if layers.len() == 1 { "" } else { "s" },
            units::bytes(sent),
            units::duration(t0.elapsed())
        );
    }
    Ok(())
}

pub fn fetch(a: FetchArgs) -> Result<()> {
    let refs = a
        .references
        .iter()
        .map(|s| reference(s))
        .collect::<Result<Vec<_>>>()?;
    let dir = a.cache.dir();
    let cache = Cache::open(&dir, Mode::Shared).map_err(cache_error)?;
    let opts = a.registry.options();
    let mut changed = false;
    let mut keep = Vec::new();
    let mut first_err: Option<anyhow::Error> = None;
    for r in &refs {
        let t = Instant::now();
        let res = Client::new(r, &opts, false)
            .map_err(registry_error)
            .and_then(|c| fetch::fetch(&cache, &c, r, &|_, _| {}).map_err(cache_error));
        match res {
            Ok(rep) => {
                let d = rep.manifest.expect("a fetch names its manifest");
                keep.push(d);
                if a.pin {
                    cache.pin(&d).map_err(cache_error)?;
                }
                changed |= rep.changed();
                if !a.quiet {
                    if rep.changed() {
                        eprintln!(
                            "{r}: {d}: fetched {} blob{} ({} in {}, {}), {} already cached",
                            rep.fetched,
                            if rep.fetched == 1 { "" } else { "s" },
                            units::bytes(rep.bytes),
                            units::duration(t.elapsed()),
                            units::rate(rep.bytes, t.elapsed()),
                            rep.cached
                        );
                    } else {
                        eprintln!("{r}: {d}: up to date");
                    }
                }
            }
            Err(e) => {
                let e = e.context(format!("fetching {r}"));
                // The first failure is the run's (printed by main, and its
                // exit code); later ones are printed here.
                if first_err.is_none() {
                    first_err = Some(e);
                } else {
                    eprintln!("error: {e:#}");
                }
            }
        }
    }
    drop(cache);
    if let Some(q) = a.quota {
        let cache = Cache::open(&dir, Mode::Exclusive).map_err(cache_error)?;
        let rep = quota::evict(&cache, q, &keep).map_err(cache_error)?;
        if !a.quiet && !rep.evicted.is_empty() {
            eprintln!(
                "quota {}: evicted {} chain{} ({} freed), {} in use",
                units::bytes(q),
                rep.evicted.len(),
                if rep.evicted.len() == 1 { "" } else { "s" },
                units::bytes(rep.freed),
                units::bytes(rep.usage)
            );
        }
    }
    if let Some(e) = first_err {
        return Err(e);
    }
    if changed {
        Ok(())
    } else {
        Err(quiet_exit(exit::NOTHING_NEW))
    }
}

pub fn gc(a: GcArgs) -> Result<()> {
    let dir = a.cache.dir();
    let cache = Cache::open(&dir, Mode::Exclusive).map_err(cache_error)?;
    let rep = match a.quota {
        Some(q) => quota::evict(&cache, q, &[]),
        None => quota::gc(&cache),
    }
    .map_err(cache_error)?;
    if !a.quiet {
        eprintln!(
            "{}: removed {} blob{} and {} chain{} ({} freed), {} in use",
            dir.display(),
            rep.blobs_removed,
            if rep.blobs_removed == 1 { "" } else { "s" },
            rep.evicted.len(),
            if rep.evicted.len() == 1 { "" } else { "s" },
            units::bytes(rep.freed),
            units::bytes(rep.usage)
        );
    }
    Ok(())
}

pub fn cache(a: CacheArgs) -> Result<()> {
    match a.command {
        CacheCommand::AddBase(a) => add_base(a),
        CacheCommand::List(a) => list(a),
        CacheCommand::RemoveBase(a) => remove_base(a),
    }
}

fn add_base(a: AddBaseArgs) -> Result<()> {
    let dir = a.cache.dir();
    let cache = Cache::open(&dir, Mode::Shared).map_err(cache_error)?;
    for vm in &a.vmdirs {
        let t = Instant::now();
        let (id, added) = cache
            .add_base(vm)
            .map_err(cache_error)
            .with_context(|| format!("adding {} to the cache", vm.display()))?;
        let hex = kimberley_formats::digest::hex(&id);
        println!("{hex}");
        if !a.quiet {
            match added {
                Added::New => eprintln!(
                    "{}: added as base {hex} ({})",
                    vm.display(),
                    units::duration(t.elapsed())
                ),
                Added::Present => eprintln!("{}: base {hex} is already in the cache", vm.display()),
            }
        }
    }
    Ok(())
}

fn remove_base(a: RemoveBaseArgs) -> Result<()> {
    let ids = a
        .identities
        .iter()
        .map(|s| {
            kimberley_formats::digest::from_hex(s)
                .filter(|_| !s.bytes().any(|b| b.is_ascii_uppercase()))
                .ok_or_else(|| {
                    kimberley_cli::run::usage(format!(
                        "{s:?} is not an identity (64 lower-case hex digits)"
                    ))
                })
        })
        .collect::<Result<Vec<_>>>()?;
    let dir = a.cache.dir();
    let cache = Cache::open(&dir, Mode::Exclusive).map_err(cache_error)?;
    for (id, s) in ids.iter().zip(&a.identities) {
        if !cache.remove_base(id).map_err(cache_error)? {
            return Err(anyhow::anyhow!(
                "base {s} is not in the cache {}",
                dir.display()
            ));
        }
        if !a.quiet {
            eprintln!("removed base {s}");
        }
    }
    Ok(())
}

fn list(a: ListArgs) -> Result<()> {
    let dir = a.cache.dir();
    let cache = Cache::open(&dir, Mode::Shared).map_err(cache_error)?;
    let chains = cache.chains().map_err(cache_error)?;
    let bases = cache.bases().map_err(cache_error)?;
    let mut out = format!("cache {}\n", dir.display());
    out += &format!("chains ({}, least recently used first):\n", chains.len());
    for c in &chains {
        let size: u64 = c.manifest.layers.iter().map(|l| l.size).sum();
        let ago = c.last_use.elapsed().unwrap_or_default();
        let base = c
            .manifest
            .annotations
            .get(kimberley_registry::manifest::ANN_CHAIN_BASE)
            .map(String::as_str)
            .unwrap_or("?");
        let held = kimberley_formats::digest::from_hex(base)
            .is_some_and(|id| bases.iter().any(|b| b.identity == id));
        out += &format!(
            "  {} {} layer{}, {}, last used {} ago{}{}\n    base {base}{}\n",
            c.digest,
            c.manifest.layers.len(),
            if c.manifest.layers.len() == 1 {
                ""
            } else {
                "s"
            },
            units::bytes(size),
            units::duration(ago),
            if c.pinned { ", pinned" } else { "" },
            if c.complete { "" } else { ", incomplete" },
            if held { " (in the cache)" } else { "" },
        );
        for t in &c.tags {
            out += &format!("    tag {t}\n");
        }
    }
    out += &format!("bases ({}):\n", bases.len());
    for b in &bases {
        out += &format!(
            "  {} {} {}\n",
            kimberley_formats::digest::hex(&b.identity),
            b.name.as_deref().unwrap_or("(unreadable)"),
            b.bytes.map(units::bytes).unwrap_or_default()
        );
    }
    out += &format!(
        "blobs: {} in use\n",
        units::bytes(quota::usage(&cache).map_err(cache_error)?)
    );
    print!("{out}");
    Ok(())
}
