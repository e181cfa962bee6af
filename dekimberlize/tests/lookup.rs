//! What a user can look up: `kimberlize inspect VMDIR` (the identity a
//! wrong-base error names), `dekimberlize verify --base` over a chain, and
//! the schema version of every JSON output.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kimberley_cli::exit;

fn json(bytes: &[u8]) -> serde_json::Value {
    serde_json::from_slice(bytes).unwrap()
}

/// The identity a wrong-base error names: "... (identity ID)".
fn named_identity(err: &str) -> String {
    let at = err.find("(identity ").expect(err) + "(identity ".len();
    err[at..].split(')').next().unwrap().to_string()
}

#[test]
fn inspect_vmdir_shows_the_identity_a_wrong_base_error_names() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let other = second_pair(t.path());
    let ovl = t.path().join("a.ovl");
    ok(diff(
        &p.base,
        &p.launch,
        &ovl,
        &["-k".as_ref(), key.as_os_str()],
    ));
    let o = tool!(
        "dekimberlize",
        "--base",
        &other.base,
        "-i",
        &ovl,
        "-k",
        &key,
        "-o",
        t.path().join("x")
    );
    assert_eq!(code(&o), exit::WRONG_BASE as i32, "{}", stderr(&o));
    let named = named_identity(&stderr(&o));

    let text = ok(tool!("kimberlize", "inspect", &other.base));
    let text = String::from_utf8(text.stdout).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("identity"))
        .expect(&text);
    assert_eq!(
        line.split_whitespace().nth(1),
        Some(named.as_str()),
        "{text}"
    );
    // The base the overlay was made from has another identity.
    let mine = String::from_utf8(ok(tool!("kimberlize", "inspect", &p.base)).stdout).unwrap();
    assert!(!mine.contains(&named), "{mine}");

    let j = json(&ok(tool!("kimberlize", "inspect", &other.base, "--json")).stdout);
    assert_eq!(j["schema"], 1);
    assert_eq!(j["identity"], named.as_str());
    assert!(j["identity_full"].as_str().unwrap().starts_with(&named));
    assert_eq!(j["backend"], "microvm");
    let manifest = kimberley_formats::vmdir::VmDir::open(&other.base)
        .unwrap()
        .manifest;
    let comps = j["components"].as_array().unwrap();
    assert_eq!(comps.len(), manifest.components.len());
    for (i, (c, m)) in comps.iter().zip(&manifest.components).enumerate() {
        let file = other.base.join(manifest.file_name(i));
        assert_eq!(c["file"], manifest.file_name(i).as_str());
        assert_eq!(c["size"], m.size);
        assert_eq!(c["size"], std::fs::metadata(&file).unwrap().len());
        assert_eq!(
            c["blake3"],
            kimberley_formats::digest::hex(&m.digest).as_str()
        );
        assert!(c["allocated"].is_u64());
        assert!(text.contains(c["blake3"].as_str().unwrap()), "{text}");
    }
    assert_eq!(comps[0]["kind"], "memory");
    // Not a VM directory: the VM directory error, not "Is a directory".
    let o = tool!("kimberlize", "inspect", t.path());
    assert_eq!(code(&o), exit::VMDIR as i32, "{}", stderr(&o));
}

#[test]
fn verify_checks_a_chain_against_its_base_without_writing() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let (l1, l2, p2) = two_layers(t.path(), &p, &key);
    let listing = || {
        let mut v: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    // `dekimberlize verify --base BASE -i L... -k KEY`.
    let verify = |base: &Path, chain: &[&PathBuf]| {
        let mut c = std::process::Command::new(bin("dekimberlize"));
        c.arg("verify").arg("--base").arg(base).arg("-k").arg(&key);
        for l in chain {
            c.arg("-i").arg(l);
        }
        common::run(&mut c)
    };
    let before = listing();
    let o = ok(verify(&p.base, &[&l1, &l2]));
    let e = stderr(&o);
    assert_eq!(e.matches("every segment authenticated").count(), 2, "{e}");
    assert!(e.contains("the chain of 2 overlays applies"), "{e}");
    assert_eq!(listing(), before, "verify wrote something");

    // Out of order, and a layer without its parent: exit 5.
    for chain in [&[&l2, &l1][..], &[&l2]] {
        let o = verify(&p.base, chain);
        let e = stderr(&o);
        assert_eq!(code(&o), exit::WRONG_BASE as i32, "{chain:?}: {e}");
        assert!(e.contains("l2.ovl"), "{e}");
    }
    // The right chain on another base: exit 5.
    let o = verify(&p2.base, &[&l1, &l2]);
    assert_eq!(code(&o), exit::WRONG_BASE as i32, "{}", stderr(&o));
    assert!(stderr(&o).contains("wrong base"), "{}", stderr(&o));
    // A tampered second layer: exit 4, although its links are right.
    let mut bytes = std::fs::read(&l2).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    let bad = t.path().join("l2-bad.ovl");
    std::fs::write(&bad, bytes).unwrap();
    let o = verify(&p.base, &[&l1, &bad]);
    assert_eq!(code(&o), exit::AUTH as i32, "{}", stderr(&o));
    // A chain needs --base; one overlay without it is checked alone.
    let o = tool!("dekimberlize", "verify", "-i", &l1, "-i", &l2, "-k", &key);
    assert_eq!(code(&o), exit::USAGE as i32, "{}", stderr(&o));
    ok(tool!("dekimberlize", "verify", "-i", &l2, "-k", &key));
}

#[test]
fn every_json_output_has_a_schema_version() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let ovl = t.path().join("a.ovl");
    let (ds, as_) = (t.path().join("diff.json"), t.path().join("apply.json"));
    ok(diff(
        &p.base,
        &p.launch,
        &ovl,
        &[
            "-k".as_ref(),
            key.as_os_str(),
            "--stats-json".as_ref(),
            ds.as_os_str(),
        ],
    ));
    ok(tool!(
        "dekimberlize",
        "--base",
        &p.base,
        "-i",
        &ovl,
        "-k",
        &key,
        "-o",
        t.path().join("out"),
        "--stats-json",
        &as_
    ));
    let outputs = [
        json(&std::fs::read(&ds).unwrap()),
        json(&std::fs::read(&as_).unwrap()),
        json(&ok(tool!("kimberlize", "inspect", &ovl, "--json")).stdout),
        json(&ok(tool!("kimberlize", "inspect", &ovl, "-k", &key, "--json")).stdout),
        json(&ok(tool!("kimberlize", "inspect", &p.base, "--json")).stdout),
    ];
    for v in outputs {
        assert_eq!(v["schema"], 1, "{v}");
    }
    // docs/JSON.md documents each output with its version.
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/JSON.md"))
            .unwrap();
    for section in [
        "kimberlize inspect OVL --json",
        "kimberlize inspect VMDIR --json",
        "kimberlize diff --stats-json",
        "kimberlize build --stats-json",
        "dekimberlize --stats-json",
        "vmigrate send --stats-json",
        "vmigrate recv --stats-json",
    ] {
        assert!(
            doc.contains(&format!("## `{section}` (schema 1)")),
            "docs/JSON.md lacks {section}"
        );
    }
}
