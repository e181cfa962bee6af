//! Kimberley's QEMU backend: Linux guests under `qemu-system-x86_64` (TCG
//! here, KVM on hosts with hardware virtualisation), their RAM the VM
//! directory's `memory.raw` (a shared `memory-backend-file`), their device
//! state QEMU's migration stream (`state.bin`), scripts run through
//! qemu-guest-agent. [`boot`] makes a base VM directory; [`QemuBackend`]
//! and [`QemuMachine`] implement the machine seam (`kimberley-machine`).

pub mod accel;
pub mod backend;
pub mod config;
mod error;
pub mod process;
pub mod qga;
pub mod qmp;
pub mod reclaim;
mod sys;
pub mod vm;
mod wire;

pub use accel::AccelChoice;
pub use backend::{boot, BootConfig, Booted, QemuBackend, QemuMachine};
pub use config::{Accel, MachineConfig, UserNet};
pub use error::{Error, Result};
pub use vm::Vm;

/// The name QEMU VM directories record as their backend.
pub const BACKEND: &str = "qemu";

/// True if `qemu-system-x86_64` can be run here; tests return early
/// (skip) when it is false. With `KIMBERLEY_REQUIRE_QEMU=1` (CI) a
/// missing QEMU fails the test instead.
pub fn qemu_for_tests() -> bool {
    let ok = std::process::Command::new(config::QEMU)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("KIMBERLEY_REQUIRE_QEMU").as_deref() != Ok("1"),
            "{} cannot be run and KIMBERLEY_REQUIRE_QEMU=1",
            config::QEMU
        );
        eprintln!("skipping: no {}", config::QEMU);
    }
    ok
}
