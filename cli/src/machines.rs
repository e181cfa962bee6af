//! Which backend runs a VM directory: the one its manifest names (the
//! microVM when it names none, QEMU for `"qemu"`).

use std::path::Path;

use kimberley_formats::vmdir::patched::Patched;
use kimberley_formats::vmdir::{Manifest, VmDir};
use kimberley_machine::{Backend, Machine, Placement, RestoreOptions};

use crate::vm::vm_error;

/// The backend that runs `dir` (its `restore` checks it can resume it
/// here).
pub fn backend_for(dir: &VmDir) -> anyhow::Result<Box<dyn Backend>> {
    backend_of(&dir.manifest, &dir.path)
}

/// The backend that runs the VM of `manifest` (`path` names it in
/// messages).
pub fn backend_of(manifest: &Manifest, path: &Path) -> anyhow::Result<Box<dyn Backend>> {
    let b: Box<dyn Backend> = match manifest.machine.as_deref() {
        None => Box::new(kimberley_vmm::MicroVmBackend),
        Some(m) if m.backend == kimberley_qemu::BACKEND => Box::new(kimberley_qemu::QemuBackend::default()),
        Some(m) => {
            return Err(kimberley_formats::Error::VmDir {
                path: path.to_path_buf(),
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

/// Restores `vm` (a chain's launch VM held as its base plus in-memory
/// changes) into the `Placement::CopyInto` directory of `opts`. A backend
/// that restores only directories gets `vm` written out first, into
/// `scratch` (which must not exist; the caller removes it).
pub fn restore_patched(
    vm: &Patched,
    opts: RestoreOptions<'_>,
    scratch: &Path,
) -> anyhow::Result<Box<dyn Machine>> {
    let backend = backend_of(&vm.manifest, &vm.base.path)?;
    if backend.patched_restore() && matches!(opts.placement, Placement::CopyInto(_)) {
        return backend.restore_patched(vm, opts).map_err(vm_error);
    }
    let dir = vm.write_to(scratch)?;
    backend.restore(&dir, opts).map_err(vm_error)
}
