//! Attacks on `vmigrate recv` by peers that hold the migration key (a
//! sender naming host files as shared disks) and by peers that hold nothing
//! (connections that never finish their handshake). Each test fails on a
//! receiver without the defence it names.

mod common;

use std::ffi::OsStr;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::FromRawFd;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use vmigrate::channel;
use vmigrate::protocol::{DiskInfo, Message, Start};

/// `vmigrate recv` on a free loopback port for `key`, writing `out`, its
/// stderr piped.
fn spawn_recv(key: &Path, out: &Path, extra: &[&OsStr]) -> std::process::Child {
    Command::new(bin("vmigrate"))
        .args(["recv", "--listen", "127.0.0.1:0", "-k"])
        .arg(key)
        .arg("-o")
        .arg(out)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A receiver process on loopback for `key`, writing `out`; returns it and
/// its address.
fn receiver(key: &Path, out: &Path, extra: &[&OsStr]) -> (Proc, String) {
    let mut c = spawn_recv(key, out, extra);
    let mut err = c.stderr.take().unwrap();
    let mut seen = Vec::new();
    let mut b = [0u8; 1];
    let t = Instant::now();
    let addr = loop {
        assert!(t.elapsed() < Duration::from_secs(10), "no address");
        if err.read(&mut b).unwrap_or(0) == 0 {
            panic!("receiver exited: {}", String::from_utf8_lossy(&seen));
        }
        seen.push(b[0]);
        let s = String::from_utf8_lossy(&seen);
        if let Some(l) = s
            .lines()
            .find_map(|l| l.strip_prefix("vmigrate: waiting for a migration on "))
        {
            if s.ends_with('\n') {
                break l.trim().to_string();
            }
        }
    };
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut err, &mut std::io::sink());
    });
    (Proc(c), addr)
}

/// Plays a sender that holds the key and announces one shared disk at
/// `path` of `size` bytes (of a microVM, or with `stream` of a QEMU
/// guest); returns the receiver's answer within 3 s (None: it said
/// nothing, i.e. it took the disk and waits for data).
fn malicious_start(
    addr: &str,
    key: &[u8; 32],
    path: &str,
    size: u64,
    stream: bool,
) -> Option<Message> {
    let s = TcpStream::connect(addr).unwrap();
    let (mut tx, mut rx) = channel::handshake_sender(s, key).unwrap();
    tx.send(Message::Start(Start {
        memory_size: 16 << 20,
        vcpus: 1,
        shared_disk: true,
        stream,
        disks: vec![DiskInfo {
            size,
            path: path.into(),
        }],
    }))
    .unwrap();
    rx.stream()
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    rx.recv().ok()
}

#[test]
fn sender_cannot_choose_host_files_as_shared_disks() {
    let t = tempfile::tempdir().unwrap();
    let key_path = t.path().join("key");
    let key = [7u8; 32];
    std::fs::write(&key_path, key).unwrap();
    // A host file the sender must not get at (root-owned, 0600 in CI).
    let secret = t.path().join("secret");
    std::fs::write(&secret, vec![0x5a; 1 << 20]).unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let shared = t.path().join("shared");
    std::fs::create_dir_all(shared.join("sub")).unwrap();
    std::fs::write(shared.join("disk.raw"), vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink(&secret, shared.join("link.raw")).unwrap();
    std::os::unix::fs::symlink(t.path(), shared.join("up")).unwrap();
    let fifo = shared.join("fifo");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let dir_arg = [OsStr::new("--shared-disk-dir"), shared.as_os_str()];
    let cases: Vec<(&str, String, u64, &[&OsStr])> = vec![
        ("no --shared-disk-dir", s(&secret), 1 << 20, &[]),
        ("outside the directory", s(&secret), 1 << 20, &dir_arg),
        (
            "a symlink inside",
            s(&shared.join("link.raw")),
            1 << 20,
            &dir_arg,
        ),
        (
            "dot-dot out",
            format!("{}/sub/../../secret", s(&shared)),
            1 << 20,
            &dir_arg,
        ),
        (
            "through a directory symlink",
            format!("{}/up/secret", s(&shared)),
            1 << 20,
            &dir_arg,
        ),
        ("a FIFO", s(&fifo), 0, &dir_arg),
        (
            "the wrong size",
            s(&shared.join("disk.raw")),
            2 << 20,
            &dir_arg,
        ),
    ];
    // Both receiving paths: the microVM's pages and QEMU's stream.
    for ((what, path, size, extra), stream) in cases
        .iter()
        .flat_map(|c| [(c.clone(), false), (c.clone(), true)])
    {
        let out = t.path().join("out");
        let (mut p, addr) = receiver(&key_path, &out, extra);
        let m = malicious_start(&addr, &key, &path, size, stream);
        let what = format!("{what} (stream: {stream})");
        let linked = std::fs::metadata(&secret).unwrap().nlink();
        assert!(
            matches!(&m, Some(Message::Error(_))),
            "{what}: the receiver answered {m:?} (the host file has {linked} links)"
        );
        let st = p.0.wait().unwrap();
        assert!(!st.success(), "{what}: the receiver succeeded");
        assert!(!out.exists(), "{what}: OUT exists");
        let meta = std::fs::metadata(&secret).unwrap();
        assert_eq!(meta.nlink(), 1, "{what}: the host file was linked");
        assert_eq!(std::fs::read(&secret).unwrap(), vec![0x5a; 1 << 20]);
    }
}

/// A TCP connection to `to` from the local address `from` (any 127.x
/// address works on loopback): one attacking host.
fn connect_from(from: [u8; 4], to: &str) -> TcpStream {
    let to: SocketAddr = to.parse().unwrap();
    let SocketAddr::V4(to) = to else {
        panic!("IPv4 expected")
    };
    let sin = |ip: [u8; 4], port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip),
        },
        sin_zero: [0; 8],
    };
    let (a, b) = (sin(from, 0), sin(to.ip().octets(), to.port()));
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: plain socket calls on a descriptor this function owns; the
    // address structures are valid for the given lengths.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0);
        assert_eq!(
            libc::bind(fd, &a as *const _ as *const libc::sockaddr, len),
            0
        );
        assert_eq!(
            libc::connect(fd, &b as *const _ as *const libc::sockaddr, len),
            0
        );
        TcpStream::from_raw_fd(fd)
    }
}

