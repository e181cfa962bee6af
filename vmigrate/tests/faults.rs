//! The fault matrix of live migration: at each phase of the protocol
//! (seen by a proxy between the hosts, which reads the cleartext frame
//! headers), one fault strikes: the connection is cut, the receiver is
//! killed or stopped, the source is stopped, or the `vmigrate send` client
//! is killed. Every cell must end with exactly one running guest whose
//! memory and disk are intact and whose counter moved on, or, where the
//! fault itself stops the VM (SIGTERM), with the guest suspended intact in
//! one VM directory and running nowhere.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{proxy, At};
use common::*;

const START: At = At::Frame {
    to_receiver: true,
    ty: 1,
    nth: 1,
};
const ROUND0: At = At::Frame {
    to_receiver: true,
    ty: 2,
    nth: 3,
};
const PRECOPY: At = At::Frame {
    to_receiver: false,
    ty: 18,
    nth: 1,
};
const STOP_AND_COPY: At = At::Frame {
    to_receiver: true,
    ty: 4,
    nth: 1,
};
const COMMIT: At = At::Frame {
    to_receiver: true,
    ty: 5,
    nth: 1,
};
const RUNNING: At = At::Frame {
    to_receiver: false,
    ty: 16,
    nth: 1,
};
const DONE: At = At::Frame {
    to_receiver: true,
    ty: 6,
    nth: 1,
};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Both directions closed; the frame is not forwarded.
    Cut,
    /// SIGKILL to the receiver process; the frame is not forwarded.
    KillReceiver,
    /// SIGTERM to the receiver process, then forwarding goes on.
    TermReceiver,
    /// SIGTERM to the source process, then forwarding goes on.
    TermSource,
    /// SIGKILL to the `vmigrate send` client, then forwarding goes on.
    KillClient,
}

/// Where the guest must be afterwards.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Source,
    Receiver,
    /// Suspended in the source's VM directory, running nowhere.
    SuspendedAtSource,
    /// Suspended in OUT, running nowhere.
    SuspendedAtReceiver,
}

fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) has no memory-safety requirements.
    unsafe { libc::kill(pid as libc::pid_t, sig) };
}

fn alive(c: &mut Child) -> bool {
    c.try_wait().unwrap().is_none()
}

