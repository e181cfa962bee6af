//! The control socket on real KVM: the request round trip, strict request
//! parsing, snapshot semantics, interruption by the stop flag, the peer
//! check, and the limits on clients and request size.

mod common;

#[path = "common/ctl.rs"]
mod ctl;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;
use ctl::{Client, Foreign};
use kimberley_formats::vmdir::VmDirWriter;
use kimberley_machine::control::{self, ControlSocket, MAX_CLIENTS, MAX_REQUEST};
use kimberley_machine::Machine;
use kimberley_vmm::{Error, Vm};
use serde_json::{json, Value};

/// A machine the control server serves.
type Boxed = Box<dyn Machine>;
type Server = JoinHandle<kimberley_machine::Result<Boxed>>;

/// Serves `vm` on `sock` with a snapshot hook that suspends it into a new
/// VM directory there.
fn serve(vm: Boxed, sock: &Path, stop: &Arc<AtomicBool>) -> Server {
    let s = ControlSocket::bind(Some(sock), "test").unwrap();
    let stop = stop.clone();
    let snapshot: control::SnapshotFn = Box::new(move |vm, d| {
        assert!(!d.exists(), "the server created {}", d.display());
        let w = VmDirWriter::create(d).map_err(|e| e.to_string())?;
        vm.suspend_into(w, "snap")
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    std::thread::spawn(move || control::serve(vm, s, snapshot, stop, Box::new(|_| {})))
}

/// A fresh 32 MiB VM served on `ctl.sock` in a directory.
struct Served {
    sock: PathBuf,
    stop: Arc<AtomicBool>,
    server: Server,
}

impl Served {
    fn start(dir: &Path) -> Served {
        let sock = dir.join("ctl.sock");
        let stop = Arc::new(AtomicBool::new(false));
        let server = serve(Box::new(boot(32, &[])), &sock, &stop);
        Served { sock, stop, server }
    }

    /// Sets the stop flag; returns the VM the server gives back.
    fn finish(self) -> Boxed {
        self.stop.store(true, Ordering::SeqCst);
        self.server.join().unwrap().unwrap()
    }
}

#[test]
fn control_round_trip() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path());
    let sock = served.sock.clone();

    let mut c = Client::connect(&sock);
    let st = c.call(r#"{"cmd":"status"}"#);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["status"], "running");
    assert_eq!(st["memory_size"], 32 << 20);

    let r =
        c.call(&json!({"cmd":"exec","script":"print one\nprint two\ncounter start"}).to_string());
    assert_eq!(r, json!({"ok": true, "status": 0, "output": "one\ntwo"}));
    let r = c.call(&json!({"cmd":"exec","script":"nonsense"}).to_string());
    assert_eq!(r["ok"], true);
    assert_eq!(r["status"], 1);
    assert_eq!(r["output"], "error 1: unknown command 'nonsense'");

    assert_eq!(c.call(r#"{"cmd":"pause"}"#)["ok"], true);
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "paused");
    let r = c.call(&json!({"cmd":"exec","script":"print x"}).to_string());
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("paused"));
    assert_eq!(c.call(r#"{"cmd":"resume"}"#)["ok"], true);
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "running");

    // Pipelined requests are answered in order.
    c.w.write_all(b"{\"cmd\":\"status\"}\n\n{\"cmd\":\"exec\",\"script\":\"print p\"}\n")
        .unwrap();
    assert_eq!(c.answer()["status"], "running");
    assert_eq!(c.answer()["output"], "p");

    let r = c.call(r#"{"cmd":"migrate","params":{}}"#);
    assert_eq!(r["ok"], false);
    assert!(
        r["error"].as_str().unwrap().contains("cannot migrate"),
        "{r}"
    );

    // A second client works too.
    let mut c2 = Client::connect(&sock);
    assert_eq!(c2.call(r#"{"cmd":"status"}"#)["ok"], true);

    let r = c.call(r#"{"cmd":"stop"}"#);
    assert_eq!(r, json!({"ok": true, "status": "stopped"}));
    let mut vm = served.server.join().unwrap().unwrap();
    assert!(vm.is_paused());
    assert!(!sock.exists());
    vm.resume().unwrap();
    let o = vm.agent().run_script("counter", &mut |_| {}, T).unwrap();
    assert_eq!(o.status, 0);
    assert!(o.lines[0].starts_with("counter "));

    // The stop flag ends the server too; a failing hook's error is passed on.
    let stop = Arc::new(AtomicBool::new(false));
    let s = ControlSocket::bind(Some(&sock), "test").unwrap();
    let s2 = stop.clone();
    let server = std::thread::spawn(move || {
        control::serve(
            vm,
            s,
            Box::new(|_, _| Err("no".into())),
            s2,
            Box::new(|_| {}),
        )
    });
    let mut c = Client::connect(&sock);
    let r = c.call(&json!({"cmd":"snapshot","dir":dir.path().join("s2")}).to_string());
    assert_eq!(r, json!({"ok": false, "error": "no"}));
    stop.store(true, Ordering::SeqCst);
    let vm = server.join().unwrap().unwrap();
    assert!(vm.is_paused());
    assert!(!sock.exists());
}

/// Unknown fields (on every command), unknown commands and wrong types
/// are refused; nothing happens to the VM.
#[test]
fn strict_requests() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path());
    let mut c = Client::connect(&s.sock);
    ctl::check_strict_parsing(&mut c);
    assert!(!dir.path().join("nonexistent").exists());
    s.finish();
}

/// `snapshot` does not create the directory (the hook writes it), and
/// refuses relative paths and existing ones.
#[test]
fn snapshot_semantics() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path());
    let mut c = Client::connect(&s.sock);
    let snap = dir.path().join("snap");
    let r = c.call_json(json!({"cmd": "snapshot", "dir": snap}));
    assert_eq!(r, json!({"ok": true, "dir": snap}));
    assert!(snap.join("memory.raw").exists() && snap.join("state.bin").exists());
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "running");
    for bad in [
        json!("snap2"),
        json!("./snap2"),
        json!(snap),
        json!(dir.path()),
    ] {
        let r = c.call_json(json!({"cmd": "snapshot", "dir": bad}));
        assert_eq!(r["ok"], false, "{bad}: {r}");
    }
    assert!(!Path::new("snap2").exists() && !dir.path().join("snap2").exists());
    // A dangling symlink counts as existing.
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("nowhere"), &link).unwrap();
    let r = c.call_json(json!({"cmd": "snapshot", "dir": link}));
    assert_eq!(r["ok"], false, "{r}");
    assert!(!dir.path().join("nowhere").exists());
    s.finish();
}

