//! The daemon and the client as processes, over real mutual TLS with
//! certificates made here: synthesis sessions of the microVM test guest,
//! refusals (certificates, limits, plain HTTP), a cut upload, two sessions,
//! suspension across a restart.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use kimberlized::api::{Reason, State};
use kimberlized::client::ClientError;
use serde_json::{json, Value};

/// `kimberlize offload OVERLAY -k KEY --cloudlet ADDR --json` with the
/// device identity `id`.
fn offload(t: &Path, addr: std::net::SocketAddr, cert: &Path, key: &Path, ca: &Path) -> Output {
    Command::new(bin("kimberlize"))
        .arg("offload")
        .arg(t.join("app.ovl"))
        .arg("-k")
        .arg(t.join("key"))
        .arg("--cloudlet")
        .arg(addr.to_string())
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key)
        .arg("--ca")
        .arg(ca)
        .arg("--json")
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn ok_json(o: &Output) -> Value {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

/// The guest runs the app the overlay carries: its region and a counter
/// that moved on.
fn check_guest(c: &kimberlized::client::Client, id: &str) {
    let v = c
        .control(
            id,
            "exec",
            Some(&json!({"script": "checksum app\ncounter\n", "timeout_ms": 30000})),
        )
        .unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["status"], 0, "{v}");
    let out = v["output"].as_str().unwrap();
    assert!(out.contains("checksum app "), "{out}");
    let counter: u64 = out
        .lines()
        .find_map(|l| l.strip_prefix("counter "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(counter > 0, "{out}");
}

#[test]
fn offload_runs_the_overlay_and_ends_leaving_nothing() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &[]);
    let o = offload(t, d.addr, &pki.device.0, &pki.device.1, &pki.ca.pem);
    let v = ok_json(&o);
    let id = v["session"].as_str().unwrap().to_string();
    assert_eq!(v["schema"], 1);
    let times = &v["times"];
    for k in ["bind_ms", "transfer_ms", "synthesis_ms", "first_answer_ms"] {
        assert!(times[k].as_u64().is_some(), "{k}: {v}");
    }
    assert!(
        times["first_answer_ms"].as_u64() >= times["transfer_ms"].as_u64(),
        "{v}"
    );
    let c = d.client(&pki.device_id());
    assert_eq!(c.session(&id).unwrap().state, State::Running);
    let info = c.info().unwrap();
    assert_eq!(info.active_sessions, 1);
    check_guest(&c, &id);
    let s = c.control(&id, "status", None).unwrap();
    assert_eq!(s["status"], "running", "{s}");
    let p = c.control(&id, "pause", None).unwrap();
    assert_eq!(p["status"], "paused", "{p}");
    let r = c.control(&id, "resume", None).unwrap();
    assert_eq!(r["status"], "running", "{r}");
    c.delete(&id, false).unwrap();
    assert!(d.session_dirs().is_empty(), "{:?}", d.session_dirs());
    match c.session(&id) {
        Err(ClientError::Refused { body, .. }) => assert_eq!(body.reason, Reason::NotFound),
        other => panic!("{other:?}"),
    }
    // Structured log lines for each step.
    for e in [
        "request",
        "session.accepted",
        "session.synthesised",
        "session.ready",
        "session.discarded",
    ] {
        assert!(!d.events(e).is_empty(), "no {e} in {}", d.proc.stderr());
    }
}

