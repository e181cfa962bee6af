//! The control socket of `vmigrate run` and `vmigrate recv` (after a real
//! migration), through real processes on real KVM: every request,
//! snapshots that resume, SIGTERM/SIGINT during a script, the socket's
//! permissions and location, binding over a live socket, and bounded
//! clients. With KIMBERLEY_REQUIRE_KVM=1 these fail instead of skipping
//! when /dev/kvm is missing.

#[path = "../../vmm/tests/common/ctl.rs"]
mod ctl;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use ctl::{value, Client, Foreign};
use kimberley_formats::vmdir::VmDir;
use serde_json::json;

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

/// A child process whose stderr is collected (and echoed); killed on drop.
struct Proc {
    child: Child,
    err: Arc<Mutex<Vec<String>>>,
    lines: mpsc::Receiver<String>,
}

impl Proc {
    fn spawn(cmd: &mut Command, tag: &str) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let err = Arc::new(Mutex::new(Vec::new()));
        let (tx, lines) = mpsc::channel();
        let (e, tag) = (err.clone(), tag.to_string());
        std::thread::spawn(move || {
            for l in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{tag}] {l}");
                e.lock().unwrap().push(l.clone());
                let _ = tx.send(l);
            }
        });
        Proc { child, err, lines }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stderr(&self) -> String {
        self.err.lock().unwrap().join("\n")
    }

    /// The first stderr line starting with `prefix`, waiting up to 60 s.
    fn line_starting(&self, prefix: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(l) = self
                .err
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return l.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(!left.is_zero(), "no line {prefix:?} in {}", self.stderr());
            let _ = self
                .lines
                .recv_timeout(left.min(Duration::from_millis(100)));
        }
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let t = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
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

    fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    fn rss_kib(&self) -> u64 {
        let s = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        let l = s.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        l.split_whitespace().nth(1).unwrap().parse().unwrap()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fresh suspended VM directory (32 MiB, a 4 MiB disk).
fn base(t: &Path, name: &str) -> PathBuf {
    let p = t.join(name);
    ok(Command::new(bin("kimberlize"))
        .args(["base", "--memory", "32M", "--disk", "4M", "-o"])
        .arg(&p)
        .stdin(Stdio::null())
        .output()
        .unwrap());
    p
}

fn run_cmd(vmdir: &Path, sock: Option<&Path>) -> Command {
    let mut c = Command::new(bin("vmigrate"));
    c.arg("run").arg(vmdir);
    if let Some(s) = sock {
        c.arg("--control").arg(s);
    }
    c
}

fn run_vm(vmdir: &Path, sock: &Path) -> Proc {
    let p = Proc::spawn(&mut run_cmd(vmdir, Some(sock)), "run");
    drop(Client::connect(sock));
    p
}

/// Stops the VM through its socket; the process exits 0 and removes it.
fn stop(p: &mut Proc, sock: &Path) {
    let r = Client::connect(sock).call(r#"{"cmd":"stop"}"#);
    assert_eq!(r, json!({"ok": true, "status": "stopped"}));
    let st = p.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st}: {}", p.stderr());
    assert!(!sock.exists(), "the socket file was left behind");
}

const STATE: &str = "sleep 20\ncounter\nchecksum app\ndisk-checksum 0 64K\n";

fn check_snapshot_resumes(t: &Path, snap: &Path, at_snapshot: &[String]) {
    VmDir::open(snap).unwrap().verify().unwrap();
    let sock = t.join("snap.sock");
    let mut p = run_vm(snap, &sock);
    let now = Client::connect(&sock).exec_ok(STATE);
    for w in ["checksum app", "disk-checksum 0 64K"] {
        assert_eq!(value(&now, w), value(at_snapshot, w), "{w}");
    }
    let c0: u64 = value(at_snapshot, "counter").parse().unwrap();
    let c1: u64 = value(&now, "counter").parse().unwrap();
    assert!(c1 > c0, "the counter went from {c0} to {c1}");
    stop(&mut p, &sock);
}

/// Every request through `vmigrate run`'s socket; the snapshot resumes.
#[test]
fn every_request_through_vmigrate_run() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm = base(t.path(), "vm");
    let sock = t.path().join("vm.sock");
    let mut p = run_vm(&vm, &sock);
    let mut c = Client::connect(&sock);
    c.exec_ok("fill app 4M 1 random\ndisk-write 0 64K 3\ncounter start\n");
    let before = c.exec_ok(STATE);
    let snap = t.path().join("snap");
    ctl::check_every_request(&sock, &snap, true);
    // Change the guest after the snapshot: the snapshot must not see it.
    c.exec_ok("fill app 4M 9 random\ndisk-write 0 64K 8\n");
    drop(c);
    stop(&mut p, &sock);
    VmDir::open(&vm).unwrap().verify().unwrap();
    check_snapshot_resumes(t.path(), &snap, &before);
}

