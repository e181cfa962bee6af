//! What a reader holding a key accepts, end to end (issue 7, findings 1 and
//! 10): no silent downgrade to an unencrypted overlay, and no Argon2id cost
//! beyond the reader's caps, in every command that reads overlays.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

use kimberley_formats::crypto::keys::{Argon2Params, KeyMaterial};
use kimberley_formats::diff::{diff, DiffOptions, Protection};
use kimberley_formats::overlay::header::{Header, HEADER_LEN};
use kimberley_formats::progress::Progress;
use kimberley_formats::testkit::{make_pair, Pair, PairSpec};
use kimberley_formats::vmdir::VmDir;

/// Asserts a refusal with `exit` and a one-line message containing `needle`.
#[track_caller]
fn refused(o: &Output, exit: i32, needle: &str) {
    let e = stderr(o);
    assert_eq!(code(o), exit, "{e}");
    assert!(e.contains(needle), "{e:?} does not mention {needle:?}");
    assert_eq!(e.trim_end().lines().count(), 1, "not one line: {e:?}");
}

struct Setup {
    t: tempfile::TempDir,
    pair: Pair,
    key: PathBuf,
    pass: PathBuf,
    plain: PathBuf,
    sealed: PathBuf,
}

fn setup() -> Setup {
    let t = tempfile::tempdir().unwrap();
    let pair = make_pair(t.path(), &PairSpec::default()).unwrap();
    let key = t.path().join("key");
    keygen(&key);
    let pass = t.path().join("pass");
    // Private, as a passphrase file should be (else a warning line comes first).
    write_private(&pass, "a passphrase\n");
    let plain = t.path().join("plain.ovl");
    let sealed = t.path().join("sealed.ovl");
    for (o, prot) in [(&plain, "--no-encrypt"), (&sealed, "-k")] {
        let mut c = Command::new(bin("kimberlize"));
        c.args(["diff", "-q", "--base"])
            .arg(&pair.base)
            .arg("--launch")
            .arg(&pair.launch)
            .arg(prot);
        if prot == "-k" {
            c.arg(&key);
        }
        ok(c.arg("-o").arg(o).output().unwrap());
    }
    Setup {
        t,
        pair,
        key,
        pass,
        plain,
        sealed,
    }
}

fn apply(s: &Setup, inputs: &[&Path], out: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(bin("dekimberlize"));
    c.arg("--base").arg(&s.pair.base).arg("-o").arg(out);
    for i in inputs {
        c.arg("-i").arg(i);
    }
    c.args(extra).stdin(Stdio::null()).output().unwrap()
}

#[test]
fn an_unencrypted_overlay_is_refused_when_a_key_is_given() {
    let s = setup();
    let k = s.key.to_str().unwrap();
    let p = s.pass.to_str().unwrap();
    // The attack: anyone who knows the base can write this overlay.
    for secret in [["-k", k], ["--passphrase-file", p]] {
        let out = s.t.path().join("out");
        let o = apply(&s, &[&s.plain], &out, &secret);
        refused(&o, 4, "--allow-unencrypted");
        assert!(stderr(&o).contains("not encrypted"), "{}", stderr(&o));
        assert!(!out.exists(), "a refused overlay left an output");
    }
    // Deliberately accepted.
    let out = s.t.path().join("allowed");
    ok(apply(
        &s,
        &[&s.plain],
        &out,
        &["-k", k, "--allow-unencrypted"],
    ));
    VmDir::open(&out).unwrap().verify().unwrap();
    // Without any key: integrity only, as before.
    let out = s.t.path().join("nokey");
    ok(apply(&s, &[&s.plain], &out, &[]));
    // The encrypted overlay still applies with the key.
    ok(apply(
        &s,
        &[&s.sealed],
        &s.t.path().join("sealed"),
        &["-k", k],
    ));
}