#[test]
fn certificates_from_another_ca_are_refused_both_ways() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    // No VM runs here: a base is enough (any VM directory).
    let base = t.join("base");
    tools::make_base(&base, "32M", "4M");
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &base, &[]);

    // A device whose certificate another CA issued: the handshake fails,
    // no request is served.
    let rogue = Ca::new(t, "rogue");
    let (rc, rk) = rogue.issue(t, "rogue-device", &["device"], true);
    let c = d.client(&kimberlized::tls::Identity {
        cert: rc,
        key: rk,
        ca: Some(pki.ca.pem.clone()),
        pins: vec![],
    });
    match c.info() {
        Err(ClientError::Handshake(..)) | Err(ClientError::Io(..)) | Err(ClientError::Http(..)) => {
        }
        other => panic!("a device from another CA was served: {other:?}"),
    }
    event(&d.proc, "tls.refused", Duration::from_secs(10));
    assert!(d.events("request").is_empty(), "{}", d.proc.stderr());

    // A daemon whose certificate another CA issued: the device refuses it
    // before sending anything.
    let (sc, sk) = rogue.issue(t, "rogue-cloudlet", &["127.0.0.1"], false);
    let t2 = t.join("2");
    std::fs::create_dir(&t2).unwrap();
    let mut cmd = Command::new(bin("kimberlized"));
    cmd.args(["--listen", "127.0.0.1:0", "--no-mdns", "--state-dir"])
        .arg(t2.join("state"))
        .arg("--base")
        .arg(&base)
        .arg("--cert")
        .arg(&sc)
        .arg("--key")
        .arg(&sk)
        .arg("--client-ca")
        .arg(&pki.ca.pem);
    let d2 = Daemon::spawn(&mut cmd, &t2);
    match d2.client(&pki.device_id()).info() {
        Err(ClientError::Handshake(_, e)) => assert!(e.contains("certificate"), "{e}"),
        other => panic!("the device accepted a cloudlet from another CA: {other:?}"),
    }
    assert!(d2.events("request").is_empty(), "{}", d2.proc.stderr());

    // The right CA, but a name the certificate does not carry.
    let c = kimberlized::client::Client::new(
        kimberlized::tls::client_config(&pki.device_id()).unwrap(),
        vec![d.addr],
        kimberlized::tls::server_name("elsewhere.test").unwrap(),
    );
    match c.info() {
        Err(ClientError::Handshake(_, e)) => assert!(e.contains("certificate"), "{e}"),
        other => panic!("a certificate for another name was accepted: {other:?}"),
    }
    // And the right one is served.
    assert_eq!(d.client(&pki.device_id()).info().unwrap().api, 1);
}

#[test]
fn plain_http_is_refused_and_the_key_never_answered() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let base = t.join("base");
    tools::make_base(&base, "32M", "4M");
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &base, &[]);
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!(
            "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nKimberley-Key: {}\r\nContent-Length: 4\r\n\r\nabcd",
            "11".repeat(32)
        )
        .as_bytes(),
    )
    .unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP/"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    event(&d.proc, "tls.refused", Duration::from_secs(10));
    assert!(d.events("request").is_empty(), "{}", d.proc.stderr());
    assert!(d.session_dirs().is_empty());
}

#[test]
fn a_session_belongs_to_the_device_that_made_it() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &[]);
    let v = ok_json(&offload(
        t,
        d.addr,
        &pki.device.0,
        &pki.device.1,
        &pki.ca.pem,
    ));
    let id = v["session"].as_str().unwrap();
    // Another device of the same operator: trusted, but not the owner.
    let (oc, ok) = pki.ca.issue(t, "other-device", &["other"], true);
    let other = d.client(&kimberlized::tls::Identity {
        cert: oc,
        key: ok,
        ca: Some(pki.ca.pem.clone()),
        pins: vec![],
    });
    for r in [
        other.session(id).map(|_| Value::Null),
        other.control(id, "exec", Some(&json!({"script": "counter\n"}))),
        other.delete(id, false),
    ] {
        match r {
            Err(ClientError::Refused { body, status }) => {
                assert_eq!((status, body.reason), (403, Reason::Forbidden))
            }
            other => panic!("another device reached the session: {other:?}"),
        }
    }
    assert!(other
        .call::<Vec<Value>>("GET", "/v1/sessions", None)
        .unwrap()
        .is_empty());
    let c = d.client(&pki.device_id());
    assert_eq!(
        c.call::<Vec<Value>>("GET", "/v1/sessions", None)
            .unwrap()
            .len(),
        1
    );
    c.delete(id, false).unwrap();
    assert!(d.session_dirs().is_empty());
}

