//! The cache's errors, each naming the failing operation.

use thiserror::Error;

/// A cache error.
#[derive(Debug, Error)]
pub enum Error {
    /// A local I/O failure.
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// A blob or manifest whose bytes do not match its digest or size: it
    /// was deleted from the cache.
    #[error("{what} does not match its digest {digest} ({why}); it was removed from the cache")]
    Tampered {
        what: String,
        digest: String,
        why: String,
    },
    /// A base VM in the cache that no longer matches its identity or its
    /// digests: it was removed from the cache.
    #[error("the cached base VM {identity} does not match its identity ({why}); it was removed from the cache")]
    TamperedBase { identity: String, why: String },
    /// A VM directory (a base being added or used) failed.
    #[error(transparent)]
    Vm(#[from] kimberley_formats::Error),
    /// The registry side failed.
    #[error(transparent)]
    Registry(#[from] kimberley_registry::Error),
    /// A reference the cache has no manifest for.
    #[error("{0}: not in the cache (fetch it first)")]
    Missing(String),
    /// A cache directory that is not usable.
    #[error("cache {path}: {why}")]
    Layout { path: String, why: String },
}

/// Results of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An I/O error with its operation.
    pub fn io(op: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            op: op.into(),
            source,
        }
    }

    /// True if this is (or wraps) a digest mismatch of downloaded content.
    pub fn is_tampered(&self) -> bool {
        match self {
            Error::Tampered { .. } | Error::TamperedBase { .. } => true,
            Error::Registry(r) => r.is_digest_mismatch(),
            _ => false,
        }
    }
}

/// Attaches an operation to I/O results.
pub(crate) trait Ctx<T> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Ctx<T> for std::io::Result<T> {
    fn ctx(self, op: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(op(), e))
    }
}