/// The encrypted overlay with its protection byte set to 0 (none), the
/// header MAC recomputed as an unencrypted header's plain BLAKE3 or left.
fn downgraded(s: &Setup) -> Vec<(&'static str, PathBuf)> {
    let bytes = std::fs::read(&s.sealed).unwrap();
    let mut flipped = bytes.clone();
    flipped[12] = 0;
    let mut remac = flipped.clone();
    let mut h = Header::decode(&remac[..HEADER_LEN]).unwrap();
    assert_eq!(h.protection, KeyMaterial::None);
    remac[..HEADER_LEN].copy_from_slice(&h.seal(None));
    let mut v = Vec::new();
    for (name, b) in [("flipped", flipped), ("flipped-remac", remac)] {
        let p = s.t.path().join(format!("{name}.ovl"));
        std::fs::write(&p, b).unwrap();
        v.push((name, p));
    }
    v
}

#[test]
fn an_encrypted_overlay_with_its_protection_byte_flipped_is_refused() {
    let s = setup();
    for (name, ovl) in downgraded(&s) {
        let out = s.t.path().join(format!("out-{name}"));
        let o = apply(&s, &[&ovl], &out, &["-k", s.key.to_str().unwrap()]);
        refused(&o, 4, "--allow-unencrypted");
        assert!(!out.exists());
        let o = tool!("dekimberlize", "verify", "-i", &ovl, "-k", &s.key);
        refused(&o, 4, "--allow-unencrypted");
    }
}

#[test]
fn verify_and_inspect_say_what_they_checked() {
    let s = setup();
    let o = tool!("dekimberlize", "verify", "-i", &s.plain, "-k", &s.key);
    refused(&o, 4, "--allow-unencrypted");
    let o = tool!(
        "dekimberlize",
        "verify",
        "-i",
        &s.plain,
        "-k",
        &s.key,
        "--allow-unencrypted"
    );
    let o = ok(o);
    assert!(
        stderr(&o).contains("checksums OK (not authenticated)"),
        "{}",
        stderr(&o)
    );
    assert!(!stderr(&o).contains("every segment authenticated"));
    let o = tool!("dekimberlize", "verify", "-i", &s.plain);
    let o = ok(o);
    assert!(stderr(&o).contains("checksums OK (not authenticated)"));
    let o = tool!("dekimberlize", "verify", "-i", &s.sealed, "-k", &s.key);
    let o = ok(o);
    assert!(stderr(&o).contains("every segment authenticated"));

    // inspect -k reads the overlay too.
    let o = tool!("kimberlize", "inspect", &s.plain, "-k", &s.key);
    refused(&o, 4, "--allow-unencrypted");
    let o = tool!(
        "kimberlize",
        "inspect",
        &s.plain,
        "-k",
        &s.key,
        "--allow-unencrypted"
    );
    let o = ok(o);
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(text.contains("not authenticated"), "{text}");
    let o = tool!("kimberlize", "inspect", &s.plain, "--json");
    let o = ok(o);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["authenticated"], false);
    let o = tool!("kimberlize", "inspect", &s.sealed, "-k", &s.key, "--json");
    let o = ok(o);
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["authenticated"], true);
}

#[test]
fn a_chain_with_one_unencrypted_layer_is_refused_with_a_key() {
    let s = setup();
    let p2 = second_pair(s.t.path());
    let l2 = s.t.path().join("l2.ovl");
    let diff_on_plain = |extra: &[&str]| {
        let mut c = Command::new(bin("kimberlize"));
        c.args(["diff", "-q", "--base"])
            .arg(&s.pair.base)
            .arg("--parent")
            .arg(&s.plain)
            .arg("--launch")
            .arg(&p2.launch)
            .arg("-k")
            .arg(&s.key)
            .arg("-o")
            .arg(&l2)
            .args(extra);
        run(&mut c)
    };
    // kimberlize reads its parent overlays under the same rule.
    refused(&diff_on_plain(&[]), 4, "--allow-unencrypted");
    assert!(!l2.exists());
    ok(diff_on_plain(&["--allow-unencrypted"]));
    let k = s.key.to_str().unwrap();
    let out = s.t.path().join("out");
    let o = apply(&s, &[&s.plain, &l2], &out, &["-k", k]);
    refused(&o, 4, "--allow-unencrypted");
    assert!(!out.exists());
    let o = apply(
        &s,
        &[&s.plain, &l2],
        &out,
        &["-k", k, "--allow-unencrypted"],
    );
    ok(o);
    assert_eq!(
        VmDir::open(&out).unwrap().identity(),
        VmDir::open(&p2.launch).unwrap().identity()
    );
}