#[test]
fn a_cut_upload_leaves_nothing() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &[]);
    let overlay = std::fs::read(t.join("app.ovl")).unwrap();
    let key = kimberley_formats::digest::hex(&key_of(t));
    {
        let mut tls = d.client(&pki.device_id()).connect().unwrap();
        let head = kimberlized::http::request_head(
            "POST",
            "/v1/sessions",
            "x",
            &[("Kimberley-Key", &key)],
            Some(overlay.len() as u64),
        );
        tls.write_all(&head).unwrap();
        // Past the header (the session exists), short of the end.
        tls.write_all(&overlay[..overlay.len() * 2 / 3]).unwrap();
        tls.flush().unwrap();
        event(&d.proc, "session.accepted", Duration::from_secs(30));
        // The device goes away: the connection closes without close_notify.
    }
    let cut = event(&d.proc, "upload.cut", Duration::from_secs(90));
    assert!(
        cut["received"].as_u64().unwrap() < overlay.len() as u64,
        "{cut}"
    );
    let refused = event(&d.proc, "session.refused", Duration::from_secs(60));
    assert_eq!(refused["reason"], "upload_cut", "{refused}");
    assert!(d.session_dirs().is_empty(), "{:?}", d.session_dirs());
    let c = d.client(&pki.device_id());
    assert_eq!(c.info().unwrap().active_sessions, 0);
    // Still serving: the same overlay in full runs.
    let v = ok_json(&offload(
        t,
        d.addr,
        &pki.device.0,
        &pki.device.1,
        &pki.ca.pem,
    ));
    c.delete(v["session"].as_str().unwrap(), false).unwrap();
}

#[test]
fn limits_refuse_before_anything_starts() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    // The VM has 32 MiB of memory.
    let d = Daemon::start(t, &pki, &t.join("base"), &["--max-memory", "16M"]);
    let o = offload(t, d.addr, &pki.device.0, &pki.device.1, &pki.ca.pem);
    assert_eq!(
        o.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("--max-memory") && err.contains("limit_memory"),
        "{err}"
    );
    assert!(d.session_dirs().is_empty());
    assert!(d.events("session.accepted").is_empty());
    drop(d);

    let t2 = t.join("disk");
    std::fs::create_dir(&t2).unwrap();
    let d = Daemon::start(&t2, &pki, &t.join("base"), &["--max-disk", "20M"]);
    let o = offload(t, d.addr, &pki.device.0, &pki.device.1, &pki.ca.pem);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("--max-disk"), "{err}");
    assert!(d.session_dirs().is_empty());
    drop(d);

    // One session at most: the second is refused, the first runs on.
    let t3 = t.join("one");
    std::fs::create_dir(&t3).unwrap();
    let d = Daemon::start(&t3, &pki, &t.join("base"), &["--max-sessions", "1"]);
    let v = ok_json(&offload(
        t,
        d.addr,
        &pki.device.0,
        &pki.device.1,
        &pki.ca.pem,
    ));
    let o = offload(t, d.addr, &pki.device.0, &pki.device.1, &pki.ca.pem);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("limit_sessions"),
        "{err}"
    );
    assert_eq!(d.session_dirs().len(), 1);
    let c = d.client(&pki.device_id());
    check_guest(&c, v["session"].as_str().unwrap());
    c.delete(v["session"].as_str().unwrap(), false).unwrap();
}

