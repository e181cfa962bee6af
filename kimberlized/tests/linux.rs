//! A Linux guest (QEMU) through the daemon, as the microVM: `kimberlize
//! base --qemu` and `build` with shell scripts, then `kimberlize offload`
//! to kimberlized, and the guest's agent answering through the API; a
//! guest's web server through a forwarded port, across restarts. Needs
//! qemu-system-x86_64 and the artifacts of scripts/linux-base.sh; with
//! KIMBERLEY_REQUIRE_QEMU=1 (CI) a test that would skip fails.

mod common;

#[path = "../../qemu/tests/common/guest.rs"]
mod linux_guest;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kimberlized::api::{Forward, SessionInfo, State};
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

/// `GET /` through `addr`: the body, retried for up to 60 s (the guest's
/// network comes back with the VM).
fn http_get(addr: SocketAddr) -> String {
    let t = Instant::now();
    loop {
        let got = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).and_then(|mut s| {
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut b = String::new();
            s.read_to_string(&mut b)?;
            Ok(b)
        });
        match got {
            Ok(b) if b.contains("200") => return b,
            _ if t.elapsed() < Duration::from_secs(60) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => panic!("no answer through {addr}: {other:?}"),
        }
    }
}

/// Stops daemon `d` with SIGTERM (its sessions suspend) and waits for it.
fn restart(t: &Path, pki: &Pki, d: Daemon) -> Daemon {
    let mut d = d;
    d.proc.signal(libc::SIGTERM);
    let st = d.proc.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "{st}: {}", d.proc.stderr());
    event(&d.proc, "session.suspended", Duration::from_secs(1));
    drop(d);
    Daemon::start(t, pki, &t.join("base"), &["--max-memory", "1G"])
}

#[test]
fn a_linux_guests_port_is_forwarded_and_comes_back_after_restarts() {
    if !kimberley_qemu::qemu_for_tests() {
        return;
    }
    let _g = serial();
    let _slot = linux_guest::qemu_slot();
    let a = linux_guest::artifacts();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    linux_web_app(t, &a.kernel, &a.initrd);
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &["--max-memory", "1G"]);
    let offload = |d: &Daemon, json: bool| {
        let mut c = Command::new(bin("kimberlize"));
        c.arg("offload")
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
            .args(["--port", "8080", "--port", "22"]);
        if json {
            c.arg("--json");
        }
        ok(&mut c)
    };
    let o = offload(&d, true);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = v["session"].as_str().unwrap().to_string();
    let forwards: Vec<Forward> = serde_json::from_value(v["forwards"].clone()).unwrap();
    assert_eq!(
        forwards.iter().map(|f| f.guest).collect::<Vec<_>>(),
        [8080, 22],
        "{v}"
    );
    let web = forwards[0].host;
    // The daemon forwards on the address it listens on, a port of its
    // own choosing, and nothing else of the host.
    assert_eq!(web.ip(), d.addr.ip(), "{v}");
    assert_ne!(web.port(), d.addr.port());
    assert!(forwards[1].host.port() != web.port());
    let body = http_get(web);
    assert!(body.contains(WEB_MARKER), "{body}");
    // The session object says the same.
    let c = d.client(&pki.device_id());
    let s = c.session(&id).unwrap();
    assert_eq!(
        (s.ports.clone(), s.forwards.clone()),
        (vec![8080, 22], forwards.clone())
    );
    assert_eq!(d.events("session.forwards").len(), 1);

    // A restart suspends the VM (its forward goes with it) and a resume
    // brings it back with the same host port.
    let d = restart(t, &pki, d);
    assert!(
        TcpStream::connect(web).is_err(),
        "{web} answers with the VM suspended"
    );
    let c = d.client(&pki.device_id());
    let s = c.session(&id).unwrap();
    assert_eq!(s.state, State::Suspended);
    assert_eq!(s.ports, [8080, 22]);
    assert!(s.forwards.is_empty(), "{s:?}");
    let back: SessionInfo = c
        .call("POST", &format!("/v1/sessions/{id}/resume"), None)
        .unwrap();
    assert_eq!(back.state, State::Running);
    assert_eq!(
        back.forwards, forwards,
        "the same forwards after the restart"
    );
    let body = http_get(web);
    assert!(body.contains(WEB_MARKER), "{body}");
    assert!(d.events("session.forward_moved").is_empty());

    // Another restart, and someone takes the web port meanwhile: the
    // resume gets a new one, reported, which reaches the guest.
    let d = restart(t, &pki, d);
    let squatter = TcpListener::bind(web).unwrap();
    let c = d.client(&pki.device_id());
    let back: SessionInfo = c
        .call("POST", &format!("/v1/sessions/{id}/resume"), None)
        .unwrap();
    assert_eq!(back.state, State::Running);
    assert_eq!(back.forwards.len(), 2, "{back:?}");
    assert_eq!(back.forwards[0].guest, 8080);
    let moved = back.forwards[0].host;
    assert_ne!(moved, web, "{back:?}");
    assert_eq!(back.forwards[1], forwards[1], "the free one stays");
    let m = d.events("session.forward_moved");
    assert_eq!(m.len(), 1, "{m:?}");
    assert_eq!(m[0]["guest"], 8080);
    assert_eq!(m[0]["was"], web.to_string());
    assert_eq!(m[0]["now"], moved.to_string());
    let body = http_get(moved);
    assert!(body.contains(WEB_MARKER), "{body}");
    drop(squatter);
    c.delete(&id, false).unwrap();
    assert!(d.session_dirs().is_empty());

    // The lines for people name each forwarded address.
    let o = offload(&d, false);
    let out = String::from_utf8_lossy(&o.stdout);
    let line = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("guest port 8080: "))
        .unwrap_or_else(|| panic!("{out}"));
    let addr: SocketAddr = line.parse().unwrap();
    let body = http_get(addr);
    assert!(body.contains(WEB_MARKER), "{body}");
    let id = out
        .lines()
        .find_map(|l| l.strip_prefix("session "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("{out}"));
    d.client(&pki.device_id()).delete(id, false).unwrap();
    assert!(d.session_dirs().is_empty());
}