/// A passphrase overlay of the pair with these Argon2id parameters.
fn passphrase_overlay(s: &Setup, params: Argon2Params) -> PathBuf {
    let opts = DiffOptions {
        threads: 2,
        ..DiffOptions::new(Protection::Passphrase(b"a passphrase".to_vec(), params))
    };
    let (bytes, _) = diff(
        &VmDir::open(&s.pair.base).unwrap(),
        &VmDir::open(&s.pair.launch).unwrap(),
        &opts,
        Vec::new(),
        &Progress::default(),
    )
    .unwrap();
    let p =
        s.t.path()
            .join(format!("pw-{}-{}.ovl", params.m_cost, params.t_cost));
    std::fs::write(&p, bytes).unwrap();
    p
}

/// Runs a command, killing it if it is still running after `limit`.
fn within(mut c: Command, limit: Duration) -> Output {
    let t0 = Instant::now();
    let mut child = c
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > limit {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("{c:?} still running after {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_header_asking_for_an_expensive_kdf_is_refused_at_once() {
    let s = setup();
    // 192 bytes: a passphrase header asking for 1 GiB and 64 passes.
    let evil = s.t.path().join("evil.ovl");
    std::fs::write(&evil, crafted::expensive_kdf_header()).unwrap();
    let out = s.t.path().join("out");
    let mut c = Command::new(bin("dekimberlize"));
    c.arg("--base")
        .arg(&s.pair.base)
        .arg("-i")
        .arg(&evil)
        .arg("--passphrase-file")
        .arg(&s.pass)
        .arg("-o")
        .arg(&out);
    let o = within(c, Duration::from_secs(1));
    refused(&o, 3, "--max-kdf-memory");
    assert!(stderr(&o).contains("--max-kdf-passes"), "{}", stderr(&o));
    assert!(!out.exists());
    for sub in [
        vec!["verify", "-i"],
        // kimberlize inspect reads the overlay under the same caps.
        vec!["inspect"],
    ] {
        let tool = if sub[0] == "verify" {
            "dekimberlize"
        } else {
            "kimberlize"
        };
        let mut c = Command::new(bin(tool));
        c.args(&sub)
            .arg(&evil)
            .arg("--passphrase-file")
            .arg(&s.pass);
        let o = within(c, Duration::from_secs(1));
        refused(&o, 3, "--max-kdf-memory");
    }
}

#[test]
fn the_kdf_caps_can_be_raised_and_lowered() {
    let s = setup();
    let p = s.pass.to_str().unwrap();
    // 11 passes over 64 KiB: cheap, but over the default cap of 10 passes.
    let ovl = passphrase_overlay(
        &s,
        Argon2Params {
            m_cost: 64,
            t_cost: 11,
            p_cost: 1,
        },
    );
    let out = s.t.path().join("out");
    let o = apply(&s, &[&ovl], &out, &["--passphrase-file", p]);
    refused(&o, 3, "--max-kdf-passes");
    assert!(!stderr(&o).contains("--max-kdf-memory"), "{}", stderr(&o));
    assert!(!out.exists());
    let raised = ["--passphrase-file", p, "--max-kdf-passes", "11"];
    ok(apply(&s, &[&ovl], &out, &raised));
    ok(tool!(
        "dekimberlize",
        "verify",
        "-i",
        &ovl,
        "--passphrase-file",
        p,
        "--max-kdf-passes",
        "20"
    ));
    ok(tool!(
        "kimberlize",
        "inspect",
        &ovl,
        "--passphrase-file",
        p,
        "--max-kdf-passes",
        "11"
    ));

    // The memory cap is a size; a reader may also lower it.
    let ovl = passphrase_overlay(
        &s,
        Argon2Params {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        },
    );
    let low = ["--passphrase-file", p, "--max-kdf-memory", "32K"];
    let o = apply(&s, &[&ovl], &s.t.path().join("low"), &low);
    refused(&o, 3, "--max-kdf-memory");
    let enough = ["--passphrase-file", p, "--max-kdf-memory", "64K"];
    ok(apply(&s, &[&ovl], &s.t.path().join("enough"), &enough));
}
