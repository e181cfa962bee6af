//! Options shared by the commands that use registries and the cloudlet
//! cache (`kimberlize push`, `fetch`, `gc`, `dekimberlize --from`), and
//! their errors' exit codes.

use std::path::PathBuf;

use clap::Args;
use kimberley_formats::apply::{Input, Opened};
use kimberley_formats::sys::lock::Mode;
use kimberley_formats::vmdir::VmDir;
use kimberley_registry::manifest::ANN_CHAIN_BASE;
use kimberley_registry::{ClientOptions, Manifest, Reference};

use crate::exit;
use crate::run::{usage, with_code};

/// How to reach registries.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// Allow plain HTTP to a registry that is not on loopback (loopback
    /// registries are spoken to over plain HTTP; everything else over TLS,
    /// with the system's roots).
    #[arg(long)]
    pub insecure_http: bool,
    /// A docker-style auth file (`auths`: `{"HOST[:PORT]": {"auth":
    /// base64(user:password)}}`). Default: $DOCKER_CONFIG/config.json, else
    /// ~/.docker/config.json. Credentials answer Basic challenges and buy
    /// bearer tokens.
    #[arg(long, value_name = "FILE")]
    pub auth_file: Option<PathBuf>,
}

impl RegistryArgs {
    /// The client options these give.
    pub fn options(&self) -> ClientOptions {
        ClientOptions {
            insecure_http: self.insecure_http,
            auth_file: self.auth_file.clone(),
            ..ClientOptions::default()
        }
    }
}

/// Where the cloudlet cache is.
#[derive(Debug, Clone, Args)]
pub struct CacheArgs {
    /// The cloudlet cache directory (created 0700). Default:
    /// /var/cache/kimberley for root, ${XDG_CACHE_HOME:-~/.cache}/kimberley
    /// for other users.
    #[arg(long, value_name = "DIR")]
    pub cache: Option<PathBuf>,
}

impl CacheArgs {
    /// The directory.
    pub fn dir(&self) -> PathBuf {
        self.cache
            .clone()
            .unwrap_or_else(kimberley_cache::default_dir)
    }
}

/// Parses a reference (a usage error if it does not parse).
pub fn reference(s: &str) -> anyhow::Result<Reference> {
    Reference::parse(s).map_err(|e| usage(e.to_string()))
}

/// A registry error with its exit code: content that does not match its
/// digest exits [`exit::TAMPERED`]; a chain out of order [`exit::WRONG_BASE`].
pub fn registry_error(e: kimberley_registry::Error) -> anyhow::Error {
    match &e {
        kimberley_registry::Error::DigestMismatch { .. } => {
            with_code(exit::TAMPERED, e.to_string())
        }
        kimberley_registry::Error::Chain(_) => with_code(exit::WRONG_BASE, e.to_string()),
        kimberley_registry::Error::Reference(..) => usage(e.to_string()),
        _ => anyhow::Error::new(e),
    }
}

/// A cache error with its exit code (see [`registry_error`]).
pub fn cache_error(e: kimberley_cache::Error) -> anyhow::Error {
    match e {
        kimberley_cache::Error::Registry(r) => registry_error(r),
        // A VM directory's error keeps its own exit code.
        kimberley_cache::Error::Vm(f) => anyhow::Error::new(f),
        e if e.is_tampered() => with_code(exit::TAMPERED, e.to_string()),
        e => anyhow::Error::new(e),
    }
}

/// True if `e`'s chain holds a cache error for content that did not match
/// its digest (also inside an I/O error, as a streamed layer reports it).
pub fn tampered_in(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<kimberley_cache::Error>()
            .is_some_and(|ce| ce.is_tampered())
            || c.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<kimberley_cache::Error>())
                .is_some_and(|ce| ce.is_tampered())
    })
}

