//! Shared by the vmigrate test suites: a running source VM behind its
//! control socket, receivers, senders, and looks into the guest.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

pub fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmigrate")).with_file_name(name)
}

pub fn kvm() -> bool {
    kimberley_vmm::kvm_for_tests()
}

pub fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

pub const INSTALL: &str = "fill app 12M 1 text
fill lib 4M 2 random
fill hot 8M 3 random
fill small 1M 4 random
disk-write 0 1M 5
counter start
";

/// Runs a script on a control socket; returns its output lines.
pub fn exec(sock: &Path, script: &str) -> Vec<String> {
    let mut s = UnixStream::connect(sock).unwrap_or_else(|e| panic!("{}: {e}", sock.display()));
    let req = serde_json::json!({"cmd": "exec", "script": script, "timeout_ms": 30000});
    writeln!(s, "{req}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["status"], 0, "{v}");
    v["output"]
        .as_str()
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

pub fn value(lines: &[String], what: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(what).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {what:?} in {lines:?}"))
}

pub const CHECK: &str =
    "sleep 20\ncounter\nchecksum app\nchecksum lib\nchecksum small\ndisk-checksum 0 1M\n";

pub struct Guest {
    pub counter: u64,
    pub sums: Vec<String>,
}

pub fn look(sock: &Path) -> Guest {
    let l = exec(sock, CHECK);
    Guest {
        counter: value(&l, "counter").parse().unwrap(),
        sums: [
            "checksum app",
            "checksum lib",
            "checksum small",
            "disk-checksum 0 1M",
        ]
        .iter()
        .map(|w| value(&l, w))
        .collect(),
    }
}

/// Waits until the control socket accepts connections (the socket file
/// appears at bind(2), a moment before listen(2)).
pub fn wait_for(p: &Path) {
    let t = Instant::now();
    while UnixStream::connect(p).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "{} never appeared",
            p.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Proc(pub Child);

/// Builds (once per test binary) a key and a launch VM with INSTALL run in
/// it, under a directory that lives as long as the process.
fn template() -> &'static Path {
    static T: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        ok(Command::new(bin("kimberlize"))
            .args(["keygen", "-o"])
            .arg(p("key"))
            .output()
            .unwrap());
        ok(Command::new(bin("kimberlize"))
            .args(["base", "--memory", "64M", "--disk", "16M", "-o"])
            .arg(p("base"))
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
            .arg("--launch-out")
            .arg(p("vm"))
            .output()
            .unwrap());
        t
    })
    .path()
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub struct Setup {
    pub t: tempfile::TempDir,
    pub key: PathBuf,
    pub src: Proc,
    pub src_sock: PathBuf,
}

impl Setup {
    /// A running source VM (64 MiB, a disk) with the regions of INSTALL
    /// and `extra` run in it.
    pub fn new(extra: &str) -> Setup {
        let t = tempfile::tempdir().unwrap();
        let p = |n: &str| t.path().join(n);
        // One launch VM per test binary, copied (holes kept) per test.
        let tpl = template();
        std::fs::copy(tpl.join("key"), p("key")).unwrap();
        ok(Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(tpl.join("vm"))
            .arg(p("vm"))
            .output()
            .unwrap());
        let src_sock = p("src.sock");
        let src = Proc(
            Command::new(bin("vmigrate"))
                .arg("run")
                .arg(p("vm"))
                .arg("--control")
                .arg(&src_sock)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        wait_for(&src_sock);
        if !extra.is_empty() {
            exec(&src_sock, extra);
        }
        Setup {
            key: p("key"),
            t,
            src,
            src_sock,
        }
    }

    pub fn p(&self, n: &str) -> PathBuf {
        self.t.path().join(n)
    }

    /// Starts a receiver; returns it and its address.
    pub fn recv(&self, key: &Path, out: &str) -> (Proc, String) {
        let (p, a, _) = self.recv_with(key, out, &[]);
        (p, a)
    }

    /// Starts a receiver with extra arguments; returns it, its address and
    /// its stderr lines as they arrive.
    pub fn recv_with(
        &self,
        key: &Path,
        out: &str,
        extra: &[&std::ffi::OsStr],
    ) -> (Proc, String, Arc<Mutex<Vec<String>>>) {
        let mut c = Command::new(bin("vmigrate"))
            .args(["recv", "--listen", "127.0.0.1:0", "-k"])
            .arg(key)
            .arg("-o")
            .arg(self.p(out))
            .arg("--control")
            .arg(self.p(&format!("{out}.sock")))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = c.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(a) = l.strip_prefix("vmigrate: waiting for a migration on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(a.to_string());
                    }
                }
                eprintln!("[recv] {l}");
                log2.lock().unwrap().push(l);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("receiver address");
        (Proc(c), addr, log)
    }

    pub fn send(&self, to: &str, extra: &[&str]) -> Output {
        let o = Command::new(bin("vmigrate"))
            .arg("send")
            .arg("--control")
            .arg(&self.src_sock)
            .args(["--to", to, "-k"])
            .arg(&self.key)
            .arg("--stats-json")
            .arg(self.p("stats.json"))
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        eprintln!("[send] {}", String::from_utf8_lossy(&o.stderr));
        o
    }

    pub fn stats(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.p("stats.json")).unwrap()).unwrap()
    }

    /// The source exits 0 after a successful migration.
    pub fn source_exits(&mut self) {
        let t = Instant::now();
        loop {
            if let Some(s) = self.src.0.try_wait().unwrap() {
                assert!(s.success(), "source exited with {s}");
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "the source did not exit"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// After a failed migration the source runs on, intact.
    pub fn source_intact(&mut self, before: &Guest) {
        assert!(
            self.src.0.try_wait().unwrap().is_none(),
            "the source VM process died"
        );
        let after = look(&self.src_sock);
        assert_eq!(after.sums, before.sums);
        assert!(after.counter > before.counter, "counter did not advance");
    }
}

/// Migrates and checks the guest on the destination.
pub fn migrate_ok(s: &mut Setup, extra: &[&str]) -> serde_json::Value {
    migrate_ok_with(s, extra, &[])
}

/// [`migrate_ok`] with extra receiver arguments.
pub fn migrate_ok_with(
    s: &mut Setup,
    extra: &[&str],
    recv_extra: &[&std::ffi::OsStr],
) -> serde_json::Value {
    let before = look(&s.src_sock);
    let (_dst, addr, _) = s.recv_with(&s.key.clone(), "dst", recv_extra);
    let o = s.send(&addr, extra);
    ok(o);
    s.source_exits();
    let dst_sock = s.p("dst.sock");
    wait_for(&dst_sock);
    let after = look(&dst_sock);
    assert_eq!(after.sums, before.sums, "checksums differ after migration");
    assert!(
        after.counter > before.counter,
        "the counter did not continue"
    );
    // The received VM is a normal VM directory that suspends cleanly.
    let mut c = UnixStream::connect(&dst_sock).unwrap();
    writeln!(c, "{{\"cmd\":\"stop\"}}").unwrap();
    let mut l = String::new();
    BufReader::new(c).read_line(&mut l).unwrap();
    assert!(l.contains("stopped"), "{l}");
    let st = s.stats();
    for k in [
        "total_ms",
        "downtime_ms",
        "bytes_on_wire",
        "rounds",
        "throttled",
        "per_round",
        "downtime_parts",
    ] {
        assert!(st.get(k).is_some(), "stats lack {k}: {st}");
    }
    st
}
