//! The control socket of `dekimberlize --run` through a real process on
//! real KVM: every request, a snapshot that resumes, the default socket
//! location, and SIGTERM while a script runs. With KIMBERLEY_REQUIRE_KVM=1
//! these fail instead of skipping when /dev/kvm is missing.

#[path = "../../vmm/tests/common/ctl.rs"]
mod ctl;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ctl::{value, Client};
use kimberley_formats::vmdir::VmDir;
use serde_json::json;

fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_dekimberlize")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first",
        p.display()
    );
    p
}

fn kvm() -> bool {
    kimberley_vmm::kvm_for_tests()
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

struct Proc {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(t.elapsed() < within, "the process did not exit in time");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const INSTALL: &str = "fill app 4M 1 random\ndisk-write 0 64K 3\ncounter start\n";
const STATE: &str = "sleep 20\ncounter\nchecksum app\ndisk-checksum 0 64K\n";

/// A key, a base, an overlay; `dekimberlize --run` of it with `args`.
fn launch(t: &Path, args: &[&str], envs: &[(&str, &Path)]) -> Proc {
    let p = |n: &str| t.join(n);
    ok(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(p("key"))
        .output()
        .unwrap());
    ok(Command::new(bin("kimberlize"))
        .args(["base", "--memory", "32M", "--disk", "4M", "-o"])
        .arg(p("base"))
        .stdin(Stdio::null())
        .output()
        .unwrap());
    std::fs::write(p("install"), INSTALL).unwrap();
    std::fs::write(p("resume"), "sleep 10\n").unwrap();
    ok(Command::new(bin("kimberlize"))
        .args(["build", "-q", "--base"])
        .arg(p("base"))
        .arg("--install")
        .arg(p("install"))
        .arg("--resume")
        .arg(p("resume"))
        .arg("-k")
        .arg(p("key"))
        .arg("-o")
        .arg(p("app.ovl"))
        .stdin(Stdio::null())
        .output()
        .unwrap());
    let mut cmd = Command::new(bin("dekimberlize"));
    cmd.arg("--base")
        .arg(p("base"))
        .arg("-i")
        .arg(p("app.ovl"))
        .arg("-k")
        .arg(p("key"))
        .arg("-o")
        .arg(p("out"))
        .arg("--run")
        .args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = child.stderr.take().unwrap();
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for l in BufReader::new(err).lines().map_while(Result::ok) {
            eprintln!("[dekimberlize] {l}");
            let _ = tx.send(l);
        }
    });
    Proc { child, lines }
}

fn stop(p: &mut Proc, sock: &Path) {
    let r = Client::connect(sock).call(r#"{"cmd":"stop"}"#);
    assert_eq!(r, json!({"ok": true, "status": "stopped"}));
    assert!(p.wait_exit(Duration::from_secs(60)).success());
    assert!(!sock.exists(), "the socket file was left behind");
}

#[test]
fn every_request_through_dekimberlize_run() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let sock = t.path().join("app.sock");
    let mut p = launch(t.path(), &["--control", sock.to_str().unwrap()], &[]);
    let mut c = Client::connect(&sock);
    let before = c.exec_ok(STATE);
    let snap = t.path().join("snap");
    ctl::check_every_request(&sock, &snap, false);
    c.exec_ok("fill app 4M 9 random\n");
    drop(c);
    stop(&mut p, &sock);
    VmDir::open(&t.path().join("out"))
        .unwrap()
        .verify()
        .unwrap();

    // The snapshot is a VM directory that resumes where it was.
    VmDir::open(&snap).unwrap().verify().unwrap();
    let sock2 = t.path().join("snap.sock");
    let mut child = Command::new(bin("vmigrate"))
        .arg("run")
        .arg(&snap)
        .arg("--control")
        .arg(&sock2)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let now = Client::connect(&sock2).exec_ok(STATE);
    assert_eq!(value(&now, "checksum app"), value(&before, "checksum app"));
    assert_eq!(
        value(&now, "disk-checksum 0 64K"),
        value(&before, "disk-checksum 0 64K")
    );
    let r = Client::connect(&sock2).call(r#"{"cmd":"stop"}"#);
    assert_eq!(r["ok"], true);
    assert!(child.wait().unwrap().success());
}

/// Without --control the socket is in a private directory under
/// `$XDG_RUNTIME_DIR`; SIGTERM during a long script suspends at once.
#[test]
fn default_socket_and_sigterm_during_a_script() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let xdg = t.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut p = launch(t.path(), &[], &[("XDG_RUNTIME_DIR", &xdg)]);
    let prefix = "launch VM running; control socket ";
    let line = loop {
        let l = p
            .lines
            .recv_timeout(Duration::from_secs(60))
            .expect("no socket line");
        if l.starts_with(prefix) {
            break l;
        }
    };
    let sock = PathBuf::from(line[prefix.len()..].split(" (").next().unwrap());
    assert_eq!(
        sock,
        xdg.join("kimberley")
            .join(format!("dekimberlize-{}.sock", p.child.id()))
    );
    let c = Client::connect(&sock);
    assert_eq!(
        std::fs::metadata(&sock).unwrap().mode() & 0o777,
        0o600,
        "socket mode"
    );
    let s2 = sock.clone();
    let client = std::thread::spawn(move || {
        Client::connect(&s2).call_json(json!({"cmd": "exec", "script": "sleep 15000"}))
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    // SAFETY: kill(2) on our own child.
    assert_eq!(unsafe { libc::kill(p.child.id() as i32, libc::SIGTERM) }, 0);
    assert!(p.wait_exit(Duration::from_secs(10)).success());
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(3), "suspending took {took:?}");
    let r = client.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().starts_with("interrupted"),
        "{r}"
    );
    assert!(!sock.exists());
    drop(c);
    VmDir::open(&t.path().join("out"))
        .unwrap()
        .verify()
        .unwrap();
}
