//! The command-line tools end to end: pipes, files, exit codes, stats,
//! nothing left behind on failure, a full disk.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

fn same_files(a: &Path, b: &Path) {
    for f in ["manifest.json", "memory.raw", "disk0.raw", "state.bin"] {
        assert_eq!(
            std::fs::read(a.join(f)).unwrap(),
            std::fs::read(b.join(f)).unwrap(),
            "{f} differs"
        );
    }
}

#[test]
fn pipe_from_kimberlize_into_dekimberlize() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let out = t.path().join("out");
    let stats = t.path().join("stats.json");
    let mut k = Command::new(bin("kimberlize"))
        .args(["diff", "-q", "--base"])
        .arg(&p.base)
        .arg("--launch")
        .arg(&p.launch)
        .arg("-k")
        .arg(&key)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let d = Command::new(bin("dekimberlize"))
        .arg("--base")
        .arg(&p.base)
        .arg("-k")
        .arg(&key)
        .arg("-o")
        .arg(&out)
        .arg("--stats-json")
        .arg(&stats)
        .stdin(k.stdout.take().unwrap())
        .output()
        .unwrap();
    assert!(k.wait().unwrap().success());
    assert!(d.status.success(), "{}", stderr(&d));
    same_files(&out, &p.launch);
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(stats).unwrap()).unwrap();
    assert!(s["overlay_bytes"].as_u64().unwrap() > 0);
    assert!(s["chunks"]["literal"].as_u64().unwrap() > 0);
    for stage in ["open_ms", "receive_ms", "apply_ms", "total_ms"] {
        assert!(s["times"][stage].is_u64(), "{stage} missing");
    }
}

#[test]
fn files_verify_inspect_and_exit_codes() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let ovl = t.path().join("a.ovl");
    let stats = t.path().join("d.json");
    let o = tool!(
        "kimberlize",
        "diff",
        "--base",
        &p.base,
        "--launch",
        &p.launch,
        "-k",
        &key,
        "-o",
        &ovl,
        "--stats-json",
        &stats
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let s: serde_json::Value = serde_json::from_slice(&std::fs::read(stats).unwrap()).unwrap();
    assert_eq!(
        s["overlay_bytes"].as_u64().unwrap(),
        std::fs::metadata(&ovl).unwrap().len()
    );
    // An existing output file is refused (6) unless --force.
    let o = tool!(
        "kimberlize",
        "diff",
        "--base",
        &p.base,
        "--launch",
        &p.launch,
        "-k",
        &key,
        "-o",
        &ovl
    );
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    // Encryption is the default: no key option is a usage error.
    let o = tool!(
        "kimberlize",
        "diff",
        "--base",
        &p.base,
        "--launch",
        &p.launch,
        "-o",
        t.path().join("x.ovl")
    );
    assert_eq!(code(&o), kimberley_cli::exit::USAGE as i32);
    assert!(stderr(&o).contains("--no-encrypt"), "{}", stderr(&o));

    let o = tool!(
        "dekimberlize",
        "verify",
        "-i",
        &ovl,
        "-k",
        &key,
        "--base",
        &p.base
    );
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("OK"));
    let o = tool!("kimberlize", "inspect", &ovl, "-k", &key);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("layer 0") && text.contains("every segment authenticated"),
        "{text}"
    );
    let o = tool!("kimberlize", "inspect", &ovl);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("verified     no"));

    let mut wrong = std::fs::read(&ovl).unwrap();
    let n = wrong.len();
    wrong[n / 2] ^= 1;
    let bad = t.path().join("bad.ovl");
    std::fs::write(&bad, &wrong).unwrap();
    let trunc = t.path().join("trunc.ovl");
    std::fs::write(&trunc, &wrong[..n / 3]).unwrap();
    let other_key = t.path().join("other.key");
    // Private, as a key file should be (else a warning line comes first).
    write_private(&other_key, [9u8; 32]);
    let empty = t.path().join("empty.ovl");
    std::fs::write(&empty, b"").unwrap();
    let before: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let cases: Vec<(&Path, &Path, &Path, i32, &str)> = vec![
        (&bad, &key, &p.base, 4, "does not authenticate"),
        (&trunc, &key, &p.base, 3, "truncated"),
        (&ovl, &other_key, &p.base, 4, "wrong key"),
        (&ovl, &key, &p.launch, 5, "another base"),
        (&empty, &key, &p.base, 3, "empty"),
        (&key, &key, &p.base, 3, "not a Kimberley overlay"),
    ];
    for (input, k, base, want, text) in cases {
        let out = t.path().join("out");
        let o = tool!(
            "dekimberlize",
            "--base",
            base,
            "-i",
            input,
            "-k",
            k,
            "-o",
            &out
        );
        assert_eq!(code(&o), want, "{}: {}", input.display(), stderr(&o));
        let e = stderr(&o);
        assert!(
            e.starts_with("error: ") && e.contains(text) && e.lines().count() == 1,
            "{e}"
        );
        let after: Vec<_> = std::fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(after, before, "left something behind");
    }
    // An existing output directory.
    let o = tool!(
        "dekimberlize",
        "--base",
        &p.base,
        "-i",
        &ovl,
        "-k",
        &key,
        "-o",
        &p.launch
    );
    assert_eq!(code(&o), 6, "{}", stderr(&o));
    // A VMDIR that is not one.
    let o = tool!(
        "dekimberlize",
        "--base",
        t.path(),
        "-i",
        &ovl,
        "-k",
        &key,
        "-o",
        t.path().join("o2")
    );
    assert_eq!(code(&o), 7, "{}", stderr(&o));
    // Bad arguments.
    let o = tool!("dekimberlize", "--bogus");
    assert_eq!(code(&o), 2);
}

