//! The control socket of `vmigrate run` and `vmigrate recv` (after a real
//! migration), through real processes on real KVM: every request,
//! snapshots that resume, SIGTERM/SIGINT during a script, the socket's
//! permissions and location, binding over a live socket, and bounded
//! clients. With KIMBERLEY_REQUIRE_KVM=1 these fail instead of skipping
//! when /dev/kvm is missing.

mod common;

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::ctl::{self, Foreign};
use common::tools::{check_snapshot_resumes, dir_with_mode, STATE};
use common::*;
use kimberley_formats::vmdir::VmDir;
use serde_json::json;

/// A fresh suspended VM directory (32 MiB, a 4 MiB disk).
fn base(t: &Path, name: &str) -> PathBuf {
    let p = t.join(name);
    make_base(&p, "32M", "4M");
    p
}

/// A fresh VM `vm` in a new directory, run on the socket `vm.sock`.
struct Running {
    // Declared first: the process ends before its directory goes.
    p: Logged,
    vm: PathBuf,
    sock: PathBuf,
    t: tempfile::TempDir,
}

fn running() -> Running {
    let t = tempfile::tempdir().unwrap();
    let vm = base(t.path(), "vm");
    let sock = t.path().join("vm.sock");
    let p = run_vm(&vm, &sock);
    Running { p, vm, sock, t }
}

/// Memory, disk and a running counter that [`STATE`] looks at.
const PREPARE: &str = "fill app 4M 1 random\ndisk-write 0 64K 3\ncounter start\n";

/// Runs [`PREPARE`] in the VM on `sock`; returns the [`STATE`] after it.
fn prepare(sock: &Path) -> Vec<String> {
    let mut c = Client::connect(sock);
    c.exec_ok(PREPARE);
    c.exec_ok(STATE)
}

/// A key and a fresh VM run as the source of a migration, in `t`.
struct Source {
    p: Logged,
    key: PathBuf,
    vm: PathBuf,
    sock: PathBuf,
}

fn source(t: &Path) -> Source {
    let key = t.join("key");
    keygen(&key);
    let vm = base(t, "vm");
    let sock = t.join("src.sock");
    let p = run_vm(&vm, &sock);
    Source { p, key, vm, sock }
}

/// A receiver for `key` writing `dst` in `t`; returns it and its address.
fn dst_receiver(t: &Path, key: &Path) -> (Logged, String) {
    receiver(key, &t.join("dst"), &[], Duration::from_secs(60))
}

/// Every request through `vmigrate run`'s socket; the snapshot resumes.
#[test]
fn every_request_through_vmigrate_run() {
    if !kvm() {
        return;
    }
    let mut r = running();
    let before = prepare(&r.sock);
    let snap = r.t.path().join("snap");
    ctl::check_every_request(&r.sock, &snap, true);
    // Change the guest after the snapshot: the snapshot must not see it.
    Client::connect(&r.sock).exec_ok("fill app 4M 9 random\ndisk-write 0 64K 8\n");
    stop(&mut r.p, &r.sock);
    VmDir::open(&r.vm).unwrap().verify().unwrap();
    check_snapshot_resumes(r.t.path(), &snap, &before);
}

/// Every request through `vmigrate recv`'s socket after a real migration.
#[test]
fn every_request_through_vmigrate_recv() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n);
    let mut src = source(t.path());
    let before = prepare(&src.sock);
    let dst_sock = p("dst.sock");
    let (mut dst, addr) = dst_receiver(t.path(), &src.key);
    ok(send_cmd(&src.sock, &addr, &src.key).output().unwrap());
    assert!(src.p.wait_exit(Duration::from_secs(30)).success());
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
    let mut r = running();
    let (p, vm, sock) = (&mut r.p, r.vm.clone(), r.sock.clone());
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
    std::fs::set_permissions(t.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let d = dir_with_mode(t.path(), "d", 0o777);
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
    let mut p = Logged::spawn(umask0(&mut run_cmd(&vm, Some(&sock))), "run");
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
    let xdg = dir_with_mode(t.path(), "xdg", 0o700);
    let mut cmd = run_cmd(&vm, None);
    cmd.env("XDG_RUNTIME_DIR", &xdg);
    let mut p = Logged::spawn(umask0(&mut cmd), "run");
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
        let mut p = Logged::spawn(umask0(&mut cmd), "run");
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
fn socket_of(p: &Logged) -> PathBuf {
    let l = p.line_starting("VM running; control socket ", Duration::from_secs(60));
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
    let mut b = Logged::spawn(&mut run_cmd(&vm2, Some(&sock)), "second");
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
    let mut r = running();
    let (p, sock) = (&mut r.p, r.sock.clone());
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
    stop(p, &sock);
}

/// A request line longer than the limit is refused with one error line.
#[test]
fn overlong_request_is_refused() {
    if !kvm() {
        return;
    }
    let mut r = running();
    let (p, sock) = (&mut r.p, r.sock.clone());
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let big = vec![b' '; 4 << 20];
    let _ = s.write_all(&big);
    let mut c = Client::from(s);
    let r = c.answer();
    assert_eq!(r["ok"], false, "{r}");
    assert!(r["error"].as_str().unwrap().contains("longer than"), "{r}");
    stop(p, &sock);
}

/// SIGTERM to the source's process during a migration cancels it: the
/// guest is suspended into its VMDIR intact, the receiver keeps nothing.
#[test]
fn sigterm_during_a_migration_cancels_it() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let Source {
        p: mut src,
        key,
        vm,
        sock: src_sock,
    } = source(t.path());
    let sum = Client::connect(&src_sock).exec_ok("fill big 12M 1 random\nchecksum big\n");
    let (mut dst, addr) = dst_receiver(t.path(), &key);
    let mut send = send_cmd(&src_sock, &addr, &key);
    send.args(["--max-bandwidth", "2M"]);
    let send = std::thread::spawn(move || send.output().unwrap());
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
    assert!(!t.path().join("dst").exists());
    VmDir::open(&vm).unwrap().verify().unwrap();
    let mut again = run_vm(&vm, &src_sock);
    let now = Client::connect(&src_sock).exec_ok("checksum big\n");
    assert_eq!(now, sum);
    stop(&mut again, &src_sock);
}
