//! The README's "Using it" commands, exactly as written there, against the
//! workspace's binaries in a temporary directory: the launch VM it resumes
//! holds what the example scripts made, and the `vmctl` commands of the
//! second block see it and stop it.

mod common;

use std::path::Path;
use std::process::Command;

use common::{value, Client, Logged};

/// The `n`th indented block after `## Using it`, one command a line
/// (comments after `#` dropped).
fn using_it(readme: &str, n: usize) -> Vec<String> {
    let rest = readme
        .split("\n## Using it\n")
        .nth(1)
        .expect("README has no \"## Using it\"");
    let mut lines = rest.lines().peekable();
    let mut block = Vec::new();
    for _ in 0..=n {
        block = Vec::new();
        while lines.peek().is_some_and(|l| !l.starts_with("    ")) {
            lines.next();
        }
        while let Some(l) = lines.next_if(|l| l.starts_with("    ")) {
            block.push(l.split(" #").next().unwrap().trim().to_string());
        }
    }
    block
}

#[test]
fn readme_using_it_runs_as_written() {
    if !common::kvm() {
        return;
    }
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let readme = std::fs::read_to_string(repo.join("README.md")).unwrap();
    let cmds = using_it(&readme, 0);
    assert_eq!(cmds.len(), 4, "{cmds:?}");
    let ctl = using_it(&readme, 1);
    assert!(
        ctl.len() == 3 && ctl.iter().all(|c| c.starts_with("vmctl app.sock ")),
        "{ctl:?}"
    );
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
    // One command as written, in the temporary directory; it must succeed.
    let sh = |c: &str| {
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
        o
    };
    for c in first {
        build_output.push_str(&String::from_utf8_lossy(&sh(c).stderr));
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
    // The socket exists once the VM runs.
    drop(Client::connect(&sock));
    let vmctl = |c: &str| {
        let answer: serde_json::Value = serde_json::from_slice(&sh(c).stdout).unwrap();
        assert_eq!(answer["ok"], true, "{c}: {answer}");
        answer
    };
    let status = vmctl(&ctl[0]);
    assert_eq!(status["status"], "running", "{status}");
    let after = vmctl(&ctl[1]);
    let after: Vec<String> = after["output"]
        .as_str()
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
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
    vmctl(&ctl[2]);
    let st = run.wait_exit(std::time::Duration::from_secs(60));
    assert!(st.success(), "{st}: {}", run.stderr());
    assert!(!sock.exists(), "the socket file was left behind");
    assert!(t
        .path()
        .join("app-vm")
        .join(kimberley_formats::vmdir::MANIFEST)
        .exists());
}