/// True once the receiver closed `s` (EOF or reset within `wait`).
fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut b = [0u8; 64];
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue, // the receiver's hello
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

#[test]
fn silent_connections_do_not_block_a_migration() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("");
    let before = look(&s.src_sock);
    let (_dst, addr, _) = s.recv_with(&s.key.clone(), "dst", &[]);
    // An attacker without the key: many connections that never speak,
    // and one that sends its hello a byte a second.
    let mut silent: Vec<TcpStream> = (0..40)
        .map(|_| connect_from([127, 0, 0, 2], &addr))
        .collect();
    let mut slow = connect_from([127, 0, 0, 3], &addr);
    let dribble = std::thread::spawn(move || {
        for _ in 0..20 {
            if std::io::Write::write_all(&mut slow, b"K").is_err() {
                return true;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        false
    });
    std::thread::sleep(Duration::from_millis(300));
    // Connections over the per-address bound are closed at once.
    let mut open_now = 0;
    for c in silent.iter_mut() {
        if !closed_within(c, Duration::from_millis(200)) {
            open_now += 1;
        }
    }
    assert!(
        open_now <= vmigrate::dest::MAX_PER_PEER,
        "{open_now} silent connections from one address are held"
    );
    // The real sender gets through at once, not after the attackers.
    let t = Instant::now();
    let o = s.send(&addr, &[]);
    ok(o);
    assert!(
        t.elapsed() < Duration::from_secs(20),
        "the migration waited {:?}",
        t.elapsed()
    );
    s.source_exits();
    wait_for(&s.p("dst.sock"));
    let after = look(&s.p("dst.sock"));
    assert_eq!(after.sums, before.sums);
    // Handshakes that do not finish are dropped at their deadline.
    let deadline = channel::HANDSHAKE_DEADLINE + Duration::from_secs(2);
    for c in silent.iter_mut() {
        assert!(closed_within(c, deadline), "a silent connection is held");
    }
    assert!(
        dribble.join().unwrap(),
        "the dribbling handshake was never cut"
    );
}

/// Starts `vmigrate recv` with `extra` arguments and returns its output if
/// it exits within 10 s (None: it is still running, i.e. listening).
fn recv_exits(key: &Path, out: &Path, extra: &[&OsStr]) -> Option<std::process::Output> {
    let mut c = spawn_recv(key, out, extra);
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if c.try_wait().unwrap().is_some() {
            return Some(c.wait_with_output().unwrap());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
    None
}

/// Finding 4: everything that can fail on the receiver's side for reasons
/// of its own (its control socket) is checked before a migration is
/// accepted, so a migrated guest is never dropped for it afterwards.
#[test]
fn receiver_checks_its_control_socket_before_accepting() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("key");
    std::fs::write(&key, [7u8; 32]).unwrap();
    let out = t.path().join("out");
    // A mistyped --control (its directory does not exist).
    let bad = t.path().join("no-such-dir").join("x.sock");
    // A symlink planted where the socket is to be.
    let planted = t.path().join("planted.sock");
    std::os::unix::fs::symlink(t.path().join("elsewhere"), &planted).unwrap();
    for sock in [&bad, &planted] {
        let o = recv_exits(&key, &out, &[OsStr::new("--control"), sock.as_os_str()])
            .unwrap_or_else(|| panic!("{}: the receiver started listening", sock.display()));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{err}");
        assert!(!err.contains("waiting for a migration"), "{err}");
    }
    assert!(
        !t.path().join("elsewhere").exists(),
        "the symlink was followed"
    );
    assert!(!out.exists());
}

/// Finding 4: a receiver that runs out of space fails before the hand-over,
/// and the guest keeps running on the source, intact.
#[test]
fn receiver_out_of_space_leaves_the_guest_on_the_source() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("");
    let before = look(&s.src_sock);
    // An 8 MiB tmpfs cannot hold the guest's 25 MiB of data.
    let mnt = s.p("small");
    let _u = common::tools::SmallTmpfs::mount(&mnt, "8m");
    let (mut p, addr) = receiver(&s.key.clone(), &mnt.join("out"), &[]);
    let o = s.send(&addr, &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("keeps running on the source"), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    let st = p.0.wait().unwrap();
    assert!(!st.success());
    assert_eq!(
        std::fs::read_dir(&mnt).unwrap().count(),
        0,
        "the receiver left something behind"
    );
    s.source_intact(&before);
}
