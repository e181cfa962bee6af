//! The registry client's errors, each naming the failing operation.

use thiserror::Error;

/// A registry client error.
#[derive(Debug, Error)]
pub enum Error {
    /// A reference that does not parse (`HOST[:PORT]/REPO[:TAG][@sha256:HEX]`).
    #[error("invalid reference {0:?}: {1}")]
    Reference(String, String),
    /// A digest that does not parse (`sha256:` and 64 lower-case hex digits).
    #[error("invalid digest {0:?}")]
    Digest(String),
    /// A manifest or config that is not what this project writes.
    #[error("invalid manifest: {0}")]
    Manifest(String),
    /// An overlay whose header cannot be read, or a chain whose links do
    /// not follow.
    #[error("{0}")]
    Chain(String),
    /// Plain HTTP to a host that is not on loopback without the explicit flag.
    #[error("refusing plain HTTP to {0}: use https, or --insecure-http to allow it")]
    InsecureHttp(String),
    /// The registry denied access (401/403 after authenticating).
    #[error("{op}: access denied by the registry ({status}){detail}")]
    Denied {
        op: String,
        status: u16,
        detail: String,
    },
    /// The registry has no such blob, manifest or repository.
    #[error("{op}: not found in the registry{detail}")]
    NotFound { op: String, detail: String },
    /// Any other unexpected answer.
    #[error("{op}: unexpected answer {status} from the registry{detail}")]
    Status {
        op: String,
        status: u16,
        detail: String,
    },
    /// A body bigger than this client reads for its kind.
    #[error("{op}: the registry's answer is larger than {limit} bytes")]
    TooLarge { op: String, limit: u64 },
    /// A blob whose bytes do not hash to its digest, or are not its size.
    #[error("{what}: content does not match digest {digest} ({why})")]
    DigestMismatch {
        what: String,
        digest: String,
        why: String,
    },
    /// Network or protocol failure.
    #[error("{op}: {source}")]
    Http {
        op: String,
        #[source]
        source: Box<ureq::Error>,
    },
    /// A local I/O failure.
    #[error("{op}: {source}")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// An auth file that cannot be read or parsed.
    #[error("auth file {path}: {why}")]
    AuthFile { path: String, why: String },
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

    /// An HTTP error with its operation.
    pub fn http(op: impl Into<String>, source: ureq::Error) -> Error {
        match source {
            ureq::Error::Io(e) => Error::Io {
                op: op.into(),
                source: e,
            },
            other => Error::Http {
                op: op.into(),
                source: Box::new(other),
            },
        }
    }

    /// True for a digest or size mismatch of downloaded content.
    pub fn is_digest_mismatch(&self) -> bool {
        matches!(self, Error::DigestMismatch { .. })
    }
}
