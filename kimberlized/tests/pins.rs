//! Certificates pinned by fingerprint instead of (or beside) a CA, both
//! ways: the daemon serves a pinned device whoever issued its certificate
//! and refuses every other one at the handshake; a device that pins its
//! cloudlet refuses any other, even one with a valid certificate from the
//! operator's CA, before it sends anything.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kimberlized::client::ClientError;
use kimberlized::tls;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, KeyPair};

/// A self-signed certificate (no CA): `dir/NAME.pem`, `dir/NAME.key`.
fn self_signed(dir: &Path, name: &str, names: &[&str], client: bool) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let mut p =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.extended_key_usages = vec![if client {
        ExtendedKeyUsagePurpose::ClientAuth
    } else {
        ExtendedKeyUsagePurpose::ServerAuth
    }];
    let cert = p.self_signed(&key).unwrap();
    let (c, k) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// The SHA-256 fingerprint of the certificate in `pem`, with colons, as
/// openssl prints it (the parser takes both spellings).
fn pin_of(pem: &Path) -> String {
    let hex = tls::fingerprint(&tls::load_certs(pem).unwrap()[0]);
    hex.as_bytes()
        .chunks(2)
        .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
        .collect::<Vec<_>>()
        .join(":")
}

fn id(cert: &(PathBuf, PathBuf), ca: Option<&Path>, pins: &[&str]) -> tls::Identity {
    tls::Identity {
        cert: cert.0.clone(),
        key: cert.1.clone(),
        ca: ca.map(Path::to_path_buf),
        pins: pins.iter().map(|p| tls::parse_pin(p).unwrap()).collect(),
    }
}