/// Every request through `vmigrate recv`'s socket after a real migration.
#[test]
fn every_request_through_vmigrate_recv() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n);
    ok(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(p("key"))
        .output()
        .unwrap());
    let vm = base(t.path(), "vm");
    let src_sock = p("src.sock");
    let mut src = run_vm(&vm, &src_sock);
    let mut c = Client::connect(&src_sock);
    c.exec_ok("fill app 4M 1 random\ndisk-write 0 64K 3\ncounter start\n");
    let before = c.exec_ok(STATE);
    drop(c);
    let dst_sock = p("dst.sock");
    let dst = Proc::spawn(
        Command::new(bin("vmigrate"))
            .args(["recv", "--listen", "127.0.0.1:0", "-k"])
            .arg(p("key"))
            .arg("-o")
            .arg(p("dst"))
            .arg("--control")
            .arg(&dst_sock),
        "recv",
    );
    let addr = dst
        .line_starting("vmigrate: waiting for a migration on ")
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let o = Command::new(bin("vmigrate"))
        .arg("send")
        .arg("--control")
        .arg(&src_sock)
        .args(["--to", &addr, "-k"])
        .arg(p("key"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    ok(o);
    assert!(src.wait_exit(Duration::from_secs(30)).success());
    let mut dst = dst;
    let after = Client::connect(&dst_sock).exec_ok(STATE);
    assert_eq!(
        value(&after, "checksum app"),
        value(&before, "checksum app")
    );
    let snap = p("snap");
    ctl::check_every_request(&dst_sock, &snap, true);
    stop(&mut dst, &dst_sock);
    VmDir::open(&p("dst")).unwrap().verify().unwrap();
    check_snapshot_resumes(t.path(), &snap, &after);
}

/// SIGTERM or SIGINT while a script runs (a long `sleep`, a hung guest):
/// the client is told, the VM is suspended within a second or so, and the
/// process exits 0. With `resume`, the VM is run again and answers a new
/// script correctly (once the cut-short one, still running, has ended).
fn interrupted(script: &str, sig: libc::c_int, resume: bool) {
    let t = tempfile::tempdir().unwrap();
    let vm = base(t.path(), "vm");
    let sock = t.path().join("vm.sock");
    let mut p = run_vm(&vm, &sock);
    Client::connect(&sock).exec_ok("counter start\n");
    let (s2, script) = (sock.clone(), script.to_string());
    let client = std::thread::spawn(move || {
        Client::connect(&s2).call_json(json!({"cmd": "exec", "script": script}))
    });
    std::thread::sleep(Duration::from_millis(500));
    let t0 = Instant::now();
    p.signal(sig);
    let st = p.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(st.success(), "{st}: {}", p.stderr());
    assert!(
        took < Duration::from_secs(3),
        "suspending took {took:?} after the signal"
    );
    let r = client.join().unwrap();
    assert_eq!(r["ok"], false, "{r}");
    assert!(
        r["error"].as_str().unwrap().starts_with("interrupted"),
        "{r}"
    );
    assert!(p.stderr().contains("suspended"), "{}", p.stderr());
    VmDir::open(&vm).unwrap().verify().unwrap();
    if resume {
        let mut p = run_vm(&vm, &sock);
        assert_eq!(Client::connect(&sock).exec_ok("print fresh"), ["fresh"]);
        stop(&mut p, &sock);
    }
}

#[test]
fn sigterm_during_a_long_script_suspends() {
    if kvm() {
        interrupted("sleep 15000\n", libc::SIGTERM, false);
    }
}

#[test]
fn sigint_with_a_hung_guest_suspends() {
    if kvm() {
        interrupted("debug-hang\n", libc::SIGINT, false);
    }
}

#[test]
fn sigterm_during_a_script_then_resume() {
    if kvm() {
        // Resumed, the rest of this script still runs: the new script is
        // sent while it sleeps again and must not get its output.
        interrupted(
            "sleep 1000\nprint x\nsleep 1000\nprint stale\n",
            libc::SIGTERM,
            true,
        );
    }
}

/// File type and permission bits.
fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode()
}

/// Runs the command with umask 000.
fn umask0(c: &mut Command) -> &mut Command {
    // SAFETY: umask(2) is async-signal-safe.
    unsafe {
        c.pre_exec(|| {
            libc::umask(0);
            Ok(())
        })
    }
}