/// The cache's file of `r`'s tag (None for a digest reference, which
/// never moves): what a Makefile rule built on `r` depends on, since
/// `kimberlize fetch` replaces it when the tag moves.
pub fn tag_file(r: &str, cache: &CacheArgs) -> anyhow::Result<Option<std::path::PathBuf>> {
    let r = reference(r)?;
    let cache = kimberley_cache::Cache::open(&cache.dir(), Mode::Shared).map_err(cache_error)?;
    cache.tag_path(&r).map_err(cache_error)
}

/// A chain to apply from the cache: its layers' readers, in chain order,
/// and its manifest.
pub struct Chain {
    pub inputs: Vec<Input>,
    pub manifest: Manifest,
}

/// The layers of the chain `r` names, in chain order, to apply
/// (`dekimberlize --from`, `kimberlize diff --parent-from`, `kimberlize
/// build --parent-from`): see
/// [`open_chain`].
pub fn chain_inputs(
    r: &str,
    cache: &CacheArgs,
    registry: &RegistryArgs,
) -> anyhow::Result<Vec<Input>> {
    Ok(open_chain(r, cache, registry)?.inputs)
}

/// The chain `r` names, to apply: from the cache when it has the chain (no
/// network: a cached tag is used as it is), else the manifest from the
/// registry and the missing layers streamed from it, teed into the cache
/// and checked against their digests at their end.
pub fn open_chain(r: &str, cache: &CacheArgs, registry: &RegistryArgs) -> anyhow::Result<Chain> {
    let r = reference(r)?;
    let cache = kimberley_cache::Cache::open(&cache.dir(), Mode::Shared).map_err(cache_error)?;
    let client =
        kimberley_registry::Client::new(&r, &registry.options(), false).map_err(registry_error)?;
    let (d, manifest) = match cache.resolve(&r).map_err(cache_error)? {
        Some(d) => match cache.manifest(&d).map_err(cache_error)? {
            Some(m) => (d, m),
            None => return Err(kimberley_cache::Error::Missing(r.to_string()).into()),
        },
        None => {
            let (d, m, _) =
                kimberley_cache::fetch::manifest(&cache, &client, &r).map_err(cache_error)?;
            cache.set_tag(&r, &d).map_err(cache_error)?;
            (d, m)
        }
    };
    cache.touch(&d).map_err(cache_error)?;
    let n = manifest.layers.len();
    let inputs = manifest
        .layers
        .iter()
        .enumerate()
        .map(|(i, desc)| {
            let reader = kimberley_cache::fetch::open_layer(&cache, Some(&client), desc)
                .map_err(cache_error)?;
            Ok(Input {
                name: format!("{r} layer {} of {n}", i + 1),
                reader,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(Chain { inputs, manifest })
}

/// The base VM in the cache that the chain's first overlay (opened, so
/// with its keys) applies to, checked again before it is returned (every
/// digest: a base that fails is removed and the error exits
/// [`exit::TAMPERED`]). None in the cache: an error naming the identity
/// the chain's annotations give (for an encrypted chain, a keyed
/// commitment to it), exit [`exit::VMDIR`].
pub fn cached_base(
    cache: &CacheArgs,
    first: &Opened,
    manifest: &Manifest,
) -> anyhow::Result<VmDir> {
    let dir = cache.dir();
    let c = kimberley_cache::Cache::open(&dir, Mode::Shared).map_err(cache_error)?;
    match c
        .find_base(&|id| first.applies_to(id))
        .map_err(cache_error)?
    {
        Some(id) => c.open_base(&id).map_err(cache_error),
        None => {
            let named = manifest
                .annotations
                .get(ANN_CHAIN_BASE)
                .map(String::as_str)
                .unwrap_or("(not annotated)");
            let what = if first.keys.is_some() {
                format!("the base VM this encrypted chain commits to ({named}, keyed)")
            } else {
                format!("base VM {named}")
            };
            Err(with_code(
                exit::VMDIR,
                format!(
                    "{what} is not in the cache {}: add it with `kimberlize cache add-base VMDIR`, or give --base",
                    dir.display()
                ),
            ))
        }
    }
}