/// `kimberlized` holding `base` with the server certificate `server` and
/// the trust arguments `trust`, its state in `dir/state`.
fn daemon(dir: &Path, base: &Path, server: &(PathBuf, PathBuf), trust: &[&str]) -> Daemon {
    std::fs::create_dir_all(dir).unwrap();
    let mut cmd = Command::new(bin("kimberlized"));
    cmd.args(["--listen", "127.0.0.1:0", "--no-mdns", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--base")
        .arg(base)
        .arg("--cert")
        .arg(&server.0)
        .arg("--key")
        .arg(&server.1)
        .args(trust);
    Daemon::spawn(&mut cmd, dir)
}

/// `id` asks `d` for its info: refused at the handshake, and logged so.
fn refused(d: &Daemon, what: &str, id: &tls::Identity) {
    let before = d.events("tls.refused").len();
    match d.client(id).info() {
        Err(ClientError::Handshake(..)) | Err(ClientError::Io(..)) | Err(ClientError::Http(..)) => {
        }
        other => panic!("{what} was served: {other:?}"),
    }
    let t = std::time::Instant::now();
    while d.events("tls.refused").len() == before {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{what}: no tls.refused: {}",
            d.proc.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn the_daemon_serves_pinned_devices_and_refuses_others() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let base = t.join("base");
    tools::make_base(&base, "32M", "4M");
    let pki = Pki::new(t);
    let pinned = self_signed(t, "pinned-device", &["device"], true);
    let stranger = self_signed(t, "stranger", &["device"], true);
    let pin = pin_of(&pinned.0);

    // Pins only: the pinned device is served; a self-signed stranger and a
    // device of the operator's CA (not trusted by this daemon) are not.
    let d = daemon(&t.join("1"), &base, &pki.server, &["--client-pin", &pin]);
    assert_eq!(
        d.client(&id(&pinned, Some(pki.ca.pem.as_path()), &[]))
            .info()
            .unwrap()
            .api,
        1
    );
    refused(
        &d,
        "a stranger",
        &id(&stranger, Some(pki.ca.pem.as_path()), &[]),
    );
    refused(&d, "a CA device", &pki.device_id());
    assert_eq!(d.events("request").len(), 1, "{}", d.proc.stderr());
    assert_eq!(d.events("tls.refused").len(), 2, "{}", d.proc.stderr());

    // A CA and a pin (in the other spelling): either suffices; the
    // stranger is still refused.
    let plain = pin.replace(':', "").to_lowercase();
    let trust = [
        "--client-ca",
        pki.ca.pem.to_str().unwrap(),
        "--client-pin",
        &plain,
    ];
    let d3 = daemon(&t.join("3"), &base, &pki.server, &trust);
    assert_eq!(
        d3.client(&id(&pinned, Some(pki.ca.pem.as_path()), &[]))
            .info()
            .unwrap()
            .api,
        1
    );
    assert_eq!(d3.client(&pki.device_id()).info().unwrap().api, 1);
    refused(
        &d3,
        "a stranger",
        &id(&stranger, Some(pki.ca.pem.as_path()), &[]),
    );
}

#[test]
fn the_daemon_needs_a_ca_or_a_pin() {
    let out = Command::new(bin("kimberlized"))
        .args([
            "--no-mdns",
            "--base",
            "/nonexistent",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--client-ca"), "{err}");
    let out = Command::new(bin("kimberlized"))
        .args([
            "--no-mdns",
            "--base",
            "/nonexistent",
            "--cert",
            "c.pem",
            "--key",
            "k.pem",
        ])
        .args(["--client-pin", "00:11"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("SHA-256 fingerprint"), "{err}");
}

#[test]
fn a_device_that_pins_its_cloudlet_refuses_any_other() {
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    let base = t.join("base");
    tools::make_base(&base, "32M", "4M");
    let pki = Pki::new(t);
    let ca = pki.ca.pem.to_str().unwrap();
    let d = daemon(&t.join("1"), &base, &pki.server, &["--client-ca", ca]);
    // Another cloudlet of the same operator: its certificate chains to
    // the CA and names 127.0.0.1, but it is not the one pinned.
    let other = pki.ca.issue(t, "other-cloudlet", &["127.0.0.1"], false);
    let d2 = daemon(&t.join("2"), &base, &other, &["--client-ca", ca]);
    let pin = pin_of(&pki.server.0);
    let pinned = id(&pki.device, None, &[&pin]);

    assert_eq!(d.client(&pinned).info().unwrap().api, 1);
    match d2.client(&pinned).info() {
        Err(ClientError::Handshake(_, e)) => assert!(e.contains("certificate"), "{e}"),
        other => panic!("a device pinning another cloudlet was served: {other:?}"),
    }
    assert!(d2.events("request").is_empty(), "{}", d2.proc.stderr());
    // The pin is the identity: the name dialled is not checked.
    let c = kimberlized::client::Client::new(
        tls::client_config(&pinned).unwrap(),
        vec![d.addr],
        tls::server_name("elsewhere.test").unwrap(),
    );
    assert_eq!(c.info().unwrap().api, 1);
    // With the CA as well, either suffices: the other cloudlet is trusted.
    assert_eq!(
        d2.client(&id(&pki.device, Some(pki.ca.pem.as_path()), &[&pin]))
            .info()
            .unwrap()
            .api,
        1
    );
    // A self-signed cloudlet, pinned.
    let own = self_signed(t, "own-cloudlet", &["127.0.0.1"], false);
    let d3 = daemon(&t.join("3"), &base, &own, &["--client-ca", ca]);
    let own_pin = pin_of(&own.0);
    assert_eq!(
        d3.client(&id(&pki.device, None, &[&own_pin]))
            .info()
            .unwrap()
            .api,
        1
    );
    match d3.client(&pki.device_id()).info() {
        Err(ClientError::Handshake(_, e)) => assert!(e.contains("certificate"), "{e}"),
        other => panic!("an unpinned self-signed cloudlet was accepted: {other:?}"),
    }
}

#[test]
fn offload_with_a_pin_runs_there_and_refuses_elsewhere() {
    if !kvm() {
        return;
    }
    let _g = serial();
    let t = tempfile::tempdir().unwrap();
    let t = t.path();
    app(t);
    let pki = Pki::new(t);
    let ca = pki.ca.pem.to_str().unwrap();
    let d = daemon(
        &t.join("1"),
        &t.join("base"),
        &pki.server,
        &["--client-ca", ca],
    );
    let other = pki.ca.issue(t, "other-cloudlet", &["127.0.0.1"], false);
    let d2 = daemon(&t.join("2"), &t.join("base"), &other, &["--client-ca", ca]);
    let pin = pin_of(&pki.server.0);
    let offload = |addr: std::net::SocketAddr| {
        Command::new(bin("kimberlize"))
            .arg("offload")
            .arg(t.join("app.ovl"))
            .arg("-k")
            .arg(t.join("key"))
            .arg("--cloudlet")
            .arg(addr.to_string())
            .arg("--cert")
            .arg(&pki.device.0)
            .arg("--key")
            .arg(&pki.device.1)
            .args(["--pin", &pin, "--json", "-q"])
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let o = offload(d2.addr);
    assert!(!o.status.success(), "offloaded to an unpinned cloudlet");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("certificate"), "{err}");
    assert!(d2.events("request").is_empty(), "{}", d2.proc.stderr());
    let o = offload(d.addr);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let session = v["session"].as_str().unwrap();
    let c = d.client(&id(&pki.device, None, &[&pin]));
    assert_eq!(c.control(session, "status", None).unwrap()["ok"], true);
    c.delete(session, false).unwrap();
}
