//! Which backend runs a VM directory: the one its manifest names (the
//! microVM when it names none).

use kimberley_formats::vmdir::VmDir;
use kimberley_machine::{Backend, Machine, RestoreOptions};

use crate::vm::vm_error;

/// The backend for `dir`, after it checked it can resume it here.
pub fn backend_for(dir: &VmDir) -> anyhow::Result<Box<dyn Backend>> {
    let b: Box<dyn Backend> = Box::new(kimberley_vmm::MicroVmBackend);
    b.check(dir).map_err(vm_error)?;
    Ok(b)
}

/// Restores `dir` with its backend.
pub fn restore(dir: &VmDir, opts: RestoreOptions<'_>) -> anyhow::Result<Box<dyn Machine>> {
    backend_for(dir)?.restore(dir, opts).map_err(vm_error)
}
