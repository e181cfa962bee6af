//! The Kimberley tools as processes in tests, shared by the dekimberlize
//! and vmigrate suites (included with `#[path]` beside `ctl.rs`, in a
//! module that provides `bin(name)`): children killed on drop, their
//! stderr collected, stopping a served VM, keys, bases and overlays.

#![allow(dead_code)]

use std::ffi::OsStr;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

use super::bin;
use super::ctl::{value, Client};

/// Asserts that a tool exited 0; returns its output.
#[track_caller]
pub fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// A child process, killed on drop.
pub struct Proc(pub Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Stderr lines as they arrive.
pub type Log = Arc<Mutex<Vec<String>>>;

/// A child process whose stderr lines are collected (and echoed with a
/// tag); killed on drop.
pub struct Logged {
    pub proc: Proc,
    pub err: Log,
    lines: mpsc::Receiver<String>,
}

impl Logged {
    /// Spawns `cmd` with no stdin or stdout and its stderr collected.
    pub fn spawn(cmd: &mut Command, tag: &str) -> Logged {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let err = Log::default();
        let (tx, lines) = mpsc::channel();
        let (e, tag) = (err.clone(), tag.to_string());
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {l}");
                e.lock().unwrap().push(l.clone());
                let _ = tx.send(l);
            }
        });
        Logged {
            proc: Proc(child),
            err,
            lines,
        }
    }

    /// The process, and its stderr lines from now on.
    pub fn into_parts(self) -> (Proc, Log) {
        (self.proc, self.err)
    }

    pub fn pid(&self) -> i32 {
        self.proc.0.id() as i32
    }

    pub fn stderr(&self) -> String {
        self.err.lock().unwrap().join("\n")
    }

    /// The first stderr line starting with `prefix`, waiting up to `within`.
    pub fn line_starting(&self, prefix: &str, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let found = |err: &[String]| err.iter().find(|l| l.starts_with(prefix)).cloned();
            if let Some(l) = found(&self.err.lock().unwrap()) {
                return l;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no line {prefix:?} in {}", self.stderr());
            let next = self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)));
            if let Err(RecvTimeoutError::Disconnected) = next {
                // Stderr is closed: every line is in `err` already.
                let l = found(&self.err.lock().unwrap());
                return l.unwrap_or_else(|| panic!("no line {prefix:?} in {}", self.stderr()));
            }
        }
    }

    /// Waits for the process to exit, at most `within`, and for its last
    /// stderr lines to be collected.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.proc.0.try_wait().unwrap() {
                // Every line is in `err` once stderr is closed; a child that
                // inherited it may hold it open, so wait a little at most.
                let until = Instant::now() + Duration::from_secs(2);
                while Instant::now() < until {
                    if let Err(RecvTimeoutError::Disconnected) =
                        self.lines.recv_timeout(Duration::from_millis(50))
                    {
                        break;
                    }
                }
                return s;
            }
            assert!(
                t.elapsed() < within,
                "the process did not exit within {within:?}: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

/// Stops the VM through its socket; the process exits 0 and removes it.
pub fn stop(p: &mut Logged, sock: &Path) {
    let r = Client::connect(sock).call(r#"{"cmd":"stop"}"#);
    assert_eq!(r, json!({"ok": true, "status": "stopped"}));
    let st = p.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st}: {}", p.stderr());
    assert!(!sock.exists(), "the socket file was left behind");
}

/// What [`check_snapshot_resumes`] compares: the counter, a memory
/// region and the start of the disk.
pub const STATE: &str = "sleep 20\ncounter\nchecksum app\ndisk-checksum 0 64K\n";

/// The snapshot `snap` is a VM directory that `vmigrate run` resumes where
/// it was (`at_snapshot`: the output of [`STATE`] before the snapshot):
/// the same memory and disk, the counter moved on. Its control socket is
/// `snap.sock` in `t`.
pub fn check_snapshot_resumes(t: &Path, snap: &Path, at_snapshot: &[String]) {
    kimberley_formats::vmdir::VmDir::open(snap)
        .unwrap()
        .verify()
        .unwrap();
    let sock = t.join("snap.sock");
    let mut c = Command::new(bin("vmigrate"));
    c.arg("run").arg(snap).arg("--control").arg(&sock);
    let mut p = Logged::spawn(&mut c, "snapshot");
    let now = Client::connect(&sock).exec_ok(STATE);
    for w in ["checksum app", "disk-checksum 0 64K"] {
        assert_eq!(value(&now, w), value(at_snapshot, w), "{w}");
    }
    let c0: u64 = value(at_snapshot, "counter").parse().unwrap();
    let c1: u64 = value(&now, "counter").parse().unwrap();
    assert!(c1 > c0, "the counter went from {c0} to {c1}");
    stop(&mut p, &sock);
}

/// A directory `name` in `t` with permissions `mode`.
pub fn dir_with_mode(t: &Path, name: &str, mode: u32) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let d = t.join(name);
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(mode)).unwrap();
    d
}

/// `kimberlize keygen -o KEY`.
pub fn keygen(key: &Path) {
    ok(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(key)
        .stdin(Stdio::null())
        .output()
        .unwrap());
}

/// `kimberlize base`: a fresh suspended VM directory at `out`.
pub fn make_base(out: &Path, memory: &str, disk: &str) {
    ok(Command::new(bin("kimberlize"))
        .args(["base", "--memory", memory, "--disk", disk, "-o"])
        .arg(out)
        .stdin(Stdio::null())
        .output()
        .unwrap());
}

/// In `dir`: a key `key`, a base `base` (`memory`, `disk`), and the
/// overlay `app.ovl` that `kimberlize build` makes by running `install`
/// in it (resume script: `sleep 10`), with `extra` build arguments.
pub fn build_app(dir: &Path, memory: &str, disk: &str, install: &str, extra: &[&OsStr]) {
    let p = |n: &str| dir.join(n);
    keygen(&p("key"));
    make_base(&p("base"), memory, disk);
    std::fs::write(p("install"), install).unwrap();
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
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .unwrap());
}

/// A tmpfs of `size` (e.g. "8m") mounted at the new directory `dir`,
/// unmounted on drop: a file system that runs out of space. Needs root.
pub struct SmallTmpfs(pub PathBuf);

impl SmallTmpfs {
    pub fn mount(dir: &Path, size: &str) -> SmallTmpfs {
        std::fs::create_dir(dir).unwrap();
        let m = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            m.status.success(),
            "this test needs root to mount a small tmpfs: {}",
            String::from_utf8_lossy(&m.stderr)
        );
        SmallTmpfs(dir.to_path_buf())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}