/// The stop flag cuts a running `exec` short (a long sleep, a hung guest):
/// its client is told, and the server returns the VM paused at once.
#[test]
fn stop_flag_interrupts_exec() {
    if !kvm_available() {
        return;
    }
    for script in ["sleep 15000", "debug-hang"] {
        let dir = tempfile::tempdir().unwrap();
        let s = Served::start(dir.path());
        let s2 = s.sock.clone();
        let client = std::thread::spawn(move || {
            Client::connect(&s2).call_json(json!({"cmd": "exec", "script": script}))
        });
        std::thread::sleep(Duration::from_millis(300));
        let t0 = Instant::now();
        let vm = s.finish();
        let took = t0.elapsed();
        assert!(took < Duration::from_secs(1), "{script}: took {took:?}");
        assert!(vm.is_paused());
        let r = client.join().unwrap();
        assert_eq!(r["ok"], false, "{r}");
        assert!(
            r["error"].as_str().unwrap().starts_with("interrupted:"),
            "{r}"
        );
    }
}

/// The VM's own waits watch the interrupt flag.
#[test]
fn vm_waits_watch_the_interrupt_flag() {
    if !kvm_available() {
        return;
    }
    let mut vm = boot(32, &[]);
    let flag = Arc::new(AtomicBool::new(false));
    vm.set_interrupt(flag.clone());
    let f2 = flag.clone();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        f2.store(true, Ordering::SeqCst);
    });
    let t0 = Instant::now();
    let r = vm.run_script("sleep 15000", &mut |_| {}, Duration::from_secs(60));
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(1), "{:?}", t0.elapsed());
    setter.join().unwrap();
    // Already set: nothing is sent, every wait returns at once.
    let r = vm.run_script("print x", &mut |_| {}, Duration::from_secs(60));
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    // Pausing still works: it is how a stop takes effect.
    vm.pause().unwrap();
    assert!(vm.is_paused());
    let e = Error::Interrupted.to_string();
    assert!(e.starts_with("interrupted: "), "{e}");
}

