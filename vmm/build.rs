//! Builds the test guest (`../guest`) from source with the host `rustc` and
//! leaves the ELF in `$OUT_DIR/kimberley-guest`, which `src/guest.rs` embeds.

use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest_dir = manifest.join("../guest/src");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());

    println!("cargo:rerun-if-changed=build.rs");
    for entry in std::fs::read_dir(&guest_dir).expect("read guest/src") {
        let p = entry.expect("guest/src entry").path();
        println!("cargo:rerun-if-changed={}", p.display());
    }

    let elf = out.join("kimberley-guest");
    let status = Command::new(&rustc)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .args([
            "--edition",
            "2021",
            "--crate-type",
            "bin",
            "--crate-name",
            "kimberley_guest",
        ])
        .args([
            "-C",
            "panic=abort",
            "-C",
            "relocation-model=static",
            "-C",
            "opt-level=2",
        ])
        .args(["-C", "debuginfo=0", "-C", "strip=debuginfo"])
        .args([
            "-C",
            "link-arg=-nostdlib",
            "-C",
            "link-arg=-nostartfiles",
            "-C",
            "link-arg=-static",
        ])
        .args(["-C", "link-arg=-Wl,--image-base=0x400000"])
        .arg("-o")
        .arg(&elf)
        .arg(Path::new(&guest_dir).join("main.rs"))
        .status()
        .expect("run rustc for the guest");
    assert!(status.success(), "building the test guest failed");
}
