//! The control socket of `dekimberlize --run` through a real process on
//! real KVM: every request, a snapshot that resumes, the default socket
//! location, and SIGTERM while a script runs. With KIMBERLEY_REQUIRE_KVM=1
//! these fail instead of skipping when /dev/kvm is missing.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::tools::{build_app, check_snapshot_resumes, dir_with_mode, STATE};
use common::*;
use kimberley_formats::vmdir::VmDir;
use serde_json::json;

const INSTALL: &str = "fill app 4M 1 random\ndisk-write 0 64K 3\ncounter start\n";

/// A key, a base, an overlay; `dekimberlize --run` of it with `args`.
fn launch(t: &Path, args: &[&str], envs: &[(&str, &Path)]) -> Logged {
    let p = |n: &str| t.join(n);
    build_app(t, "32M", "4M", INSTALL, &[]);
    let mut cmd = Command::new(bin("dekimberlize"));
    cmd.arg("--base")
        .arg(p("base"))
        .arg("-i")
        .arg(p("app.ovl"))
        .arg("-k")
        .arg(p("key"))
        .arg("-o")
        .arg(p("out"))
        .arg("--run")
        .args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Logged::spawn(&mut cmd, "dekimberlize")
}

#[test]
fn every_request_through_dekimberlize_run() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("app.sock");
    let mut p = launch(t.path(), &["--control", sock.to_str().unwrap()], &[]);
    let mut c = Client::connect(&sock);
    let before = c.exec_ok(STATE);
    let snap = t.path().join("snap");
    ctl::check_every_request(&sock, &snap, false);
    c.exec_ok("fill app 4M 9 random\n");
    drop(c);
    stop(&mut p, &sock);
    VmDir::open(&t.path().join("out"))
        .unwrap()
        .verify()
        .unwrap();
    // The snapshot is a VM directory that resumes where it was.
    check_snapshot_resumes(t.path(), &snap, &before);
}

/// Without --control the socket is in a private directory under
/// `$XDG_RUNTIME_DIR`; SIGTERM during a long script suspends at once.
#[test]
fn default_socket_and_sigterm_during_a_script() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let xdg = dir_with_mode(t.path(), "xdg", 0o700);
    let mut p = launch(t.path(), &[], &[("XDG_RUNTIME_DIR", &xdg)]);
    let prefix = "launch VM running; control socket ";
    let line = p.line_starting(prefix, Duration::from_secs(60));
    let sock = PathBuf::from(line[prefix.len()..].split(" (").next().unwrap());
    assert_eq!(
        sock,
        xdg.join("kimberley")
            .join(format!("dekimberlize-{}.sock", p.pid()))
    );
    let c = Client::connect(&sock);
    assert_eq!(
        std::fs::metadata(&sock).unwrap().mode() & 0o777,
        0o600,
        "socket mode"
    );
    let s2 = sock.clone();
    let client = std::thread::spawn(move || {
        Client::connect(&s2).call_json(json!({"cmd": "exec", "script": "sleep 15000"}))
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    p.signal(libc::SIGTERM);
    assert!(p.wait_exit(Duration::from_secs(10)).success());
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "suspending took {took:?}");
    let r = client.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().starts_with("interrupted"),
        "{r}"
    );
    assert!(!sock.exists());
    drop(c);
    VmDir::open(&t.path().join("out"))
        .unwrap()
        .verify()
        .unwrap();
}