/// Waits until `c` exits (at most `limit`); returns its success.
fn exits(c: &mut Child, limit: Duration) -> Option<bool> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Some(s) = c.try_wait().unwrap() {
            return Some(s.success());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Resumes a suspended VM directory and checks the guest in it.
fn check_suspended(dir: &Path, before: &Guest) {
    let sock = dir.with_extension("check.sock");
    let mut c = Proc(
        Command::new(bin("vmigrate"))
            .arg("run")
            .arg(dir)
            .arg("--control")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_for(&sock);
    let g = look(&sock);
    assert_eq!(g.sums, before.sums, "the suspended guest is damaged");
    assert!(g.counter > before.counter, "the suspended guest lost time");
    signal(c.0.id(), libc::SIGTERM);
    let _ = exits(&mut c.0, Duration::from_secs(20));
}

fn cell(fault: Fault, at: At, allowed: &[Expect]) {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("dirty hot 2M\n");
    let before = look(&s.src_sock);
    let (mut dst, addr, dst_log) = s.recv_with(&s.key.clone(), "dst", &[]);
    let (src_pid, dst_pid) = (s.src.0.id(), dst.0.id());
    let client_pid = Arc::new(Mutex::new(None::<u32>));
    let cp = client_pid.clone();
    let strike: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || match fault {
        Fault::Cut => false,
        Fault::KillReceiver => {
            signal(dst_pid, libc::SIGKILL);
            false
        }
        Fault::TermReceiver => {
            signal(dst_pid, libc::SIGTERM);
            true
        }
        Fault::TermSource => {
            signal(src_pid, libc::SIGTERM);
            true
        }
        Fault::KillClient => {
            if let Some(p) = *cp.lock().unwrap() {
                signal(p, libc::SIGKILL);
            }
            true
        }
    });
    let (paddr, struck) = proxy(addr, at, strike);
    let mut client = Command::new(bin("vmigrate"))
        .arg("send")
        .arg("--control")
        .arg(&s.src_sock)
        .args(["--to", &paddr, "--max-bandwidth", "40M", "-k"])
        .arg(&s.key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    *client_pid.lock().unwrap() = Some(client.id());
    let _ = exits(&mut client, Duration::from_secs(90));
    let mut err = String::new();
    if let Some(mut e) = client.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    eprintln!("[send] {err}");
    let in_doubt = err.contains("migration in doubt");
    assert!(
        *struck.lock().unwrap(),
        "{fault:?} at {at:?}: the phase was never reached"
    );
    // Let both sides settle (a receiver waits up to 30 s for DONE; one
    // that failed exits at once; a source in doubt asks for up to 20 s).
    let dst_sock = s.p("dst.sock");
    let settle = Instant::now();
    let outcome = loop {
        std::thread::sleep(Duration::from_millis(200));
        let src_alive = alive(&mut s.src.0);
        let dst_alive = alive(&mut dst.0);
        // A receiver that still waits for a migration (its handshake was
        // cut) or answers a sender in doubt after a failure holds no copy;
        // one that holds the guest says it runs.
        let dst_runs = dst_alive
            && dst_log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with("VM running; control socket"));
        let o = match (src_alive, dst_runs) {
            // A source in doubt suspends its guest and exits: not settled
            // while it is still writing it out.
            (true, false) if in_doubt => None,
            (true, false) => Some(Expect::Source),
            (false, true) => Some(Expect::Receiver),
            // A killed receiver's OUT is stale, never the copy.
            (false, false) if dst_alive => None,
            (false, false) if s.p("dst").exists() && fault != Fault::KillReceiver => {
                Some(Expect::SuspendedAtReceiver)
            }
            (false, false) => Some(Expect::SuspendedAtSource),
            _ => None,
        };
        match o {
            Some(o) if allowed.contains(&o) => break o,
            _ if settle.elapsed() > Duration::from_secs(60) => {
                panic!("{fault:?} at {at:?}: no allowed outcome {allowed:?}: source alive {src_alive}, receiver alive {dst_alive}, OUT exists {}", s.p("dst").exists())
            }
            _ => {}
        }
    };
    // Nothing changes afterwards: still exactly one copy a moment later.
    std::thread::sleep(Duration::from_millis(500));
    let (src_alive, dst_alive) = (alive(&mut s.src.0), alive(&mut dst.0));
    let dst_runs = dst_alive
        && dst_log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("VM running; control socket"));
    match outcome {
        Expect::Source => {
            assert!(
                src_alive && !dst_runs,
                "{fault:?} at {at:?}: two copies or none"
            );
            if !matches!(fault, Fault::KillReceiver) {
                assert!(
                    !s.p("dst").exists(),
                    "{fault:?} at {at:?}: OUT was left behind"
                );
            }
            s.source_intact(&before);
        }
        Expect::Receiver => {
            assert!(
                dst_alive && !src_alive,
                "{fault:?} at {at:?}: two copies or none"
            );
            wait_for(&dst_sock);
            let g = look(&dst_sock);
            assert_eq!(g.sums, before.sums, "{fault:?} at {at:?}: damaged guest");
            assert!(g.counter > before.counter);
        }
        Expect::SuspendedAtSource => {
            if !matches!(fault, Fault::KillReceiver) {
                assert!(
                    !s.p("dst").exists(),
                    "{fault:?} at {at:?}: OUT was left behind"
                );
            }
            check_suspended(&s.p("vm"), &before);
        }
        Expect::SuspendedAtReceiver => check_suspended(&s.p("dst"), &before),
    }
}

macro_rules! cells {
    ($($name:ident: $fault:ident at $at:expr => $($expect:ident)|+;)*) => {$(
        #[test]
        fn $name() {
            cell(Fault::$fault, $at, &[$(Expect::$expect),+]);
        }
    )*};
}