#[test]
fn ports_are_refused_for_a_microvm_and_checked_before_anything_starts() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &[]);
    // The client checks its own --port list.
    for bad in [&["--port", "0"][..], &["--port", "22", "--port", "22"]] {
        let o = Command::new(bin("kimberlize"))
            .arg("offload")
            .arg(t.join("app.ovl"))
            .args(["-k"])
            .arg(t.join("key"))
            .args(["--cloudlet", &d.addr.to_string(), "--cert"])
            .arg(&pki.device.0)
            .arg("--key")
            .arg(&pki.device.1)
            .arg("--ca")
            .arg(&pki.ca.pem)
            .args(bad)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(
            o.status.code(),
            Some(2),
            "{bad:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    }
    assert!(d.events("request").is_empty());
    // A microVM has no ports to forward: refused once the header names
    // its base, before a session exists.
    let o = Command::new(bin("kimberlize"))
        .arg("offload")
        .arg(t.join("app.ovl"))
        .args(["-k"])
        .arg(t.join("key"))
        .args(["--cloudlet", &d.addr.to_string(), "--cert"])
        .arg(&pki.device.0)
        .arg("--key")
        .arg(&pki.device.1)
        .arg("--ca")
        .arg(&pki.ca.pem)
        .args(["--port", "8080"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("\"ports\"") && err.contains("microVM"),
        "{err}"
    );
    assert!(d.session_dirs().is_empty());
    assert!(d.events("session.accepted").is_empty());
    let refused = d.events("session.refused");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["reason"], "ports");
    // The daemon checks the header itself: values a client should not
    // send are refused with 400 before the body is looked at.
    let c = d.client(&pki.device_id());
    let key = kimberley_formats::digest::hex(&key_of(t));
    for bad in [
        "0",
        "22,22",
        "65536",
        "80;22",
        "",
        "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17",
    ] {
        let mut tls = c.connect().unwrap();
        let head = kimberlized::http::request_head(
            "POST",
            "/v1/sessions",
            "127.0.0.1",
            &[
                (kimberlized::api::KEY_HEADER, key.as_str()),
                (kimberlized::api::PORTS_HEADER, bad),
            ],
            Some(4),
        );
        tls.write_all(&head).unwrap();
        tls.write_all(b"KIMB").unwrap();
        tls.flush().unwrap();
        let mut r = std::io::BufReader::new(tls);
        let h = kimberlized::http::read_head(&mut r).unwrap().unwrap();
        let resp = kimberlized::http::parse_response(&h).unwrap();
        assert_eq!(resp.status, 400, "{bad:?}");
        let mut body = Vec::new();
        let _ = r.read_to_end(&mut body);
        let e: kimberlized::api::ErrorBody = serde_json::from_slice(&body).unwrap();
        assert_eq!(e.reason, Reason::BadRequest, "{bad:?}");
        assert!(e.error.contains("Kimberley-Ports"), "{bad:?}: {}", e.error);
    }
    assert!(d.session_dirs().is_empty());
    assert!(d.events("session.accepted").is_empty());
}

#[test]
fn two_sessions_at_once() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &["--max-sessions", "2"]);
    let addr = d.addr;
    let pki = &pki;
    let (a, b) = std::thread::scope(|s| {
        let a = s.spawn(move || offload(t, addr, &pki.device.0, &pki.device.1, &pki.ca.pem));
        let b = s.spawn(move || offload(t, addr, &pki.device.0, &pki.device.1, &pki.ca.pem));
        (a.join().unwrap(), b.join().unwrap())
    });
    let (a, b) = (ok_json(&a), ok_json(&b));
    let (ia, ib) = (
        a["session"].as_str().unwrap(),
        b["session"].as_str().unwrap(),
    );
    assert_ne!(ia, ib);
    let c = d.client(&pki.device_id());
    assert_eq!(c.info().unwrap().active_sessions, 2);
    check_guest(&c, ia);
    check_guest(&c, ib);
    c.delete(ia, false).unwrap();
    check_guest(&c, ib);
    c.delete(ib, false).unwrap();
    assert!(d.session_dirs().is_empty());
}

#[test]
fn sigterm_suspends_sessions_and_they_come_back_after_a_restart() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    let mut d = Daemon::start(t, &pki, &t.join("base"), &[]);
    let v = ok_json(&offload(
        t,
        d.addr,
        &pki.device.0,
        &pki.device.1,
        &pki.ca.pem,
    ));
    let id = v["session"].as_str().unwrap();
    d.proc.signal(libc::SIGTERM);
    let st = d.proc.wait_exit(Duration::from_secs(120));
    assert!(st.success(), "{st}: {}", d.proc.stderr());
    event(&d.proc, "session.suspended", Duration::from_secs(1));
    let d = Daemon::start(t, &pki, &t.join("base"), &[]);
    let c = d.client(&pki.device_id());
    let s = c.session(id).unwrap();
    assert_eq!(s.state, State::Suspended);
    // Suspended: it takes no place among the running sessions.
    assert_eq!(c.info().unwrap().active_sessions, 0);
    match c.control(id, "status", None) {
        Err(ClientError::Refused { body, .. }) => assert_eq!(body.reason, Reason::State),
        other => panic!("{other:?}"),
    }
    // It comes back where it was: the app's region, the counter running.
    let back: kimberlized::api::SessionInfo = c
        .call("POST", &format!("/v1/sessions/{id}/resume"), None)
        .unwrap();
    assert_eq!(back.state, State::Running);
    check_guest(&c, id);
    // Stopped again (kept), then removed.
    let kept: kimberlized::api::SessionInfo = c
        .call("POST", &format!("/v1/sessions/{id}/stop"), None)
        .unwrap();
    assert_eq!(kept.state, State::Suspended);
    assert_eq!(d.session_dirs().len(), 1);
    c.delete(id, false).unwrap();
    assert!(d.session_dirs().is_empty());
}

