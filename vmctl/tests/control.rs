//! `vmctl` against a real microVM run by `vmigrate run`: every command, the
//! JSON answers on stdout, exec's status as the exit code, stop, and the
//! failures of the client itself.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use kimberley_cli::exit::{USAGE, VMCTL_FAILED};
use serde_json::Value;

fn vmctl(sock: &Path, args: &[&str]) -> Output {
    Command::new(bin("vmctl"))
        .arg(sock)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// The one JSON answer line on stdout.
fn answer(o: &Output) -> Value {
    let s = String::from_utf8(o.stdout.clone()).unwrap();
    assert_eq!(s.lines().count(), 1, "not one line: {s:?}");
    serde_json::from_str(&s).unwrap()
}

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn status_exec_snapshot_pause_resume_and_stop() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm = t.path().join("vm");
    make_base(&vm, "32M", "4M");
    let sock = t.path().join("vm.sock");
    let mut p = run_vm(&vm, &sock);

    let o = vmctl(&sock, &["status"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let a = answer(&o);
    assert_eq!(a["ok"], true);
    assert_eq!(a["status"], "running");
    assert_eq!(a["memory_size"], 32 << 20);

    // A script from a file: its output in the answer, exit 0.
    let script = t.path().join("fill.txt");
    std::fs::write(&script, "fill app 1M 7 random\nchecksum app\n").unwrap();
    let o = vmctl(&sock, &["exec", script.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let a = answer(&o);
    assert_eq!(a["status"], 0);
    assert!(
        a["output"].as_str().unwrap().contains("checksum app"),
        "{a}"
    );

    // A failing script (from stdin): vmctl exits with its status.
    let mut c = Command::new(bin("vmctl"))
        .arg(&sock)
        .args(["exec", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin
        .take()
        .unwrap()
        .write_all(b"checksum no-such-region\n")
        .unwrap();
    let o = c.wait_with_output().unwrap();
    let a = answer(&o);
    assert_eq!(a["ok"], true, "{a}");
    let status = a["status"].as_i64().unwrap();
    assert_ne!(status, 0, "{a}");
    assert_eq!(o.status.code(), Some(status as i32), "{a} {}", text(&o));

    // pause / resume answer with the new state.
    let o = vmctl(&sock, &["pause"]);
    assert_eq!(
        (o.status.code(), answer(&o)["status"].clone()),
        (Some(0), "paused".into())
    );
    assert_eq!(answer(&vmctl(&sock, &["status"]))["status"], "paused");
    let o = vmctl(&sock, &["resume"]);
    assert_eq!(
        (o.status.code(), answer(&o)["status"].clone()),
        (Some(0), "running".into())
    );

    // A relative snapshot directory is taken from vmctl's working directory.
    let o = Command::new(bin("vmctl"))
        .arg(&sock)
        .args(["snapshot", "snap"])
        .current_dir(t.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(answer(&o)["dir"], t.path().join("snap").to_str().unwrap());
    kimberley_formats::vmdir::VmDir::open(&t.path().join("snap"))
        .unwrap()
        .verify()
        .unwrap();
    // A refusal (the snapshot directory exists now): printed, exit 125.
    let o = vmctl(
        &sock,
        &["snapshot", t.path().join("snap").to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(VMCTL_FAILED.into()));
    assert_eq!(answer(&o)["ok"], false);
    assert!(
        text(&o).starts_with("error: the VM's process refused: "),
        "{}",
        text(&o)
    );

    // stop: the answer, then the VM's process suspends the VM and exits 0.
    let o = vmctl(&sock, &["stop"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(
        answer(&o),
        serde_json::json!({"ok": true, "status": "stopped"})
    );
    assert!(
        p.wait_exit(Duration::from_secs(60)).success(),
        "{}",
        p.stderr()
    );
    assert!(!sock.exists());
}

#[test]
fn without_a_server_vmctl_fails_with_its_own_code() {
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("none.sock");
    let o = vmctl(&sock, &["status"]);
    assert_eq!(o.status.code(), Some(VMCTL_FAILED.into()));
    assert!(o.stdout.is_empty());
    let e = text(&o);
    assert!(
        e.starts_with("error: connecting to the control socket "),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    // Usage errors: nothing sent.
    let o = vmctl(&sock, &["reboot"]);
    assert_eq!(o.status.code(), Some(USAGE.into()));
}

#[test]
fn a_server_that_hangs_up_or_talks_nonsense_is_a_failure() {
    use std::os::unix::net::UnixListener;
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("fake.sock");
    let l = UnixListener::bind(&sock).unwrap();
    let server = std::thread::spawn(move || {
        for reply in [
            &b""[..],
            b"not json\n",
            b"{\"ok\":true,\"status\":\"running\"",
        ] {
            let (mut s, _) = l.accept().unwrap();
            let mut req = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(&s), &mut req).unwrap();
            assert_eq!(req, "{\"cmd\":\"status\"}\n");
            s.write_all(reply).unwrap();
        }
    });
    for want in [
        "without a whole answer",
        "the answer is not JSON",
        "without a whole answer",
    ] {
        let o = vmctl(&sock, &["status"]);
        assert_eq!(o.status.code(), Some(VMCTL_FAILED.into()), "{}", text(&o));
        assert!(text(&o).contains(want), "{}", text(&o));
    }
    server.join().unwrap();
}
