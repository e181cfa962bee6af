//! Linux guests under QEMU, end to end through the binaries: `kimberlize
//! base --qemu` → `kimberlize build` (shell scripts through
//! qemu-guest-agent) → the overlay through a pipe → `dekimberlize --run
//! --forward`, checked through the guest agent and a TCP request; layered
//! overlays; and the failure modes. Needs qemu-system-x86_64 and the
//! artifacts of `scripts/linux-base.sh`; with KIMBERLEY_REQUIRE_QEMU=1 (CI)
//! a test that would skip fails. At most two QEMUs at once (one per test
//! thread, two threads on CI).

mod common;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::tools::Proc;
use common::*;
use kimberley_formats::vmdir::VmDir;

fn lines(b: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(b)
        .lines()
        .map(str::to_string)
        .collect()
}

fn qemu() -> bool {
    kimberley_qemu::qemu_for_tests()
}

/// A Linux base VM (256 MiB, an empty disk, user networking) and a key,
/// in a directory of the test's own.
struct Linux {
    _slot: common::linux_guest::QemuSlot,
    t: tempfile::TempDir,
    key: PathBuf,
    base: PathBuf,
}

fn linux() -> Linux {
    linux_with_disk(64 << 20)
}

/// [`linux`] with an empty disk of `disk_size` bytes.
fn linux_with_disk(disk_size: u64) -> Linux {
    let slot = common::linux_guest::qemu_slot();
    let a = common::linux_guest::artifacts();
    let (kernel, initrd) = (a.kernel, a.initrd);
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("key");
    ok(run(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(&key)));
    let disk = t.path().join("disk.raw");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(disk_size)
        .unwrap();
    let base = t.path().join("base");
    let o = ok(run(Command::new(bin("kimberlize"))
        .args(["base", "--qemu", "--memory", "256M", "--net", "user"])
        .arg("--kernel")
        .arg(&kernel)
        .arg("--initrd")
        .arg(&initrd)
        .arg("--disk")
        .arg(&disk)
        .arg("-o")
        .arg(&base)));
    eprintln!("{}", String::from_utf8_lossy(&o.stderr));
    std::fs::remove_file(&disk).unwrap();
    Linux {
        _slot: slot,
        t,
        key,
        base,
    }
}

/// A scratch directory of one test, beside its base.
fn scratch(l: &Linux) -> tempfile::TempDir {
    tempfile::tempdir_in(l.t.path()).unwrap()
}

/// Formats the disk, writes a file on it, fills a tmpfs with random data,
/// starts a counter in RAM and a web server; prints their checksums.
const INSTALL: &str = r#"set -e
echo installing
mke2fs -q -F /dev/vda
mkdir -p /mnt/app
mount /dev/vda /mnt/app
head -c 3000000 /dev/urandom > /mnt/app/app.bin
echo "disk-sum $(sha256sum /mnt/app/app.bin | cut -d' ' -f1)"
sync
mkdir -p /data
mount -t tmpfs -o size=64m tmpfs /data
head -c 16000000 /dev/urandom > /data/ram.bin
echo "ram-sum $(sha256sum /data/ram.bin | cut -d' ' -f1)"
(i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 0.1; done) </dev/null >/dev/null 2>&1 &
mkdir -p /www
echo kimberley-linux-app > /www/index.html
httpd -p 8080 -h /www
echo installed
"#;
const RESUME: &str = "sleep 1\necho \"count $(cat /run/count)\"\n";

fn build(l: &Linux, base: &Path, install: &str, dir: &Path, extra: &[&str]) -> Output {
    std::fs::write(dir.join("install.sh"), install).unwrap();
    std::fs::write(dir.join("resume.sh"), RESUME).unwrap();
    run(Command::new(bin("kimberlize"))
        .args(["build", "--base"])
        .arg(base)
        .arg("--install")
        .arg(dir.join("install.sh"))
        .arg("--resume")
        .arg(dir.join("resume.sh"))
        .arg("-k")
        .arg(&l.key)
        .args(extra))
}

/// `dekimberlize --run` serving its control socket, killed on drop.
struct Running {
    proc: Proc,
    sock: PathBuf,
}