#[test]
fn a_full_disk_fails_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let ovl = t.path().join("a.ovl");
    let o = tool!(
        "kimberlize",
        "diff",
        "--base",
        &p.base,
        "--launch",
        &p.launch,
        "-k",
        &key,
        "-o",
        &ovl
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // A 1 MiB tmpfs cannot hold the launch VM's data.
    let mnt = t.path().join("small");
    let _u = common::tools::SmallTmpfs::mount(&mnt, "1m");
    let o = tool!(
        "dekimberlize",
        "--base",
        &p.base,
        "-i",
        &ovl,
        "-k",
        &key,
        "-o",
        mnt.join("out")
    );
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("No space left on device"),
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "left something on the full disk"
    );
    // And kimberlize writing an overlay there.
    let o = tool!(
        "kimberlize",
        "diff",
        "--no-encrypt",
        "--level",
        "1",
        "--base",
        &p.base,
        "--launch",
        &p.launch,
        "-o",
        mnt.join("x.ovl")
    );
    if !o.status.success() {
        assert_eq!(code(&o), 1, "{}", stderr(&o));
        assert_eq!(
            std::fs::read_dir(&mnt).unwrap().count(),
            0,
            "left something on the full disk"
        );
    }
}

#[test]
fn layered_chain_from_the_command_line() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let (l1, l2, p2) = two_layers(t.path(), &p, &key);
    let out = t.path().join("out");
    ok(tool!(
        "dekimberlize",
        "--base",
        &p.base,
        "-i",
        &l1,
        "-i",
        &l2,
        "-k",
        &key,
        "-o",
        &out
    ));
    same_files(&out, &p2.launch);
    let o = tool!(
        "dekimberlize",
        "--base",
        &p.base,
        "-i",
        &l2,
        "-i",
        &l1,
        "-k",
        &key,
        "-o",
        t.path().join("o2")
    );
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    let o = tool!(
        "dekimberlize",
        "--base",
        &p.base,
        "-i",
        &l2,
        "-k",
        &key,
        "-o",
        t.path().join("o3")
    );
    assert_eq!(code(&o), 5, "{}", stderr(&o));
    assert!(stderr(&o).contains("parent"));
}

