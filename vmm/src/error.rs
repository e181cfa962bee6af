//! The crate's error type.

use std::path::PathBuf;
use std::time::Duration;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in the VMM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm is missing or cannot be opened.
    #[error("no usable /dev/kvm: {0}")]
    KvmUnavailable(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {0} failed: {1}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// An I/O operation on a file failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// The VM configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The embedded guest image is unusable.
    #[error("guest image: {0}")]
    Image(String),
    /// A state blob is corrupt or inconsistent.
    #[error("corrupt state blob: {0}")]
    CorruptState(String),
    /// A state blob of another format version.
    #[error("state blob has version {found}, this VMM reads version {expected}")]
    StateVersion {
        /// Version found in the blob.
        found: u32,
        /// Version this build reads.
        expected: u32,
    },
    /// The state blob does not match the files given to restore.
    #[error("state does not match {0}: {1}")]
    StateMismatch(PathBuf, String),
    /// The guest executed into a triple fault (KVM_EXIT_SHUTDOWN).
    #[error("guest crashed (triple fault)")]
    TripleFault,
    /// The guest reported a panic.
    #[error("guest panicked: {0}")]
    GuestPanic(String),
    /// The vCPU stopped for another reason.
    #[error("vCPU stopped: {0}")]
    VcpuStopped(String),
    /// The guest did not answer in time.
    #[error("timed out after {0:?} waiting for the guest")]
    Timeout(Duration),
    /// A wait ended early because the caller's interrupt flag was set
    /// (see `Vm::set_interrupt`: SIGINT/SIGTERM while a script runs).
    #[error("interrupted: the VM is being stopped")]
    Interrupted,
    /// The operation needs a running VM.
    #[error("the VM is paused")]
    Paused,
    /// The script cannot be sent to the guest.
    #[error("invalid script: {0}")]
    Script(String),
    /// Dirty-page logging is not enabled.
    #[error("dirty page logging is not enabled")]
    DirtyLogDisabled,
    /// No such disk.
    #[error("no disk with index {0}")]
    NoSuchDisk(usize),
    /// The control socket failed.
    #[error("control socket: {0}")]
    Control(String),
    /// Reading or writing a VM directory failed.
    #[error(transparent)]
    VmDir(#[from] kimberley_formats::Error),
}

impl Error {
    pub(crate) fn io(ctx: impl Into<String>, e: std::io::Error) -> Error {
        Error::Io(ctx.into(), e)
    }

    pub(crate) fn corrupt(msg: impl Into<String>) -> Error {
        Error::CorruptState(msg.into())
    }
}

/// The state blob is the only thing the VMM decodes with
/// `kimberley_formats::le`, so a refusal there is a corrupt state blob
/// (the message names the field or section and what was wrong).
impl From<kimberley_formats::le::LeError> for Error {
    fn from(e: kimberley_formats::le::LeError) -> Error {
        Error::CorruptState(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages() {
        let e = Error::KvmUnavailable(kvm_ioctls::Error::new(libc::ENOENT));
        assert!(e.to_string().starts_with("no usable /dev/kvm: "), "{e}");
        assert_eq!(
            Error::TripleFault.to_string(),
            "guest crashed (triple fault)"
        );
        let v = Error::StateVersion {
            found: 9,
            expected: 1,
        };
        assert_eq!(
            v.to_string(),
            "state blob has version 9, this VMM reads version 1"
        );
        let t: Error = kimberley_formats::le::LeError::Truncated {
            what: "vCPU section",
        }
        .into();
        assert_eq!(
            t.to_string(),
            "corrupt state blob: vCPU section is truncated"
        );
    }
}