impl Running {
    fn wait_socket(child: std::process::Child, sock: PathBuf) -> Running {
        let mut proc = Proc(child);
        let t = Instant::now();
        while !sock.exists() {
            if let Some(st) = proc.0.try_wait().unwrap() {
                let mut e = String::new();
                proc.0
                    .stderr
                    .take()
                    .unwrap()
                    .read_to_string(&mut e)
                    .unwrap();
                panic!("dekimberlize --run exited with {st}: {e}");
            }
            assert!(t.elapsed() < Duration::from_secs(120), "no control socket");
            std::thread::sleep(Duration::from_millis(50));
        }
        Running { proc, sock }
    }

    fn exec(&self, script: &str) -> Vec<String> {
        Client::connect(&self.sock).exec_timeout(script, Some(120_000))
    }

    fn stop(mut self) -> Output {
        assert_eq!(
            Client::connect(&self.sock).call(r#"{"cmd":"stop"}"#)["ok"],
            true
        );
        let mut err = Vec::new();
        self.proc
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_end(&mut err)
            .unwrap();
        let status = self.proc.0.wait().unwrap();
        Output {
            status,
            stdout: Vec::new(),
            stderr: err,
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// An HTTP GET through the forwarded port (retried while the guest's
/// network comes back).
fn http_get(port: u16) -> String {
    let t = Instant::now();
    loop {
        let r = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match r {
            Ok(b) if b.contains("200") => return b,
            _ if t.elapsed() < Duration::from_secs(30) => {
                std::thread::sleep(Duration::from_millis(200))
            }
            other => panic!("no answer through the forwarded port: {other:?}"),
        }
    }
}

#[test]
fn build_pipe_run_and_the_app_is_where_it_was() {
    if !qemu() {
        return;
    }
    let l = &linux();
    let t = scratch(l);
    let launch = t.path().join("launch");
    let ovl = t.path().join("app.ovl");
    // build | tee app.ovl | dekimberlize --run: the overlay streams through
    // a pipe while the launch VM is kept for the layered test below.
    let built = ok(build(
        l,
        &l.base,
        INSTALL,
        t.path(),
        &[
            "-o",
            ovl.to_str().unwrap(),
            "--launch-out",
            launch.to_str().unwrap(),
        ],
    ));
    let printed = lines(&built.stderr);
    assert!(printed.iter().any(|l| l == "installed"), "{printed:?}");
    let count0: u64 = value(&printed, "count ").parse().unwrap();
    // The base is untouched and the launch VM is a complete version-2 VMDIR
    // on the base's machine.
    let base = VmDir::open(&l.base).unwrap();
    base.verify().unwrap();
    let lvm = VmDir::open(&launch).unwrap();
    lvm.verify().unwrap();
    assert_eq!(lvm.manifest.machine, base.manifest.machine);

    let out = t.path().join("out");
    let sock = t.path().join("run.sock");
    let port = free_port();
    let mut cat = Command::new("cat")
        .arg(&ovl)
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let child = Command::new(bin("dekimberlize"))
        .arg("--base")
        .arg(&l.base)
        .args(["-i", "-", "-k"])
        .arg(&l.key)
        .arg("-o")
        .arg(&out)
        .arg("--run")
        .arg("--control")
        .arg(&sock)
        .arg("--forward")
        .arg(format!("127.0.0.1:{port}:8080"))
        .stdin(cat.stdout.take().unwrap())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let r = Running::wait_socket(child, sock);
    cat.wait().unwrap();
    let got = r.exec(
        "echo \"disk-sum $(sha256sum /mnt/app/app.bin | cut -d' ' -f1)\"\n\
         echo \"ram-sum $(sha256sum /data/ram.bin | cut -d' ' -f1)\"\n\
         echo \"count $(cat /run/count)\"\n",
    );
    assert_eq!(value(&got, "disk-sum"), value(&printed, "disk-sum"));
    assert_eq!(value(&got, "ram-sum"), value(&printed, "ram-sum"));
    let count1: u64 = value(&got, "count ").parse().unwrap();
    assert!(
        count1 > count0,
        "the counter went from {count0} to {count1}"
    );
    // The app answers through the forwarded port.
    let body = http_get(port);
    assert!(body.contains("kimberley-linux-app"), "{body}");
    let stopped = r.stop();
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    // Suspended back into `out`: complete, and it still runs from there.
    VmDir::open(&out).unwrap().verify().unwrap();

    // A layered overlay on the launch VM, applied as a chain to the base.
    let launch2 = t.path().join("launch2");
    let built2 = ok(run(Command::new(bin("kimberlize"))
        .args(["build", "--base"])
        .arg(&launch)
        .arg("--install")
        .arg(write(
            t.path(),
            "i2.sh",
            "echo layer2 > /mnt/app/layer2.txt\nsync\necho \"l2 $(cat /mnt/app/layer2.txt)\"\n",
        ))
        .arg("--resume")
        .arg(write(t.path(), "r2.sh", "true\n"))
        .arg("--no-encrypt")
        .arg("--launch-out")
        .arg(&launch2)
        .arg("-o")
        .arg(t.path().join("l2-flat.ovl"))));
    assert_eq!(value(&lines(&built2.stderr), "l2"), "layer2");
    ok(run(Command::new(bin("kimberlize"))
        .args(["diff", "--base"])
        .arg(&l.base)
        .arg("--launch")
        .arg(&launch2)
        .arg("--parent")
        .arg(&ovl)
        .arg("-k")
        .arg(&l.key)
        .arg("-o")
        .arg(t.path().join("l2.ovl"))));
    let out2 = t.path().join("out2");
    ok(run(Command::new(bin("dekimberlize"))
        .arg("--base")
        .arg(&l.base)
        .arg("-i")
        .arg(&ovl)
        .arg("-i")
        .arg(t.path().join("l2.ovl"))
        .arg("-k")
        .arg(&l.key)
        .arg("-o")
        .arg(&out2)));
    let o2 = VmDir::open(&out2).unwrap();
    assert_eq!(o2.identity(), VmDir::open(&launch2).unwrap().identity());
    assert_eq!(o2.manifest.machine, base.manifest.machine);
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn listing(d: &Path) -> Vec<std::ffi::OsString> {
    let mut v: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    v.sort();
    v
}

#[test]
fn failures_are_clear_and_leave_nothing() {
    if !qemu() {
        return;
    }
    let l = &linux();
    let t = scratch(l);
    let before = listing(t.path());
    let o = t.path().join("x.ovl");
    let o = o.to_str().unwrap();
    let check = |out: Output, code: i32, want: &str| {
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{e}");
        assert!(e.contains(want), "{e:?} lacks {want:?}");
        let mut now = listing(t.path());
        now.retain(|n| n != "install.sh" && n != "resume.sh");
        assert_eq!(now, before, "left something behind");
    };
    check(
        build(
            l,
            &l.base,
            "echo about to fail\nexit 3\n",
            t.path(),
            &["-o", o],
        ),
        9,
        "install script failed with status 3",
    );
    check(
        build(
            l,
            &l.base,
            "sleep 600\n",
            t.path(),
            &["-o", o, "--timeout", "3"],
        ),
        9,
        "timed out",
    );
    check(
        build(
            l,
            &l.base,
            "echo c > /proc/sysrq-trigger\n",
            t.path(),
            &["-o", o],
        ),
        9,
        "stopped",
    );
    // No QEMU on PATH.
    let mut c = Command::new(bin("kimberlize"));
    c.env("PATH", "/nonexistent");
    std::fs::write(t.path().join("install.sh"), "true\n").unwrap();
    check(
        run(c
            .args(["build", "--base"])
            .arg(&l.base)
            .arg("--install")
            .arg(t.path().join("install.sh"))
            .arg("--resume")
            .arg(t.path().join("install.sh"))
            .arg("--no-encrypt")
            .args(["-o", o])),
        9,
        "qemu-system-x86_64",
    );
    // A missing kernel.
    let initrd = common::linux_guest::artifacts().initrd;
    check(
        run(Command::new(bin("kimberlize"))
            .args(["base", "--qemu", "--kernel"])
            .arg(t.path().join("no-such-kernel"))
            .arg("--initrd")
            .arg(&initrd)
            .arg("-o")
            .arg(t.path().join("b2"))),
        9,
        "no-such-kernel",
    );
    // A VM directory of another machine type.
    let other = t.path().join("other");
    std::fs::create_dir(&other).unwrap();
    for e in std::fs::read_dir(&l.base).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), other.join(e.file_name())).unwrap();
    }
    let m = std::fs::read_to_string(other.join("manifest.json")).unwrap();
    let spec = VmDir::open(&l.base).unwrap().manifest.machine.unwrap();
    std::fs::write(
        other.join("manifest.json"),
        m.replace(&spec.machine_type, "pc-i440fx-99.9"),
    )
    .unwrap();
    let r = build(l, &other, "true\n", t.path(), &["-o", o]);
    let e = String::from_utf8_lossy(&r.stderr).into_owned();
    assert!(!r.status.success() && e.contains("pc-i440fx-99.9"), "{e}");
    std::fs::remove_dir_all(&other).unwrap();
    interrupted_build_stops_qemu(l, t.path());
    let mut now = listing(t.path());
    now.retain(|n| n != "install.sh" && n != "resume.sh");
    assert_eq!(now, before, "left something behind");
    VmDir::open(&l.base).unwrap().verify().unwrap();
}

/// The children of process `pid` (from /proc/*/stat).
fn children(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        // "PID (comm) STATE PPID ...": comm may hold spaces and parentheses.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            continue;
        };
        let ppid: Option<u32> = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok());
        if ppid == Some(pid) {
            if let Ok(c) = e.file_name().to_string_lossy().parse() {
                v.push(c);
            }
        }
    }
    v
}