cells! {
    cut_handshake: Cut at At::Handshake => Source;
    cut_start: Cut at START => Source;
    cut_round0: Cut at ROUND0 => Source;
    cut_precopy: Cut at PRECOPY => Source;
    cut_stop_and_copy: Cut at STOP_AND_COPY => Source;
    cut_commit: Cut at COMMIT => Source;
    cut_running: Cut at RUNNING => Receiver;
    cut_done: Cut at DONE => Receiver;

    kill_receiver_handshake: KillReceiver at At::Handshake => Source;
    kill_receiver_start: KillReceiver at START => Source;
    kill_receiver_round0: KillReceiver at ROUND0 => Source;
    kill_receiver_precopy: KillReceiver at PRECOPY => Source;
    kill_receiver_stop_and_copy: KillReceiver at STOP_AND_COPY => Source | SuspendedAtSource;
    kill_receiver_commit: KillReceiver at COMMIT => SuspendedAtSource;
    kill_receiver_running: KillReceiver at RUNNING => SuspendedAtSource;

    term_receiver_handshake: TermReceiver at At::Handshake => Source;
    term_receiver_start: TermReceiver at START => Source;
    term_receiver_round0: TermReceiver at ROUND0 => Source;
    term_receiver_precopy: TermReceiver at PRECOPY => Source;
    term_receiver_stop_and_copy: TermReceiver at STOP_AND_COPY => Source | SuspendedAtReceiver;
    term_receiver_running: TermReceiver at RUNNING => SuspendedAtReceiver;
    term_receiver_done: TermReceiver at DONE => SuspendedAtReceiver;

    term_source_handshake: TermSource at At::Handshake => SuspendedAtSource;
    term_source_start: TermSource at START => SuspendedAtSource;
    term_source_round0: TermSource at ROUND0 => SuspendedAtSource;
    term_source_precopy: TermSource at PRECOPY => SuspendedAtSource;
    term_source_stop_and_copy: TermSource at STOP_AND_COPY => Receiver | SuspendedAtSource;
    term_source_commit: TermSource at COMMIT => Receiver;
    term_source_running: TermSource at RUNNING => Receiver;
    term_source_done: TermSource at DONE => Receiver;

    kill_client_start: KillClient at START => Source;
    kill_client_round0: KillClient at ROUND0 => Source;
    kill_client_precopy: KillClient at PRECOPY => Source;
    kill_client_commit: KillClient at COMMIT => Receiver;
    kill_client_running: KillClient at RUNNING => Receiver;
}

/// Finding 9: the receiver commits OUT (digests of exactly the handed-over
/// state) before the guest runs, and runs it from OUT. Checked at the
/// moment RUNNING passes the proxy: OUT must already be a complete VM
/// directory whose every digest matches, and its disk must be the source's
/// disk as handed over.
#[test]
fn out_is_committed_before_the_guest_runs() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("dirty hot 2M\n");
    let before = look(&s.src_sock);
    let (_dst, addr, _) = s.recv_with(&s.key.clone(), "dst", &[]);
    let out = s.p("dst");
    let seen = Arc::new(Mutex::new(
        None::<Result<kimberley_formats::vmdir::Manifest, String>>,
    ));
    let seen2 = seen.clone();
    let strike: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || {
        let r = kimberley_formats::vmdir::VmDir::open(&out)
            .and_then(|d| d.verify().map(|()| d.manifest))
            .map_err(|e| e.to_string());
        *seen2.lock().unwrap() = Some(r);
        true
    });
    let (paddr, struck) = proxy(addr, RUNNING, strike);
    ok(s.send(&paddr, &[]));
    assert!(*struck.lock().unwrap());
    s.source_exits();
    let m = seen
        .lock()
        .unwrap()
        .take()
        .unwrap()
        .unwrap_or_else(|e| panic!("OUT was not a committed VM directory at RUNNING: {e}"));
    // The source's disk, used in place and paused since, is the disk as
    // handed over.
    let f = std::fs::File::open(s.p("vm").join("disk0.raw")).unwrap();
    let size = f.metadata().unwrap().len();
    let d = kimberley_formats::vmdir::dir::digest_file(&f, size).unwrap();
    assert_eq!(
        m.components[1].digest, d,
        "OUT's disk digest is not the handed-over disk"
    );
    wait_for(&s.p("dst.sock"));
    let g = look(&s.p("dst.sock"));
    assert_eq!(g.sums, before.sums);
    // The guest runs from OUT itself.
    let st = ctl_status(&s.p("dst.sock"));
    let disks = st["disks"].as_array().unwrap();
    assert!(
        disks[0]
            .as_str()
            .unwrap()
            .starts_with(s.p("dst").to_str().unwrap()),
        "{st}"
    );
}

fn ctl_status(sock: &Path) -> serde_json::Value {
    use std::io::BufRead;
    let mut c = std::os::unix::net::UnixStream::connect(sock).unwrap();
    writeln!(c, "{{\"cmd\":\"status\"}}").unwrap();
    let mut l = String::new();
    std::io::BufReader::new(c).read_line(&mut l).unwrap();
    serde_json::from_str(&l).unwrap()
}
