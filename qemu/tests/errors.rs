//! Clear errors before any guest runs: a missing kernel, a missing QEMU.

mod common;

use std::path::Path;
use std::time::Duration;

use kimberley_qemu::config::{DEFAULT_CMDLINE, DEFAULT_MACHINE_TYPE};
use kimberley_qemu::{Accel, MachineConfig, Vm};

fn config(kernel: &Path) -> MachineConfig {
    MachineConfig {
        kernel: kernel.to_path_buf(),
        initrd: None,
        cmdline: DEFAULT_CMDLINE.into(),
        memory_size: 256 << 20,
        vcpus: 1,
        disks: Vec::new(),
        accel: Accel::Tcg,
        machine_type: DEFAULT_MACHINE_TYPE.into(),
        cpu: "qemu64".into(),
        net: None,
    }
}

#[test]
fn a_missing_kernel_is_named() {
    let t = tempfile::tempdir().unwrap();
    let e = Vm::boot(
        Path::new("qemu-system-x86_64"),
        &config(&t.path().join("no-such-vmlinuz")),
        &t.path().join("memory.raw"),
        Duration::from_secs(5),
        None,
    )
    .unwrap_err();
    let s = e.to_string();
    assert!(s.contains("kernel") && s.contains("no-such-vmlinuz"), "{s}");
}

#[test]
fn a_missing_qemu_is_named() {
    let t = tempfile::tempdir().unwrap();
    let k = t.path().join("vmlinuz");
    std::fs::write(&k, b"not really a kernel").unwrap();
    let e = Vm::boot(
        Path::new("/nonexistent/qemu-system-x86_64"),
        &config(&k),
        &t.path().join("memory.raw"),
        Duration::from_secs(5),
        None,
    )
    .unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("cannot start /nonexistent/qemu-system-x86_64"),
        "{s}"
    );
    let m = kimberley_machine::Error::from(e);
    assert!(
        matches!(
            m,
            kimberley_machine::Error::Backend {
                backend: "qemu",
                ..
            }
        ),
        "{m}"
    );
}

#[test]
fn a_kernel_qemu_cannot_load_is_reported_with_its_words() {
    if !kimberley_qemu::qemu_for_tests() {
        return;
    }
    let _slot = common::qemu_slot();
    let t = tempfile::tempdir().unwrap();
    let k = t.path().join("vmlinuz");
    std::fs::write(&k, b"not really a kernel").unwrap();
    let e = Vm::boot(
        Path::new("qemu-system-x86_64"),
        &config(&k),
        &t.path().join("memory.raw"),
        Duration::from_secs(20),
        None,
    )
    .unwrap_err();
    let s = e.to_string();
    assert!(s.contains("QEMU exited"), "{s}");
    assert!(s.to_lowercase().contains("kernel"), "{s}");
}
