//! A Linux guest (QEMU) through the daemon, as the microVM: `kimberlize
//! base --qemu` and `build` with shell scripts, then `kimberlize offload`
//! to kimberlized, and the guest's agent answering through the API. Needs
//! qemu-system-x86_64 and the artifacts of scripts/linux-base.sh; with
//! KIMBERLEY_REQUIRE_QEMU=1 (CI) a test that would skip fails.

mod common;

#[path = "../../qemu/tests/common/guest.rs"]
mod linux_guest;

use std::process::{Command, Stdio};

use common::*;
use serde_json::{json, Value};

const INSTALL: &str = "set -e\nmkdir -p /run/app\necho kimberley-offload-app > /run/app/marker\n\
(i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 0.1; done) </dev/null >/dev/null 2>&1 &\n";
const RESUME: &str = "sleep 1\n";

fn ok(c: &mut Command) -> std::process::Output {
    let o = c.stdin(Stdio::null()).output().unwrap();
    assert!(
        o.status.success(),
        "{c:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

#[test]
fn a_linux_guest_runs_on_the_cloudlet() {
    if !kimberley_qemu::qemu_for_tests() {
        return;
    }
    let _g = serial();
    let _slot = linux_guest::qemu_slot();
    let a = linux_guest::artifacts();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    ok(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(t.join("key")));
    ok(Command::new(bin("kimberlize"))
        .args(["base", "--qemu", "--memory", "256M", "--kernel"])
        .arg(&a.kernel)
        .arg("--initrd")
        .arg(&a.initrd)
        .arg("-o")
        .arg(t.join("base")));
    std::fs::write(t.join("install.sh"), INSTALL).unwrap();
    std::fs::write(t.join("resume.sh"), RESUME).unwrap();
    ok(Command::new(bin("kimberlize"))
        .args(["build", "-q", "--base"])
        .arg(t.join("base"))
        .arg("--install")
        .arg(t.join("install.sh"))
        .arg("--resume")
        .arg(t.join("resume.sh"))
        .arg("-k")
        .arg(t.join("key"))
        .arg("-o")
        .arg(t.join("app.ovl")));
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &["--max-memory", "1G"]);
    let o = ok(Command::new(bin("kimberlize"))
        .arg("offload")
        .arg(t.join("app.ovl"))
        .arg("-k")
        .arg(t.join("key"))
        .arg("--cloudlet")
        .arg(d.addr.to_string())
        .arg("--cert")
        .arg(&pki.device.0)
        .arg("--key")
        .arg(&pki.device.1)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .arg("--json"));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = v["session"].as_str().unwrap();
    let c = d.client(&pki.device_id());
    let s = c.control(id, "status", None).unwrap();
    assert_eq!(s["backend"], "qemu", "{s}");
    let r = c
        .control(
            id,
            "exec",
            Some(&json!({"script": "cat /run/app/marker; cat /run/count", "timeout_ms": 60000})),
        )
        .unwrap();
    assert_eq!(r["status"], 0, "{r}");
    let out = r["output"].as_str().unwrap();
    assert!(out.contains("kimberley-offload-app"), "{out}");
    let count: u64 = out.lines().last().unwrap().trim().parse().unwrap();
    assert!(count > 0, "{out}");
    c.delete(id, false).unwrap();
    assert!(d.session_dirs().is_empty());
}