/// With umask 000 a `--control` socket is still 0600 from the moment it
/// appears, and another uid cannot use it.
#[test]
fn given_socket_is_private_under_umask_000() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm = base(t.path(), "vm");
    let d = t.path().join("d");
    std::fs::create_dir(&d).unwrap();
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777)).unwrap();
    let sock = d.join("ctl.sock");
    // Watch for the socket: the first mode seen is the one that matters.
    let done = Arc::new(AtomicBool::new(false));
    let (s2, d2) = (sock.clone(), done.clone());
    let watcher = std::thread::spawn(move || {
        while !d2.load(Ordering::SeqCst) {
            if let Ok(m) = std::fs::symlink_metadata(&s2) {
                return Some(m.mode());
            }
            std::thread::yield_now();
        }
        None
    });
    let mut p = Proc::spawn(umask0(&mut run_cmd(&vm, Some(&sock))), "run");
    drop(Client::connect(&sock));
    done.store(true, Ordering::SeqCst);
    assert_eq!(watcher.join().unwrap(), Some(0o140600));
    assert_eq!(mode(&sock), 0o140600);
    match ctl::status_as(&sock, 65534, 65534) {
        Foreign::Answered(a) => panic!("another uid used the socket: {a}"),
        f => eprintln!("another uid: {f:?}"),
    }
    stop(&mut p, &sock);
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        0,
        "leftovers in {d:?}"
    );
}

/// The default socket lives in a private directory under
/// `$XDG_RUNTIME_DIR` (or `/run` for root), never in /tmp.
#[test]
fn default_socket_is_private_and_not_in_tmp() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm = base(t.path(), "vm");
    let xdg = t.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    std::fs::set_permissions(&xdg, std::fs::Permissions::from_mode(0o700)).unwrap();
    let mut cmd = run_cmd(&vm, None);
    cmd.env("XDG_RUNTIME_DIR", &xdg);
    let mut p = Proc::spawn(umask0(&mut cmd), "run");
    let sock = socket_of(&p);
    assert_eq!(
        sock,
        xdg.join("kimberley")
            .join(format!("vmigrate-{}.sock", p.pid()))
    );
    assert_eq!(mode(&xdg.join("kimberley")), 0o40700);
    assert_eq!(mode(&sock), 0o140600);
    // The private directory keeps another uid from even reaching it.
    assert_eq!(
        ctl::status_as(&sock, 65534, 65534),
        Foreign::ConnectFailed(libc::EACCES)
    );
    stop(&mut p, &sock);

    // Root without XDG_RUNTIME_DIR: /run/kimberley.
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        let mut cmd = run_cmd(&vm, None);
        cmd.env_remove("XDG_RUNTIME_DIR");
        let mut p = Proc::spawn(umask0(&mut cmd), "run");
        let sock = socket_of(&p);
        assert_eq!(
            sock,
            Path::new("/run/kimberley").join(format!("vmigrate-{}.sock", p.pid()))
        );
        assert_eq!(mode(Path::new("/run/kimberley")) & 0o077, 0);
        assert_eq!(mode(&sock), 0o140600);
        stop(&mut p, &sock);
    }
}

/// The socket path printed on stderr.
fn socket_of(p: &Proc) -> PathBuf {
    let l = p.line_starting("VM running; control socket ");
    let rest = l.strip_prefix("VM running; control socket ").unwrap();
    let path = PathBuf::from(rest.split(" (").next().unwrap());
    drop(Client::connect(&path));
    path
}

/// Binding over another live VM's socket is refused; that VM still answers.
#[test]
fn binding_over_a_live_socket_is_refused() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm1 = base(t.path(), "vm1");
    let vm2 = base(t.path(), "vm2");
    let sock = t.path().join("vm.sock");
    let mut a = run_vm(&vm1, &sock);
    let ino = std::fs::metadata(&sock).unwrap().ino();
    let mut b = Proc::spawn(&mut run_cmd(&vm2, Some(&sock)), "second");
    let st = b.wait_exit(Duration::from_secs(30));
    assert!(!st.success());
    assert!(
        b.stderr().contains("another process serves"),
        "{}",
        b.stderr()
    );
    assert_eq!(std::fs::metadata(&sock).unwrap().ino(), ino);
    let st = Client::connect(&sock).call(r#"{"cmd":"status"}"#);
    assert_eq!(st["ok"], true);
    assert!(st["disks"][0].as_str().unwrap().contains("vm1"), "{st}");
    stop(&mut a, &sock);
}

