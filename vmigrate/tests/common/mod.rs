//! Shared by the vmigrate test suites: a running source VM behind its
//! control socket, receivers, senders, and looks into the guest.

#![allow(dead_code)]

#[path = "../../../vmm/tests/common/ctl.rs"]
pub mod ctl;
#[path = "../../../qemu/tests/common/guest.rs"]
pub mod linux_guest;
pub mod proxy;
#[path = "../../../vmm/tests/common/tools.rs"]
pub mod tools;

use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

// What every suite may use; not every suite does.
#[allow(unused_imports)]
pub use ctl::{value, Client};
#[allow(unused_imports)]
pub use tools::{keygen, make_base, ok, stop, Logged, Proc};

pub fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vmigrate")).with_file_name(name)
}

pub fn kvm() -> bool {
    kimberley_vmm::kvm_for_tests()
}

pub const INSTALL: &str = "fill app 12M 1 text
fill lib 4M 2 random
fill hot 8M 3 random
fill small 1M 4 random
disk-write 0 1M 5
counter start
";

/// Runs a script that must succeed on a control socket that is there
/// already (30 s at most); returns its output lines.
pub fn exec(sock: &Path, script: &str) -> Vec<String> {
    Client::open(sock).exec_timeout(script, Some(30000))
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

/// Builds (once per test binary) a key and a launch VM with INSTALL run in
/// it, under a directory that lives as long as the process.
fn template() -> &'static Path {
    static T: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let t = tempfile::tempdir().unwrap();
        let vm = t.path().join("vm");
        let launch_out = [OsStr::new("--launch-out"), vm.as_os_str()];
        tools::build_app(t.path(), "64M", "16M", INSTALL, &launch_out);
        t
    })
    .path()
}

/// `vmigrate run VMDIR`, on the control socket `sock` if given.
pub fn run_cmd(vmdir: &Path, sock: Option<&Path>) -> Command {
    let mut c = Command::new(bin("vmigrate"));
    c.arg("run").arg(vmdir);
    if let Some(s) = sock {
        c.arg("--control").arg(s);
    }
    c
}

/// `vmigrate run` of `vmdir` on `sock`, once the socket answers.
pub fn run_vm(vmdir: &Path, sock: &Path) -> Logged {
    let p = Logged::spawn(&mut run_cmd(vmdir, Some(sock)), "run");
    drop(Client::connect(sock));
    p
}

/// `vmigrate send` of the VM on `src_sock` to `to`.
pub fn send_cmd(src_sock: &Path, to: &str, key: &Path) -> Command {
    let mut c = Command::new(bin("vmigrate"));
    c.arg("send")
        .arg("--control")
        .arg(src_sock)
        .args(["--to", to, "-k"])
        .arg(key)
        .stdin(Stdio::null());
    c
}

const WAITING: &str = "vmigrate: waiting for a migration on ";

/// Starts `vmigrate recv` on loopback writing `out`, with its control
/// socket at `OUT.sock` and `extra` arguments; returns it and its address
/// (printed within `within`).
pub fn receiver(key: &Path, out: &Path, extra: &[&OsStr], within: Duration) -> (Logged, String) {
    receiver_in(Command::new(bin("vmigrate")), key, out, extra, within)
}

/// [`receiver`] with its standard output (where it shows the guest's
/// console) written to the file `stdout`.
pub fn receiver_showing(
    key: &Path,
    out: &Path,
    extra: &[&OsStr],
    within: Duration,
    stdout: &Path,
) -> (Logged, String) {
    let mut sh = Command::new("sh");
    sh.args(["-c", r#"out=$1; shift; exec "$@" > "$out""#, "sh"])
        .arg(stdout)
        .arg(bin("vmigrate"));
    receiver_in(sh, key, out, extra, within)
}

/// [`receiver`] in a mount namespace of its own where directory `over`
/// shows what directory `from` holds (a host whose view of the shared
/// storage differs from the sender's).
pub fn receiver_seeing(
    key: &Path,
    out: &Path,
    extra: &[&OsStr],
    within: Duration,
    (from, over): (&Path, &Path),
) -> (Logged, String) {
    let mut sh = Command::new("unshare");
    sh.args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(r#"mount --bind "$1" "$2" || exit 1; shift 2; exec "$@""#)
        .arg("sh")
        .arg(from)
        .arg(over)
        .arg(bin("vmigrate"));
    receiver_in(sh, key, out, extra, within)
}

fn receiver_in(
    mut cmd: Command,
    key: &Path,
    out: &Path,
    extra: &[&OsStr],
    within: Duration,
) -> (Logged, String) {
    let mut sock = OsString::from(out);
    sock.push(".sock");
    let r = Logged::spawn(
        cmd.args(["recv", "--listen", "127.0.0.1:0", "-k"])
            .arg(key)
            .arg("-o")
            .arg(out)
            .arg("--control")
            .arg(sock)
            .args(extra),
        "recv",
    );
    let addr = r.line_starting(WAITING, within)[WAITING.len()..].to_string();
    (r, addr)
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
            run_cmd(&p("vm"), Some(&src_sock))
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
        let (r, addr) = receiver(key, &self.p(out), extra, Duration::from_secs(10));
        let (p, log) = r.into_parts();
        (p, addr, log)
    }

    pub fn send(&self, to: &str, extra: &[&str]) -> Output {
        let o = send_cmd(&self.src_sock, to, &self.key)
            .arg("--stats-json")
            .arg(self.p("stats.json"))
            .args(extra)
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