#[test]
fn the_key_never_crosses_the_wire_in_clear() {
    if !kvm() {
        return;
    }
    if kimberley_formats::sys::cred::euid() != 0 {
        assert!(
            std::env::var("KIMBERLEY_REQUIRE_KVM").as_deref() != Ok("1"),
            "the capture needs root"
        );
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &[]);
    let key = key_of(t);
    let hex = kimberley_formats::digest::hex(&key);
    let text = std::fs::read_to_string(t.join("key")).unwrap();
    let secrets: Vec<Vec<u8>> = vec![
        key.to_vec(),
        hex.clone().into_bytes(),
        hex.to_uppercase().into_bytes(),
        text.trim().as_bytes().to_vec(),
        b"Kimberley-Key".to_vec(),
    ];

    // The capture sees what plain HTTP would have carried (the daemon
    // refuses it, but the bytes went out).
    let cap = capture::Capture::start("lo");
    let mut s = TcpStream::connect(d.addr).unwrap();
    s.write_all(format!("POST /v1/sessions HTTP/1.1\r\nKimberley-Key: {hex}\r\n\r\n").as_bytes())
        .unwrap();
    let _ = s.read_to_end(&mut Vec::new());
    let plain = cap.finish();
    assert!(
        capture::contains(&plain, hex.as_bytes()),
        "the capture saw nothing"
    );

    // Through TLS: the whole upload is seen, the key in no form.
    let cap = capture::Capture::start("lo");
    let v = ok_json(&offload(
        t,
        d.addr,
        &pki.device.0,
        &pki.device.1,
        &pki.ca.pem,
    ));
    let wire = cap.finish();
    let overlay = std::fs::metadata(t.join("app.ovl")).unwrap().len() as usize;
    assert!(
        wire.len() > overlay,
        "captured {} bytes of a {overlay}-byte upload",
        wire.len()
    );
    for s in &secrets {
        assert!(
            !capture::contains(&wire, s),
            "{:?} crossed the wire",
            String::from_utf8_lossy(s)
        );
    }
    d.client(&pki.device_id())
        .delete(v["session"].as_str().unwrap(), false)
        .unwrap();
}

/// Waits (60 s at most) until the daemon holds no session directory.
fn until_no_sessions(d: &Daemon) {
    let t = std::time::Instant::now();
    while !d.session_dirs().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "left: {:?}",
            d.session_dirs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Issues 14 and 11: an overlay built with `--early-start` (a coverage map,
/// the resumed VM's working set first) starts its VM before the apply has
/// ended (the daemon's log says so), runs the app, and ends leaving
/// nothing. Cut past its working set, the VM that may have started is
/// discarded with its session, and the reason is the cut.
#[test]
fn an_early_start_overlay_runs_and_a_cut_one_leaves_nothing() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    build_app(t, "32M", "4M", INSTALL, &["--early-start".as_ref()]);
    let pki = Pki::new(t);
    let d = Daemon::start(t, &pki, &t.join("base"), &[]);
    let v = ok_json(&offload(
        t,
        d.addr,
        &pki.device.0,
        &pki.device.1,
        &pki.ca.pem,
    ));
    let id = v["session"].as_str().unwrap().to_string();
    let syn = event(&d.proc, "session.synthesised", Duration::from_secs(60));
    assert_eq!(syn["early_start"], true, "{syn}");
    let c = d.client(&pki.device_id());
    check_guest(&c, &id);
    c.delete(&id, false).unwrap();
    until_no_sessions(&d);

    let overlay = std::fs::read(t.join("app.ovl")).unwrap();
    let key = kimberley_formats::digest::hex(&key_of(t));
    {
        let mut tls = c.connect().unwrap();
        let head = kimberlized::http::request_head(
            "POST",
            "/v1/sessions",
            "x",
            &[("Kimberley-Key", &key)],
            Some(overlay.len() as u64),
        );
        tls.write_all(&head).unwrap();
        tls.write_all(&overlay[..overlay.len() * 9 / 10]).unwrap();
        tls.flush().unwrap();
        event(&d.proc, "session.accepted", Duration::from_secs(30));
    }
    event(&d.proc, "upload.cut", Duration::from_secs(90));
    until_no_sessions(&d);
    let failed = d
        .events("session.refused")
        .into_iter()
        .chain(d.events("session.synthesis_failed"))
        .next()
        .unwrap_or_else(|| panic!("no failure logged: {}", d.proc.stderr()));
    assert_eq!(failed["reason"], "upload_cut", "{failed}");
    assert_eq!(c.info().unwrap().active_sessions, 0);
}
