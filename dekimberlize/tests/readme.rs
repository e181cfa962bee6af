//! The README's "Using it" commands, exactly as written there, against the
//! workspace's binaries in a temporary directory: the launch VM it resumes
//! holds what the example scripts made.

mod common;

use std::path::Path;
use std::process::Command;

use common::{stop, value, Client, Logged};

/// The first indented block after `## Using it`, one command a line.
fn using_it(readme: &str) -> Vec<String> {
    let rest = readme
        .split("\n## Using it\n")
        .nth(1)
        .expect("README has no \"## Using it\"");
    rest.lines()
        .skip_while(|l| !l.starts_with("    "))
        .take_while(|l| l.starts_with("    "))
        .map(|l| l.trim().to_string())
        .collect()
}

#[test]
fn readme_using_it_runs_as_written() {
    if !common::kvm() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let cmds = using_it(&std::fs::read_to_string(repo.join("README.md")).unwrap());
    assert_eq!(cmds.len(), 4, "{cmds:?}");
    let bin_dir = common::bin("kimberlize").parent().unwrap().to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let t = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        repo.join("examples").canonicalize().unwrap(),
        t.path().join("examples"),
    )
    .unwrap();

    let (last, first) = cmds.split_last().unwrap();
    let mut build_output = String::new();
    for c in first {
        let o = Command::new("bash")
            .args(["-euo", "pipefail", "-c", c])
            .current_dir(t.path())
            .env("PATH", &path)
            .output()
            .unwrap();
        assert!(
            o.status.success(),
            "{c}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        build_output.push_str(&String::from_utf8_lossy(&o.stderr));
    }
    let before: Vec<String> = build_output.lines().map(str::to_string).collect();

    // The last command runs the launch VM until it is stopped.
    assert!(last.contains("--run --control app.sock"), "{last}");
    let mut run = Logged::spawn(
        Command::new("bash")
            .args(["-c", &format!("exec {last}")])
            .current_dir(t.path())
            .env("PATH", &path),
        "readme",
    );
    let sock = t.path().join("app.sock");
    let mut c = Client::connect(&sock);
    let check = std::fs::read_to_string(repo.join("examples/check.txt")).unwrap();
    let after = c.exec_ok(&check);
    for what in [
        "checksum app-code",
        "checksum app-data",
        "disk-checksum 0 16M",
        "disk-checksum 128M 4M",
    ] {
        assert_eq!(value(&after, what), value(&before, what), "{what}");
    }
    let c0: u64 = value(&before, "counter").parse().unwrap();
    let c1: u64 = value(&after, "counter").parse().unwrap();
    assert!(c1 > c0, "the counter did not continue: {c0} -> {c1}");
    drop(c);
    stop(&mut run, &sock);
    assert!(t
        .path()
        .join("app-vm")
        .join(kimberley_formats::vmdir::MANIFEST)
        .exists());
}
