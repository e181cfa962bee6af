//! Sessions from a registry reference: the daemon applies the chain from
//! its cloudlet cache (fetching it from an allowed registry, Debian's
//! docker-registry on loopback); a registry it does not allow is refused
//! before anything is fetched.

mod common;

#[path = "../../registry/tests/common/oci.rs"]
mod oci;

use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::*;
use serde_json::{json, Value};

fn offload_from(t: &Path, d: &Daemon, pki: &Pki, r: &str) -> Output {
    Command::new(bin("kimberlize"))
        .args(["offload", "--from", r, "-k"])
        .arg(t.join("key"))
        .arg("--cloudlet")
        .arg(d.addr.to_string())
        .arg("--cert")
        .arg(&pki.device.0)
        .arg("--key")
        .arg(&pki.device.1)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

#[test]
fn a_reference_is_served_from_the_cache_of_an_allowed_registry() {
    if !kvm() {
        return;
    }
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let r = format!("{}/apps/app:v1", reg.addr());
    let o = Command::new(bin("kimberlize"))
        .args(["push", "-q", &r])
        .arg(t.join("app.ovl"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let pki = Pki::new(t);
    let cache = t.join("cache");
    let cache_arg = cache.to_str().unwrap();

    // Not an allowed registry: refused, nothing fetched, nothing kept.
    let d = Daemon::start(t, &pki, &t.join("base"), &["--cache", cache_arg]);
    let o = offload_from(t, &d, &pki, &r);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--allow-registry"),
        "{err}"
    );
    assert!(
        !cache.exists()
            || std::fs::read_dir(cache.join("blobs/sha256")).map_or(0, |d| d.count()) == 0
    );
    assert!(d.session_dirs().is_empty());
    drop(d);

    let t2 = t.join("allowed");
    std::fs::create_dir(&t2).unwrap();
    let d = Daemon::start(
        &t2,
        &pki,
        &t.join("base"),
        &["--cache", cache_arg, "--allow-registry", &reg.addr()],
    );
    let o = offload_from(t, &d, &pki, &r);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["from"], r.as_str());
    let id = v["session"].as_str().unwrap();
    let c = d.client(&pki.device_id());
    let out = c
        .control(
            id,
            "exec",
            Some(&json!({"script": "checksum app\ncounter\n"})),
        )
        .unwrap();
    assert_eq!(out["status"], 0, "{out}");
    assert!(
        out["output"].as_str().unwrap().contains("checksum app "),
        "{out}"
    );
    c.delete(id, false).unwrap();
    assert!(d.session_dirs().is_empty());

    // The chain is in the cache now: a second session needs no registry.
    drop(reg);
    let o = offload_from(t, &d, &pki, &r);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    c.delete(v["session"].as_str().unwrap(), false).unwrap();
}