#[test]
fn refuses_to_write_an_overlay_to_a_terminal() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    // `script` runs the command with a pseudo-terminal as its stdout.
    let cmd = format!(
        "{} diff --base {} --launch {} -k {}",
        bin("kimberlize").display(),
        p.base.display(),
        p.launch.display(),
        key.display()
    );
    let o = run(Command::new("script").args(["-qec", &cmd, "/dev/null"]));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(code(&o), kimberley_cli::exit::USAGE as i32, "{text}");
    assert!(
        text.contains("refusing to write an overlay to a terminal"),
        "{text}"
    );
}

#[test]
fn diff_orders_by_a_working_set_file_and_refuses_a_bad_one() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let ws = t.path().join("ws.txt");
    std::fs::write(&ws, "kimberley-working-set 1\n1 7\n0 3\n# a comment\n0 1\n").unwrap();
    let ovl = t.path().join("ws.ovl");
    let o = diff(
        &p.base,
        &p.launch,
        &ovl,
        &[
            "-k".as_ref(),
            key.as_os_str(),
            "--working-set".as_ref(),
            ws.as_os_str(),
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let bytes = std::fs::read(&ovl).unwrap();
    assert_eq!(
        u16::from_le_bytes([bytes[8], bytes[9]]),
        2,
        "overlay version"
    );
    let out = t.path().join("out");
    let d = run(Command::new(bin("dekimberlize"))
        .arg("--base")
        .arg(&p.base)
        .arg("-k")
        .arg(&key)
        .arg("-i")
        .arg(&ovl)
        .arg("-o")
        .arg(&out));
    assert_eq!(code(&d), 0, "{}", stderr(&d));
    same_files(&out, &p.launch);
    // Version 1 on request, without a working set.
    let v1 = t.path().join("v1.ovl");
    let o = diff(
        &p.base,
        &p.launch,
        &v1,
        &[
            "-k".as_ref(),
            key.as_os_str(),
            "--overlay-version".as_ref(),
            "1".as_ref(),
        ],
    );
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&v1).unwrap()[8], 1);
    // Version 1 by default, and never with a working set.
    let dflt = t.path().join("default.ovl");
    let o = diff(&p.base, &p.launch, &dflt, &["-k".as_ref(), key.as_os_str()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert_eq!(std::fs::read(&dflt).unwrap()[8], 1);
    let both = t.path().join("both.ovl");
    let o = diff(
        &p.base,
        &p.launch,
        &both,
        &[
            "-k".as_ref(),
            key.as_os_str(),
            "--working-set".as_ref(),
            ws.as_os_str(),
            "--overlay-version".as_ref(),
            "1".as_ref(),
        ],
    );
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("needs overlay version 2"),
        "{}",
        stderr(&o)
    );
    assert!(!both.exists());
    // A malformed file, and one naming a chunk the launch VM lacks: usage
    // errors naming the file, and no output.
    for (name, text, why) in [
        ("bad1.txt", "kimberley-working-set 1\n0 01\n", "line 2"),
        ("bad2.txt", "0 1\n", "first line"),
        (
            "bad3.txt",
            "kimberley-working-set 1\n0 99999999\n",
            "does not have",
        ),
    ] {
        let f = t.path().join(name);
        std::fs::write(&f, text).unwrap();
        let out = t.path().join(format!("{name}.ovl"));
        let o = diff(
            &p.base,
            &p.launch,
            &out,
            &[
                "-k".as_ref(),
                key.as_os_str(),
                "--working-set".as_ref(),
                f.as_os_str(),
            ],
        );
        assert_eq!(code(&o), 2, "{name}: {}", stderr(&o));
        assert!(stderr(&o).contains(why), "{name}: {}", stderr(&o));
        assert!(!out.exists());
    }
}
