//! What a guest does to the machine around it: a TCP port forwarded into
//! it answers, an interrupt ends a running script, a guest that panics is
//! reported as stopped.

mod common;

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kimberley_formats::vmdir::{VmDir, VmDirWriter};
use kimberley_machine::{Backend, Error as M, PortForward, RestoreOptions};
use kimberley_qemu::{boot, qemu_for_tests, BootConfig, QemuBackend};

const T: Duration = Duration::from_secs(60);

fn base(t: &std::path::Path, net: bool) -> VmDir {
    let a = common::artifacts();
    let mut cfg = BootConfig::new(&a.kernel, Some(a.initrd.clone()));
    cfg.net = net;
    let b = boot(
        &cfg,
        VmDirWriter::create(&t.join("base")).unwrap(),
        "base",
        T,
    )
    .unwrap();
    VmDir::open(&b.dir).unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_forwarded_port_reaches_a_server_in_the_guest() {
    if !qemu_for_tests() {
        return;
    }
    let _slot = common::qemu_slot();
    let t = tempfile::tempdir().unwrap();
    let dir = base(t.path(), true);
    let port = free_port();
    let fwd: PortForward = format!("{port}:80").parse().unwrap();
    let mut m = QemuBackend::default()
        .restore(
            &dir,
            RestoreOptions {
                forwards: vec![fwd],
                ..RestoreOptions::in_place()
            },
        )
        .unwrap();
    let token = common::token();
    let o = m
        .agent()
        .run_script(
            &format!(
                "ip -4 addr show eth0 | grep -q 'inet 10.0.2.15' || {{ ip addr; exit 1; }}; \
                 mkdir -p /www && echo {token} > /www/index.html && httpd -p 80 -h /www"
            ),
            &mut |_| {},
            T,
        )
        .unwrap();
    assert_eq!(o.status, 0, "{:?}", o.lines);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut reply = String::new();
    s.read_to_string(&mut reply).unwrap();
    assert!(reply.contains(&token), "{reply}");
}

#[test]
fn an_interrupt_ends_a_script_and_a_panic_stops_the_guest() {
    if !qemu_for_tests() {
        return;
    }
    let _slot = common::qemu_slot();
    let t = tempfile::tempdir().unwrap();
    let dir = base(t.path(), false);
    let mut m = QemuBackend::default()
        .restore(&dir, RestoreOptions::in_place())
        .unwrap();
    let flag = Arc::new(AtomicBool::new(false));
    m.set_interrupt(flag.clone());
    let f = flag.clone();
    let setter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        f.store(true, Ordering::SeqCst);
    });
    let start = Instant::now();
    let e = m
        .agent()
        .run_script("sleep 30", &mut |_| {}, T)
        .unwrap_err();
    setter.join().unwrap();
    assert!(matches!(e, M::Interrupted), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    flag.store(false, Ordering::SeqCst);

    // The guest panics (panic=-1 with -no-reboot: QEMU ends).
    let e = m
        .agent()
        .run_script("echo c > /proc/sysrq-trigger; sleep 30", &mut |_| {}, T)
        .unwrap_err();
    assert!(matches!(e, M::GuestStopped(_)), "{e}");
    let e = m.agent().ping(Duration::from_secs(5)).unwrap_err();
    assert!(matches!(e, M::GuestStopped(_)), "{e}");
    assert!(m
        .take_console_lines()
        .iter()
        .any(|l| l.contains("Kernel panic")));
}
