//! scripts/install.sh into a temporary prefix, with the workspace's debug
//! binaries: binaries, man pages (found by `man`), completions.

mod common;

use std::path::Path;
use std::process::Command;

#[test]
fn install_into_a_prefix() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let bin_dir = common::bin("dekimberlize").parent().unwrap().to_path_buf();
    for t in ["kimberlize", "vmigrate", "vmctl"] {
        common::bin(t);
    }
    let tmp = tempfile::tempdir().unwrap();
    let prefix = tmp.path().join("prefix");
    let out = Command::new(repo.join("scripts/install.sh"))
        .arg("--prefix")
        .arg(&prefix)
        .arg("--bin-dir")
        .arg(&bin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "install.sh: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    for t in ["kimberlize", "dekimberlize", "vmigrate", "vmctl"] {
        let v = Command::new(prefix.join("bin").join(t))
            .arg("--version")
            .output()
            .unwrap();
        assert!(
            v.status.success() && String::from_utf8_lossy(&v.stdout).starts_with(t),
            "{t} --version"
        );
        for f in [
            format!("share/man/man1/{t}.1"),
            format!("share/bash-completion/completions/{t}"),
            format!("share/zsh/site-functions/_{t}"),
            format!("share/fish/vendor_completions.d/{t}.fish"),
        ] {
            let p = prefix.join(&f);
            assert!(
                p.metadata().is_ok_and(|m| m.len() > 0),
                "{f} is not installed"
            );
        }
    }
    // Every page in man/ is installed.
    for e in std::fs::read_dir(repo.join("man")).unwrap() {
        let name = e.unwrap().file_name();
        assert!(
            prefix.join("share/man/man1").join(&name).exists(),
            "{name:?} is not installed"
        );
    }
    // `man` finds the pages under the prefix, where man-db is installed.
    if let Ok(o) = Command::new("man")
        .args(["-w", "kimberlize-build"])
        .env("MANPATH", prefix.join("share/man"))
        .output()
    {
        assert!(
            o.status.success(),
            "man -w: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        let found = String::from_utf8(o.stdout).unwrap();
        assert_eq!(
            Path::new(found.trim()),
            prefix.join("share/man/man1/kimberlize-build.1")
        );
    }
    // A bad argument is a usage error.
    let bad = Command::new(repo.join("scripts/install.sh"))
        .arg("--frobnicate")
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
}