/// Another uid that can reach the socket (here: its mode was widened by
/// hand) is refused by the peer check and gets no answer.
#[test]
fn other_uids_are_refused() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let s = Served::start(dir.path());
    let sock = s.sock.clone();
    drop(Client::connect(&sock));
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        // As created: 0600, so the kernel refuses another uid already.
        assert_eq!(
            ctl::status_as(&sock, 65534, 65534),
            Foreign::ConnectFailed(libc::EACCES)
        );
        std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(ctl::status_as(&sock, 65534, 65534), Foreign::Closed);
        // Our own uid (and root) still get answers.
        assert_eq!(
            Client::connect(&sock).call(r#"{"cmd":"status"}"#)["ok"],
            true
        );
    } else {
        eprintln!("not root: cannot connect as another uid");
    }
    s.finish();
}

/// Binding where a VM serves is refused and that VM keeps its socket; a
/// stale socket is replaced; anything else is refused and kept.
#[test]
fn binding_probes_what_is_there() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let s = Served::start(dir.path());
    let sock = s.sock.clone();
    drop(Client::connect(&sock));
    let e = ControlSocket::bind(Some(&sock), "test").unwrap_err();
    assert!(e.to_string().contains("another process serves"), "{e}");
    assert_eq!(
        Client::connect(&sock).call(r#"{"cmd":"status"}"#)["ok"],
        true
    );
    s.finish();

    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let s = ControlSocket::bind(Some(&sock), "test").unwrap();
    assert_eq!(s.path(), sock);
    drop(s);
    std::fs::write(&sock, "data").unwrap();
    let e = ControlSocket::bind(Some(&sock), "test").unwrap_err();
    assert!(e.to_string().contains("not a socket"), "{e}");
    assert_eq!(std::fs::read(&sock).unwrap(), b"data");
}

fn read_all(s: &mut UnixStream) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut v = Vec::new();
    let _ = s.read_to_end(&mut v);
    v
}