/// SIGTERM while QEMU runs the install script: exit 143, QEMU stopped,
/// its work directory and every partial output removed.
fn interrupted_build_stops_qemu(l: &Linux, dir: &Path) {
    std::fs::write(dir.join("install.sh"), "sleep 600\n").unwrap();
    std::fs::write(dir.join("resume.sh"), RESUME).unwrap();
    let out = dir.join("x.ovl");
    let child = Command::new(bin("kimberlize"))
        .args(["build", "-q", "--base"])
        .arg(&l.base)
        .arg("--install")
        .arg(dir.join("install.sh"))
        .arg("--resume")
        .arg(dir.join("resume.sh"))
        .arg("-k")
        .arg(&l.key)
        .arg("-o")
        .arg(&out)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    // The VM's QEMU (not a version probe): the one in its work directory.
    let (qemu, work) = loop {
        let vm = children(child.id()).into_iter().find_map(|c| {
            let cwd = std::fs::read_link(format!("/proc/{c}/cwd")).ok()?;
            let name = cwd.file_name()?.to_string_lossy().into_owned();
            name.starts_with("kimberley-qemu-").then_some((c, cwd))
        });
        if let Some(v) = vm {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "QEMU did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(work.is_dir());
    // The guest is running the script (QEMU answered the agent).
    std::thread::sleep(Duration::from_secs(3));
    let (code, err) = interrupt(child, libc::SIGTERM);
    assert_eq!(code, kimberley_cli::exit::TERMINATED as i32, "{err}");
    assert!(
        err.contains("kimberlize build: interrupted by SIGTERM; removed the partial")
            && err.contains("x.ovl"),
        "{err}"
    );
    let t0 = Instant::now();
    while std::path::Path::new(&format!("/proc/{qemu}")).exists()
        && std::fs::read_to_string(format!("/proc/{qemu}/stat")).is_ok_and(|s| !s.contains(") Z "))
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "QEMU {qemu} still runs"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !work.exists(),
        "QEMU's work directory {} was left",
        work.display()
    );
}

/// The guest reaches the host (and the outside network) only when asked:
/// `build --net user`; otherwise only forwarded ports connect it.
#[test]
fn the_network_is_cut_off_unless_asked() {
    if !qemu() {
        return;
    }
    let l = &linux();
    let t = scratch(l);
    let host = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for s in host.incoming() {
            let Ok(mut s) = s else { continue };
            let mut req = [0u8; 1024];
            let _ = s.read(&mut req);
            let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\nthe-host-answers\n");
        }
    });
    // QEMU user networking: the host is 10.0.2.2.
    // (busybox nc: the static busybox's wget crashes in glibc's resolver.)
    let fetch = format!(
        "printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 5 10.0.2.2 {port} > /tmp/got\n\
         cat /tmp/got\n\
         grep -q the-host-answers /tmp/got\n"
    );
    let o = t.path().join("x.ovl");
    let o = o.to_str().unwrap();
    let open = ok(build(
        l,
        &l.base,
        &fetch,
        t.path(),
        &["-o", o, "--net", "user"],
    ));
    assert!(
        lines(&open.stderr).iter().any(|s| s == "the-host-answers"),
        "{}",
        String::from_utf8_lossy(&open.stderr)
    );
    std::fs::remove_file(o).unwrap();
    let closed = build(l, &l.base, &fetch, t.path(), &["-o", o]);
    let e = String::from_utf8_lossy(&closed.stderr).into_owned();
    assert_eq!(closed.status.code(), Some(9), "{e}");
    assert!(
        !e.contains("the-host-answers") && e.contains("install script failed"),
        "{e}"
    );
}

