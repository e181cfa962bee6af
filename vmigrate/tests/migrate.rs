//! Live migration end to end on real KVM: two processes on loopback
//! (`vmigrate run` as the source, `vmigrate recv` as the destination),
//! correctness shown through the guest, and the failure cases that must
//! leave the source guest running and intact. With KIMBERLEY_REQUIRE_KVM=1
//! these tests fail instead of skipping when /dev/kvm is missing.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmigrate")).with_file_name(name)
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

const INSTALL: &str = "fill app 12M 1 text
fill lib 4M 2 random
fill hot 8M 3 random
fill small 1M 4 random
disk-write 0 1M 5
counter start
";

/// Runs a script on a control socket; returns its output lines.
fn exec(sock: &Path, script: &str) -> Vec<String> {
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

fn value(lines: &[String], what: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(what).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {what:?} in {lines:?}"))
}

const CHECK: &str =
    "sleep 20\ncounter\nchecksum app\nchecksum lib\nchecksum small\ndisk-checksum 0 1M\n";

struct Guest {
    counter: u64,
    sums: Vec<String>,
}

fn look(sock: &Path) -> Guest {
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
fn wait_for(p: &Path) {
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

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Setup {
    t: tempfile::TempDir,
    key: PathBuf,
    src: Proc,
    src_sock: PathBuf,
}

impl Setup {
    /// A running source VM (64 MiB, a disk) with the regions of INSTALL
    /// and `extra` run in it.
    fn new(extra: &str) -> Setup {
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

    fn p(&self, n: &str) -> PathBuf {
        self.t.path().join(n)
    }

    /// Starts a receiver; returns it and its address.
    fn recv(&self, key: &Path, out: &str) -> (Proc, String) {
        let mut c = Command::new(bin("vmigrate"))
            .args(["recv", "--listen", "127.0.0.1:0", "-k"])
            .arg(key)
            .arg("-o")
            .arg(self.p(out))
            .arg("--control")
            .arg(self.p(&format!("{out}.sock")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = c.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                if let Some(a) = l.strip_prefix("vmigrate: waiting for a migration on ") {
                    if let Some(tx) = tx.take() {
                        let _ = tx.send(a.to_string());
                    }
                }
                eprintln!("[recv] {l}");
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("receiver address");
        (Proc(c), addr)
    }

    fn send(&self, to: &str, extra: &[&str]) -> Output {
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

    fn stats(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.p("stats.json")).unwrap()).unwrap()
    }

    /// The source exits 0 after a successful migration.
    fn source_exits(&mut self) {
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
    fn source_intact(&mut self, before: &Guest) {
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
fn migrate_ok(s: &mut Setup, extra: &[&str]) -> serde_json::Value {
    let before = look(&s.src_sock);
    let (_dst, addr) = s.recv(&s.key.clone(), "dst");
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

#[test]
fn idle_guest() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("");
    let st = migrate_ok(&mut s, &[]);
    assert_eq!(st["throttled"], false);
    let r0 = &st["per_round"][0];
    assert!(r0["zero_pages"].as_u64().unwrap() > 1000, "{r0}");
    // Zero pages never travel as 4 KiB: 64 MiB in well under 30 MiB.
    assert!(st["bytes_on_wire"].as_u64().unwrap() < 30 << 20, "{st}");
}

#[test]
fn shared_disk_is_not_copied() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("disk-write 2M 1M 7\n");
    let st = migrate_ok(&mut s, &["--shared-disk"]);
    let blocks: u64 = st["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["disk_blocks"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(blocks, 0, "a shared disk travelled: {st}");
    // Both hosts see the same file: here, the same inode.
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(s.p("vm").join("disk0.raw")).unwrap();
    let b = std::fs::metadata(s.p("dst").join("disk0.raw")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
}

#[test]
fn dirtying_guest() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("dirty hot 4M\n");
    let st = migrate_ok(&mut s, &["--max-bandwidth", "40M"]);
    assert!(st["rounds"].as_u64().unwrap() >= 2, "{st}");
}

#[test]
fn fast_dirtier_converges_by_throttling() {
    if !kvm() {
        return;
    }
    // The guest dirties its 8 MiB hot region at twice what the link
    // carries; the test guest's `dirty` job drops work missed while its
    // vCPU is throttled (like a CPU-bound workload), so throttling must
    // bring the migration to convergence.
    let mut s = Setup::new("dirty hot 16M\n");
    let st = migrate_ok(&mut s, &["--max-bandwidth", "8M", "--downtime-ms", "100"]);
    assert_eq!(st["throttled"], true, "{st}");
    assert!(st["max_throttle_pct"].as_u64().unwrap() >= 20, "{st}");
    assert_eq!(st["stop_reason"], "converged", "{st}");
}

#[test]
fn receiver_killed_mid_round() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("");
    let before = look(&s.src_sock);
    let (mut dst, addr) = s.recv(&s.key.clone(), "dst");
    let t = std::thread::spawn({
        let sock = s.src_sock.clone();
        let key = s.key.clone();
        move || {
            Command::new(bin("vmigrate"))
                .arg("send")
                .arg("--control")
                .arg(sock)
                .args(["--to", &addr, "--max-bandwidth", "2M", "-k"])
                .arg(key)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    dst.0.kill().unwrap();
    let o = t.join().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("keeps running on the source"));
    s.source_intact(&before);
    assert!(!s.p("dst").exists());
}

#[test]
fn wrong_key() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("");
    let before = look(&s.src_sock);
    let other = s.p("other.key");
    ok(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(&other)
        .output()
        .unwrap());
    let (_dst, addr) = s.recv(&other, "dst");
    let o = s.send(&addr, &[]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("authentication failed"));
    s.source_intact(&before);
    assert!(!s.p("dst").exists());
}

/// A proxy that forwards both ways but cuts the connection instead of
/// forwarding the receiver's first frame of type `cut_type` (frame headers
/// are cleartext; the handshake is 80 bytes from the receiver).
fn cutting_proxy(to: String, cut_type: u8) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        let (a, _) = l.accept().unwrap();
        let b = TcpStream::connect(to).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut a2, &mut b2);
        });
        let (mut a, mut b) = (a, b);
        let mut hs = [0u8; 80];
        if b.read_exact(&mut hs).is_err() || a.write_all(&hs).is_err() {
            return;
        }
        loop {
            let mut h = [0u8; 8];
            if b.read_exact(&mut h).is_err() {
                return;
            }
            if h[0] == cut_type {
                let _ = a.shutdown(std::net::Shutdown::Both);
                let _ = b.shutdown(std::net::Shutdown::Both);
                return;
            }
            let n = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
            let mut body = vec![0u8; n];
            if b.read_exact(&mut body).is_err()
                || a.write_all(&h).is_err()
                || a.write_all(&body).is_err()
            {
                return;
            }
        }
    });
    addr
}

#[test]
fn connection_cut_during_stop_and_copy() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("dirty hot 1M\n");
    let before = look(&s.src_sock);
    let (mut dst, addr) = s.recv(&s.key.clone(), "dst");
    // Cut exactly when the destination reports the guest running: the
    // source never hears it, so it must resume, and the destination, which
    // never hears DONE, must discard its copy.
    let proxy = cutting_proxy(addr, 16);
    let o = s.send(&proxy, &[]);
    assert!(!o.status.success());
    s.source_intact(&before);
    let st = dst.0.wait().unwrap();
    assert!(!st.success(), "the receiver kept a copy");
    assert!(!s.p("dst").exists());
}
