//! Front-end helpers for commands that run a VM.

use kimberley_vmm::Error as VmError;

use crate::run::{WithCode, EXIT_VM};

/// Turns a VMM error into an error with the documented exit code: a VM
/// directory problem keeps its own code, everything else is a VM failure.
pub fn vm_error(e: VmError) -> anyhow::Error {
    match e {
        VmError::VmDir(f) => f.into(),
        other => anyhow::Error::new(WithCode(EXIT_VM, other.to_string())),
    }
}

/// A VM failure with a message (script errors and the like).
pub fn vm_failure(msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(WithCode(EXIT_VM, msg.into()))
}
