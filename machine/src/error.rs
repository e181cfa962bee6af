//! The seam's error type: what front ends tell apart (a VM directory
//! problem, an interruption, a timeout), and the backend's own message for
//! the rest.

use std::time::Duration;

/// Result alias of the seam.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a machine operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A VM directory is missing, unreadable or inconsistent (exit 7), or
    /// another format problem.
    #[error(transparent)]
    VmDir(#[from] kimberley_formats::Error),
    /// The guest did not answer in time.
    #[error("timed out after {0:?} waiting for the guest")]
    Timeout(Duration),
    /// A wait ended because the interrupt flag was set (SIGINT/SIGTERM).
    #[error("interrupted: the VM is being stopped")]
    Interrupted,
    /// The operation needs a running VM.
    #[error("the VM is paused")]
    Paused,
    /// The guest stopped on its own (crash, panic, power-off).
    #[error("the guest stopped: {0}")]
    GuestStopped(String),
    /// A script that cannot be run as given.
    #[error("invalid script: {0}")]
    Script(String),
    /// This backend cannot do that (or not on this host).
    #[error("{0}")]
    Unsupported(String),
    /// The control socket failed.
    #[error("control socket: {0}")]
    Control(String),
    /// An operating-system error, with what was being done.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Anything else the backend reports (its own message).
    #[error("{backend}: {message}")]
    Backend {
        /// Which backend.
        backend: &'static str,
        /// What went wrong.
        message: String,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Error::Io(what.into(), e)
    }
}
