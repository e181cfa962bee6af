//! Helpers shared by the KVM tests.

#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use kimberley_vmm::{Vm, VmConfig};

#[path = "../../../guest/src/gen.rs"]
pub mod gen;

pub const T: Duration = Duration::from_secs(30);

/// True if KVM tests can run; panics if they must (KIMBERLEY_REQUIRE_KVM=1).
pub fn kvm_available() -> bool {
    kimberley_vmm::kvm_for_tests()
}

pub fn boot(mem_mib: u64, disks: &[&Path]) -> Vm {
    let cfg = VmConfig {
        memory_size: mem_mib << 20,
        vcpus: 1,
        disks: disks.iter().map(|p| p.to_path_buf()).collect(),
    };
    let mut vm = Vm::boot(&cfg).expect("boot");
    vm.wait_ready(T).expect("ready");
    vm
}

/// Runs a script that must succeed; returns its lines.
pub fn run_ok(vm: &mut Vm, script: &str) -> Vec<String> {
    let o = vm.run_script(script, &mut |_| {}, T).expect("run_script");
    assert_eq!(o.status, 0, "script failed: {:?}", o.lines);
    o.lines
}

pub fn hex(h: u64) -> String {
    format!("{h:016x}")
}

pub fn make_disk(dir: &Path, size: u64) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}
