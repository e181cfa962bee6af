//! Kimberley microVM: a small KVM VMM in the layout of Firecracker
//! (`vstate/` for KVM state, `devices/`, `persist/`), running the project's
//! CPL-3 test guest (`../guest`). See docs/VMM.md.

pub mod abi;
mod arch;
pub mod devices;
mod error;
mod loader;
pub mod machine;
pub mod persist;
pub mod probe;
mod runner;
mod vm;
pub mod vmdir;
pub mod vstate;

use std::path::PathBuf;

pub use error::{Error, Result};
pub use kimberley_machine::ScriptOutcome;
pub use machine::{MicroVmBackend, BACKEND};
pub use vm::{validate_state, OpenedFile, Vm, GUEST_ELF, MEMORY_ALIGN};

/// For test suites that need KVM: true when `/dev/kvm` can be opened.
/// When it cannot and `KIMBERLEY_REQUIRE_KVM=1` (CI sets it when
/// `/dev/kvm` exists), panics: a skipped KVM test is a failure there.
pub fn kvm_for_tests() -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("KIMBERLEY_REQUIRE_KVM").as_deref() != Ok("1"),
            "/dev/kvm is not usable and KIMBERLEY_REQUIRE_KVM=1"
        );
        eprintln!("skipping: no usable /dev/kvm");
    }
    ok
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest RAM in bytes (multiple of 2 MiB, 16 MiB to 3 GiB).
    pub memory_size: u64,
    /// vCPUs (vCPU 0 runs the guest; the rest are created and parked).
    pub vcpus: u8,
    /// Raw disk images, opened read-write, attached as virtio-blk in order.
    pub disks: Vec<PathBuf>,
}