/// At most MAX_CLIENTS clients: the one idle longest is told and closed;
/// a request line longer than MAX_REQUEST is refused; a script as long as
/// a real one fits.
#[test]
fn client_and_request_limits() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let served = Served::start(dir.path());
    let sock = served.sock.clone();
    let mut first = Client::connect(&sock);
    assert_eq!(first.call(r#"{"cmd":"status"}"#)["ok"], true);
    let mut others: Vec<Client> = (1..MAX_CLIENTS).map(|_| Client::connect(&sock)).collect();
    for c in others.iter_mut() {
        assert_eq!(c.call(r#"{"cmd":"status"}"#)["ok"], true);
    }
    // One more: the first (idle longest) is closed with one error line.
    let mut newest = Client::connect(&sock);
    assert_eq!(newest.call(r#"{"cmd":"status"}"#)["ok"], true);
    let got = read_all(&mut first.w);
    let v: Value = serde_json::from_slice(&got).unwrap();
    assert_eq!(v["ok"], false);
    assert!(v["error"].as_str().unwrap().contains("too many"), "{v}");
    for c in others.iter_mut() {
        assert_eq!(c.call(r#"{"cmd":"status"}"#)["ok"], true);
    }
    drop(others);

    // Too long: one error line, then the connection closes.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = s.write_all(&vec![b'x'; MAX_REQUEST + 4096]);
    let got = read_all(&mut s);
    let text = String::from_utf8_lossy(&got);
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(text.contains("longer than"), "{text}");

    // A request as long as a long real script (1000 lines of 1000 bytes)
    // is read and parsed whole: paused, the VM refuses it for that reason.
    let line = format!("print {}\n", "y".repeat(993));
    let req = json!({"cmd": "exec", "script": line.repeat(1000)}).to_string();
    assert!(req.len() > 1_000_000 && req.len() < MAX_REQUEST);
    assert_eq!(newest.call(r#"{"cmd":"pause"}"#)["ok"], true);
    let r = newest.call(&req);
    assert_eq!(r["ok"], false, "{r}");
    assert_eq!(r["error"], "the VM is paused", "{r}");
    assert_eq!(newest.call(r#"{"cmd":"resume"}"#)["ok"], true);
    assert_eq!(newest.exec_ok(&line.repeat(3)).len(), 3);

    served.finish();
}

/// The default socket of a process is in a private directory, never in
/// /tmp, and removed with its directory when it was a fresh one.
#[test]
fn default_socket_location() {
    let s = ControlSocket::bind(None, "vmmtest").unwrap();
    let p: PathBuf = s.path().to_path_buf();
    let name = format!("vmmtest-{}.sock", std::process::id());
    assert_eq!(p.file_name().unwrap().to_string_lossy(), name);
    use std::os::unix::fs::MetadataExt;
    let dm = std::fs::symlink_metadata(p.parent().unwrap()).unwrap();
    assert_eq!(dm.mode() & 0o077, 0, "{p:?}");
    // SAFETY: geteuid has no preconditions.
    assert_eq!(dm.uid(), unsafe { libc::geteuid() });
    assert_eq!(std::fs::symlink_metadata(&p).unwrap().mode() & 0o777, 0o600);
    assert!(
        p.parent() != Some(Path::new("/tmp")) && p.parent() != Some(&std::env::temp_dir()),
        "{p:?}"
    );
    drop(s);
    assert!(!p.exists());
}

/// A script cut short (timeout, interrupt) keeps running in the guest; the
/// next script gets its own output and status, not the rest of the old one.
#[test]
fn the_next_script_is_not_confused_by_one_cut_short() {
    if !kvm_available() {
        return;
    }
    let mut vm = boot(32, &[]);
    let r = vm.run_script(
        "sleep 300\nprint stale\nbogus",
        &mut |_| {},
        Duration::from_millis(50),
    );
    assert!(matches!(r, Err(Error::Timeout(_))), "{r:?}");
    let mut seen = Vec::new();
    let o = vm
        .run_script("print fresh", &mut |l| seen.push(l.to_string()), T)
        .unwrap();
    assert_eq!(o.lines, ["fresh"]);
    assert_eq!(o.status, 0);
    assert_eq!(seen, ["fresh"]);
    // Line numbers of errors still count from the script's first line.
    let o = vm.run_script("nonsense", &mut |_| {}, T).unwrap();
    assert_eq!(o.lines, ["error 1: unknown command 'nonsense'"]);

    // Interrupted, then suspended and restored: the same.
    let flag = Arc::new(AtomicBool::new(false));
    vm.set_interrupt(flag.clone());
    let f2 = flag.clone();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(100));
        f2.store(true, Ordering::SeqCst);
    });
    let r = vm.run_script("sleep 500\nprint stale", &mut |_| {}, T);
    assert!(matches!(r, Err(Error::Interrupted)), "{r:?}");
    setter.join().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mem = dir.path().join("memory.raw");
    let state = vm.save(&mem).unwrap();
    drop(vm);
    let mut vm = Vm::restore(&mem, Vec::new(), &state).unwrap();
    assert_eq!(run_ok(&mut vm, "print after"), ["after"]);
}