/// Issue 10: an install script that "downloads" a large incompressible file
/// onto a file system on the disk, "unpacks" (copies) it and deletes both.
/// With trim (the default: `fstrim` through the agent before the suspend)
/// the freed blocks are holes in the launch VM's disk and the overlay is
/// smaller than the deleted file; with `--no-trim` it is not. (The data
/// bypasses the page cache, `O_DIRECT`, so the guest's freed memory does
/// not carry it: this test is about the disk.)
#[test]
fn trimmed_blocks_cost_nothing_in_the_overlay() {
    if !qemu() {
        return;
    }
    const FILE: u64 = 48 << 20;
    let l = &linux_with_disk(160 << 20);
    let t = scratch(l);
    let install = format!(
        "set -e\n\
         mke2fs -q -F /dev/vda\n\
         mkdir -p /mnt/data\n\
         mount /dev/vda /mnt/data\n\
         dd if=/dev/urandom of=/mnt/data/pkg.bin bs=1M count={} oflag=direct 2>/dev/null\n\
         dd if=/mnt/data/pkg.bin of=/mnt/data/unpacked.bin bs=1M iflag=direct oflag=direct 2>/dev/null\n\
         ls -l /mnt/data\n\
         rm /mnt/data/pkg.bin /mnt/data/unpacked.bin\n\
         echo deleted\n",
        FILE >> 20
    );
    let built = |name: &str, extra: &[&str]| {
        let ovl = t.path().join(format!("{name}.ovl"));
        let launch = t.path().join(name);
        let stats = t.path().join(format!("{name}.json"));
        let mut args = vec![
            "-o",
            ovl.to_str().unwrap(),
            "--launch-out",
            launch.to_str().unwrap(),
            "--stats-json",
            stats.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        let o = ok(build(l, &l.base, &install, t.path(), &args));
        let printed = lines(&o.stderr);
        assert!(printed.iter().any(|l| l == "deleted"), "{printed:?}");
        let stats: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&stats).unwrap()).unwrap();
        let v = VmDir::open(&launch).unwrap();
        let disk = v.manifest.disk_indices()[0];
        let f = v.open_component(disk).unwrap();
        let data: u64 =
            kimberley_formats::sparse::data_extents(&f, v.manifest.components[disk].size)
                .unwrap()
                .iter()
                .map(|(a, b)| b - a)
                .sum();
        let size = std::fs::metadata(&ovl).unwrap().len();
        std::fs::remove_dir_all(&launch).unwrap();
        (size, data, stats, printed)
    };
    let (trimmed, trimmed_data, stats, printed) = built("trim", &["-v"]);
    let (kept, kept_data, kept_stats, _) = built("no-trim", &["--no-trim"]);
    eprintln!(
        "overlay bytes: trimmed {trimmed} (disk data {trimmed_data}), \
         --no-trim {kept} (disk data {kept_data}); deleted file {FILE}"
    );
    assert!(trimmed < FILE, "{trimmed} >= {FILE}");
    assert!(kept >= FILE, "{kept} < {FILE}");
    assert!(trimmed_data < FILE / 4, "{trimmed_data}");
    assert!(kept_data >= 2 * FILE, "{kept_data}");
    // What fstrim reported, in --stats-json and -v.
    let r = &stats["reclaim"];
    assert_eq!(r["applicable"], true, "{stats}");
    // The disk's file system, once; not the initramfs or the tmpfs mounts.
    assert_eq!(r["file_systems"].as_array().unwrap().len(), 1, "{stats}");
    assert_eq!(r["file_systems"][0]["mount"], "/mnt/data", "{stats}");
    assert!(r["trimmed_bytes"].as_u64().unwrap() >= 2 * FILE, "{stats}");
    assert!(
        printed
            .iter()
            .any(|p| p.starts_with("trimmed /mnt/data: ") && p.ends_with(" bytes)")),
        "{printed:?}"
    );
    assert_eq!(
        kept_stats["reclaim"],
        serde_json::Value::Null,
        "{kept_stats}"
    );
}
