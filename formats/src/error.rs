//! The library's error type. Messages are short; binaries print the chain.

use std::io;
use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the formats and pipelines.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system error, with what was being done.
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// The input ended before the overlay header was complete (or was empty).
    #[error("empty input: no overlay header")]
    Empty,
    /// The input does not start with the overlay magic.
    #[error("not a Kimberley overlay (bad magic)")]
    NotAnOverlay,
    /// A version this build does not read.
    #[error("unsupported {what} version {found} (this build reads version {supported})")]
    Version {
        what: &'static str,
        found: u32,
        supported: u32,
    },
    /// The stream ended early.
    #[error("overlay is truncated: {0}")]
    Truncated(String),
    /// Structurally invalid bytes.
    #[error("overlay is corrupt: {0}")]
    Corrupt(String),
    /// A MAC or AEAD tag did not verify.
    #[error("authentication failed: {0}")]
    Auth(String),
    /// The overlay was made from another base.
    #[error("wrong base: {0}")]
    WrongBase(String),
    /// The overlay chain is out of order or incomplete.
    #[error("overlay chain: {0}")]
    Chain(String),
    /// A VM directory is missing parts or inconsistent.
    #[error("VM directory {path}: {why}")]
    VmDir { path: PathBuf, why: String },
    /// The result does not match the digest the overlay promised.
    #[error("result check failed: {0}")]
    Mismatch(String),
    /// Refusing to overwrite.
    #[error("{0} already exists; refusing to overwrite it")]
    Exists(PathBuf),
    /// A key or passphrase problem: the wrong kind of secret for an
    /// overlay, or a key derivation that failed.
    #[error("key: {0}")]
    Key(String),
    /// A mistake in what the user gave: a required key or passphrase
    /// missing, a malformed key or passphrase file. Key-file parsers return
    /// this so that the tools exit with the usage code.
    #[error("{0}")]
    Usage(String),
    /// Bad arguments to a library call.
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// The process exit code in `docs/FORMAT.md` ("Exit codes"; also in
    /// every man page).
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Io { .. } | Error::Invalid(_) => 1,
            Error::Usage(_) => 2,
            Error::Empty
            | Error::NotAnOverlay
            | Error::Version { .. }
            | Error::Truncated(_)
            | Error::Corrupt(_) => 3,
            Error::Auth(_) | Error::Key(_) => 4,
            Error::WrongBase(_) | Error::Chain(_) => 5,
            Error::Exists(_) => 6,
            Error::VmDir { .. } => 7,
            Error::Mismatch(_) => 8,
        }
    }

    /// True when the error is a broken pipe on output (not worth reporting).
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == io::ErrorKind::BrokenPipe)
    }
}

/// Extension to attach context to `io::Result`.
pub trait IoContext<T> {
    /// Adds `what` as the context of an I/O error.
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