/// Many clients, idle or holding partial requests, and one streaming an
/// endless line: memory stays bounded and `status` stays fast.
#[test]
fn control_clients_are_bounded() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm = base(t.path(), "vm");
    let sock = t.path().join("vm.sock");
    let mut p = run_vm(&vm, &sock);
    Client::connect(&sock).exec_ok("print warm\n");
    let status_ms = || {
        let t0 = Instant::now();
        let r = Client::connect(&sock).call(r#"{"cmd":"status"}"#);
        assert_eq!(r["ok"], true, "{r}");
        t0.elapsed()
    };
    status_ms();
    let rss0 = p.rss_kib();

    // 40 idle clients.
    let idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    for _ in 0..5 {
        let l = status_ms();
        assert!(l < Duration::from_millis(300), "status took {l:?}");
    }
    drop(idle);

    // 40 clients each sending 8 MiB of one unfinished line, then waiting,
    // and one client streaming an endless line.
    let stop_flag = Arc::new(AtomicBool::new(false));
    let mut threads = Vec::new();
    for i in 0..41 {
        let (s, stop_flag) = (sock.clone(), stop_flag.clone());
        threads.push(std::thread::spawn(move || {
            let Ok(mut c) = UnixStream::connect(&s) else {
                return;
            };
            c.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
            let chunk = vec![b'a'; 64 << 10];
            let mut sent = 0usize;
            while !stop_flag.load(Ordering::SeqCst) && (i == 40 || sent < 8 << 20) {
                match c.write(&chunk) {
                    Ok(n) => sent += n,
                    Err(_) => break,
                }
            }
            while !stop_flag.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }));
    }
    let mut worst = Duration::ZERO;
    let mut rss = rss0;
    for _ in 0..15 {
        std::thread::sleep(Duration::from_millis(200));
        worst = worst.max(status_ms());
        rss = rss.max(p.rss_kib());
    }
    stop_flag.store(true, Ordering::SeqCst);
    for th in threads {
        th.join().unwrap();
    }
    eprintln!("RSS {rss0} KiB -> {rss} KiB, slowest status {worst:?}");
    assert!(
        rss - rss0 < 64 << 10,
        "RSS grew from {rss0} KiB to {rss} KiB"
    );
    assert!(worst < Duration::from_millis(300), "status took {worst:?}");
    stop(&mut p, &sock);
}

/// A request line longer than the limit is refused with one error line.
#[test]
fn overlong_request_is_refused() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm = base(t.path(), "vm");
    let sock = t.path().join("vm.sock");
    let mut p = run_vm(&vm, &sock);
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let big = vec![b' '; 4 << 20];
    let _ = s.write_all(&big);
    let mut c = Client::from(s);
    let r = c.answer();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");
    stop(&mut p, &sock);
}

/// SIGTERM to the source's process during a migration cancels it: the
/// guest is suspended into its VMDIR intact, the receiver keeps nothing.
#[test]
fn sigterm_during_a_migration_cancels_it() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n);
    ok(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(p("key"))
        .output()
        .unwrap());
    let vm = base(t.path(), "vm");
    let src_sock = p("src.sock");
    let mut src = run_vm(&vm, &src_sock);
    let sum = Client::connect(&src_sock).exec_ok("fill big 12M 1 random\nchecksum big\n");
    let mut dst = Proc::spawn(
        Command::new(bin("vmigrate"))
            .args(["recv", "--listen", "127.0.0.1:0", "-k"])
            .arg(p("key"))
            .arg("-o")
            .arg(p("dst"))
            .arg("--control")
            .arg(p("dst.sock")),
        "recv",
    );
    let addr = dst
        .line_starting("vmigrate: waiting for a migration on ")
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    let (s2, key) = (src_sock.clone(), p("key"));
    let send = std::thread::spawn(move || {
        Command::new(bin("vmigrate"))
            .arg("send")
            .arg("--control")
            .arg(&s2)
            .args(["--to", &addr, "--max-bandwidth", "2M", "-k"])
            .arg(key)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    });
    std::thread::sleep(Duration::from_millis(1500));
    let t0 = Instant::now();
    src.signal(libc::SIGTERM);
    let st = src.wait_exit(Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(st.success(), "{st}: {}", src.stderr());
    // The sender drains its bandwidth-limited queue before it aborts.
    assert!(took < Duration::from_secs(10), "took {took:?}");
    eprintln!("suspended {took:?} after SIGTERM");
    assert!(
        src.stderr().contains("VM suspended into"),
        "{}",
        src.stderr()
    );
    let o = send.join().unwrap();
    assert!(!o.status.success(), "the migration went through");
    assert!(!dst.wait_exit(Duration::from_secs(30)).success());
    assert!(!p("dst").exists());
    VmDir::open(&vm).unwrap().verify().unwrap();
    let mut again = run_vm(&vm, &src_sock);
    let now = Client::connect(&src_sock).exec_ok("checksum big\n");
    assert_eq!(now, sum);
    stop(&mut again, &src_sock);
}
