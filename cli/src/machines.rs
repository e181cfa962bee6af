//! Which backend runs a VM directory: the one its manifest names (the
//! microVM when it names none, QEMU for `"qemu"`).

use kimberley_formats::vmdir::VmDir;
use kimberley_machine::{Backend, Machine, RestoreOptions};

use crate::vm::vm_error;

/// The backend that runs `dir` (its `restore` checks it can resume it
/// here).
pub fn backend_for(dir: &VmDir) -> anyhow::Result<Box<dyn Backend>> {
    let b: Box<dyn Backend> = match dir.manifest.machine.as_deref() {
        None => Box::new(kimberley_vmm::MicroVmBackend),
        Some(m) if m.backend == kimberley_qemu::BACKEND => Box::new(kimberley_qemu::QemuBackend::default()),
        Some(m) => {
            return Err(kimberley_formats::Error::VmDir {
                path: dir.path.clone(),
                why: format!(
                    "made for the {:?} backend, which this build does not have (it has \"microvm\" and \"qemu\")",
                    m.backend
                ),
            }
            .into())
        }
    };
    Ok(b)
}

/// Restores `dir` with its backend.
pub fn restore(dir: &VmDir, opts: RestoreOptions<'_>) -> anyhow::Result<Box<dyn Machine>> {
    backend_for(dir)?.restore(dir, opts).map_err(vm_error)
}
