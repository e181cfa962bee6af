//! DNS-SD between two network namespaces joined by a veth pair (needs
//! root and `ip`): the device finds the cloudlet holding its overlay's
//! base within 2 s and runs it there; an advertisement never makes a
//! cloudlet trusted; a Linux guest's forwarded port is reached from the
//! device's namespace.

mod common;

#[path = "../../qemu/tests/common/guest.rs"]
mod linux_guest;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

/// Two namespaces `kzd-PID` (the cloudlet, 10.77.0.1) and `kzc-PID` (the
/// device, 10.77.0.2) joined by a veth pair; removed on drop.
struct Net {
    cloudlet: String,
    device: String,
}

fn ip(args: &[&str]) {
    let o = Command::new("ip").args(args).output().unwrap();
    assert!(
        o.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
}

impl Net {
    fn new() -> Net {
        let pid = std::process::id();
        let (c, d) = (format!("kzd-{pid}"), format!("kzc-{pid}"));
        let (vc, vd) = (format!("kzd{pid}"), format!("kzc{pid}"));
        let net = Net {
            cloudlet: c.clone(),
            device: d.clone(),
        };
        ip(&["netns", "add", &c]);
        ip(&["netns", "add", &d]);
        ip(&[
            "link", "add", &vc, "netns", &c, "type", "veth", "peer", "name", &vd, "netns", &d,
        ]);
        for (ns, dev, addr) in [(&c, &vc, "10.77.0.1/24"), (&d, &vd, "10.77.0.2/24")] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "multicast", "on", "up"]);
        }
        // A link just made up drops the first multicast packets: wait
        // until both ends are settled (their IPv6 link-local addresses
        // passed duplicate address detection), as a device's Wi-Fi link is.
        let t = std::time::Instant::now();
        for (ns, dev) in [(&c, &vc), (&d, &vd)] {
            loop {
                let o = Command::new("ip")
                    .args(["-n", ns, "addr", "show", "dev", dev])
                    .output()
                    .unwrap();
                let s = String::from_utf8_lossy(&o.stdout);
                if s.contains("inet6 fe80") && !s.contains("tentative") {
                    break;
                }
                assert!(
                    t.elapsed() < Duration::from_secs(30),
                    "{dev} never settled: {s}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        net
    }

    /// `cmd` run inside namespace `ns`.
    fn exec(ns: &str, prog: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(prog);
        c
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in [&self.cloudlet, &self.device] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A daemon in the cloudlet namespace advertising `name` on host
/// `cloudlet.local`, with the server certificate `cert`.
fn daemon(
    net: &Net,
    dir: &Path,
    base: &Path,
    name: &str,
    cert: &(std::path::PathBuf, std::path::PathBuf),
    ca: &Path,
) -> Daemon {
    let mut c = Net::exec(&net.cloudlet, &bin("kimberlized"));
    c.args([
        "--listen",
        "10.77.0.1:0",
        "--name",
        name,
        "--mdns-host",
        "cloudlet.local",
        "--state-dir",
    ])
    .arg(dir.join("state"))
    .arg("--base")
    .arg(base)
    .arg("--cert")
    .arg(&cert.0)
    .arg("--key")
    .arg(&cert.1)
    .arg("--client-ca")
    .arg(ca);
    let d = Daemon::spawn(&mut c, dir);
    event(&d.proc, "advertised", Duration::from_secs(10));
    d
}

/// `kimberlize offload` in the device namespace, discovering.
fn offload(net: &Net, t: &Path, pki: &Pki) -> Output {
    Net::exec(&net.device, &bin("kimberlize"))
        .arg("offload")
        .arg(t.join("app.ovl"))
        .arg("-k")
        .arg(t.join("key"))
        .arg("--cert")
        .arg(&pki.device.0)
        .arg("--key")
        .arg(&pki.device.1)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(["--discover-timeout", "5", "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn root() -> bool {
    let root = kimberley_formats::sys::cred::euid() == 0;
    if !root {
        assert!(
            std::env::var("KIMBERLEY_REQUIRE_KVM").as_deref() != Ok("1"),
            "the network-namespace tests need root"
        );
        eprintln!("skipping: not root");
    }
    root
}

#[test]
fn the_device_discovers_the_cloudlet_holding_its_base_and_runs_there() {
    if !kvm() || !root() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    // A cloudlet with another base only: seen, never picked.
    let other = t.join("other-base");
    tools::make_base(&other, "16M", "4M");
    let net = Net::new();
    let (d1, d2) = (t.join("d1"), t.join("d2"));
    std::fs::create_dir(&d1).unwrap();
    std::fs::create_dir(&d2).unwrap();
    let _wrong = daemon(&net, &d1, &other, "wrong-base", &pki.server, &pki.ca.pem);
    let mut right = daemon(
        &net,
        &d2,
        &t.join("base"),
        "right-base",
        &pki.server,
        &pki.ca.pem,
    );
    let o = offload(&net, t, &pki);
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        v["cloudlet"].as_str().unwrap().starts_with("right-base"),
        "{v}"
    );
    let discovery = v["times"]["discovery_ms"].as_u64().unwrap();
    eprintln!("discovery took {discovery} ms: {v}");
    assert!(discovery <= 2000, "discovery took {discovery} ms");
    event(&right.proc, "session.ready", Duration::from_secs(10));
    // The session's VM suspends with the daemon.
    right.proc.signal(libc::SIGTERM);
    assert!(right.proc.wait_exit(Duration::from_secs(120)).success());
}

#[test]
fn an_advertisement_does_not_make_a_cloudlet_trusted() {
    if !kvm() || !root() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    // It holds the right base and advertises it, but its certificate is
    // from another CA.
    let rogue = Ca::new(t, "rogue");
    let cert = rogue.issue(t, "rogue-cloudlet", &["cloudlet.local", "10.77.0.1"], false);
    let net = Net::new();
    let d = daemon(&net, t, &t.join("base"), "rogue", &cert, &pki.ca.pem);
    let o = offload(&net, t, &pki);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("discovered cloudlet rogue"), "{err}");
    assert!(
        err.contains("TLS handshake") && err.contains("certificate"),
        "{err}"
    );
    assert!(d.events("request").is_empty(), "{}", d.proc.stderr());
}

#[test]
fn a_linux_guests_forwarded_port_is_reached_from_the_device() {
    if !kimberley_qemu::qemu_for_tests() || !root() {
        return;
    }
    let _g = serial();
    let _slot = linux_guest::qemu_slot();
    let a = linux_guest::artifacts();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    linux_web_app(t, &a.kernel, &a.initrd);
    let pki = Pki::new(t);
    let net = Net::new();
    // Listening on every address: forwards too (0.0.0.0), which the
    // client turns into the address it dialled.
    let mut c = Net::exec(&net.cloudlet, &bin("kimberlized"));
    c.args(["--listen", "[::]:0", "--no-mdns", "--max-memory", "1G"])
        .arg("--state-dir")
        .arg(t.join("state"))
        .arg("--base")
        .arg(t.join("base"))
        .arg("--cert")
        .arg(&pki.server.0)
        .arg("--key")
        .arg(&pki.server.1)
        .arg("--client-ca")
        .arg(&pki.ca.pem);
    let d = Daemon::spawn(&mut c, t);
    let cloudlet = format!("10.77.0.1:{}", d.addr.port());
    let o = Net::exec(&net.device, &bin("kimberlize"))
        .arg("offload")
        .arg(t.join("app.ovl"))
        .arg("-k")
        .arg(t.join("key"))
        .args(["--cloudlet", &cloudlet])
        .arg("--cert")
        .arg(&pki.device.0)
        .arg("--key")
        .arg(&pki.device.1)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(["--port", "8080", "--json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let host = v["forwards"][0]["host"].as_str().unwrap().to_string();
    assert_eq!(v["forwards"][0]["guest"], 8080, "{v}");
    assert!(host.starts_with("10.77.0.1:"), "{v}");
    let said = d.events("session.forwards");
    assert!(
        said[0]["forwards"][0]["host"]
            .as_str()
            .unwrap()
            .starts_with("0.0.0.0:"),
        "{said:?}"
    );
    // The guest's web server answers the device, across the veth.
    let t0 = std::time::Instant::now();
    loop {
        let got = Net::exec(&net.device, Path::new("wget"))
            .args(["-q", "-T", "10", "-O", "-", &format!("http://{host}/")])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let body = String::from_utf8_lossy(&got.stdout);
        if body.contains(WEB_MARKER) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no answer from {host}: {body} {}",
            String::from_utf8_lossy(&got.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    // The session's VM suspends with the daemon.
    let mut d = d;
    d.proc.signal(libc::SIGTERM);
    assert!(d.proc.wait_exit(Duration::from_secs(120)).success());
    assert_eq!(d.events("session.suspended").len(), 1);
}
