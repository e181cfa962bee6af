//! Shared by the vmctl test suites: the tools' paths, and (one home with
//! the vmm, dekimberlize and vmigrate suites) the tools as processes and
//! the control-socket client.

#![allow(dead_code)]

#[path = "../../../vmm/tests/common/ctl.rs"]
pub mod ctl;
#[path = "../../../vmm/tests/common/tools.rs"]
pub mod tools;

use std::path::{Path, PathBuf};

#[allow(unused_imports)]
pub use ctl::{value, Client};
#[allow(unused_imports)]
pub use tools::{make_base, ok, Logged};

/// A workspace binary: all are built into the same directory.
pub fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_vmctl")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --bins)",
        p.display()
    );
    p
}

pub fn kvm() -> bool {
    kimberley_vmm::kvm_for_tests()
}

/// `vmigrate run VMDIR --control SOCK`, once the socket answers.
pub fn run_vm(vmdir: &Path, sock: &Path) -> Logged {
    let mut c = std::process::Command::new(bin("vmigrate"));
    c.arg("run").arg(vmdir).arg("--control").arg(sock);
    let p = Logged::spawn(&mut c, "run");
    drop(Client::connect(sock));
    p
}
