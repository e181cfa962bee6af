//! Linux guests under QEMU (TCG here) through `vmigrate`: `run` resumes
//! and suspends a QEMU VM directory; `send`/`recv` migrate one whose disk
//! is shared, or copied in QEMU's own stream while the guest writes it,
//! carrying QEMU's own stream, and the guest's counting process, its
//! memory and its files survive; a wrong key and faults at each phase (a
//! proxy cuts or kills) leave exactly one running copy. Needs qemu-system-x86_64 and the artifacts of
//! scripts/linux-base.sh; with KIMBERLEY_REQUIRE_QEMU=1 (CI) a test that
//! would skip fails. One test at a time (a migration runs two QEMUs).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use common::proxy::{proxy, At};
use common::*;

/// Formats the shared disk and writes a file on it, fills a tmpfs with
/// random data, and starts a counter and a process dirtying memory.
const INSTALL: &str = r#"set -e
mke2fs -q -F -b 4096 /dev/vda
mkdir -p /mnt/app
mount /dev/vda /mnt/app
head -c 2000000 /dev/urandom > /mnt/app/app.bin
sync
mkdir -p /data
mount -t tmpfs -o size=32m tmpfs /data
head -c 8000000 /dev/urandom > /data/ram.bin
(i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 0.1; done) </dev/null >/dev/null 2>&1 &
(while :; do dd if=/dev/urandom of=/data/hot bs=64k count=16 2>/dev/null; sleep 0.05; done) </dev/null >/dev/null 2>&1 &
echo installed
"#;

/// Rewrites files on the disk while the guest runs (each a `seq` from a
/// number, replaced by rename, synced), until /run/stop-writer exists.
const DISK_WRITER: &str = r#"(i=0; while [ ! -e /run/stop-writer ]; do i=$((i+1)); seq $i $((i+3000)) > /mnt/app/tmp; sync; mv /mnt/app/tmp /mnt/app/w.$((i%4)); sync; sleep 0.1; done; touch /run/writer-stopped) </dev/null >/dev/null 2>&1 &
echo writing
"#;

/// Rewrites a file on the disk in place, again and again, while the guest
/// runs (a `seq` of 10001 numbers from a number that grows, so that no
/// shorter text leaves old bytes after it; synced), until /run/stop-writer
/// exists.
const INPLACE_WRITER: &str = r#"seq 1 10001 > /mnt/app/p.0; sync
(i=1; while [ ! -e /run/stop-writer ]; do i=$((i+1)); seq $i $((i+10000)) > /run/t; dd if=/run/t of=/mnt/app/p.0 bs=64k conv=notrunc,fsync 2>/dev/null; done; touch /run/writer-stopped) </dev/null >/dev/null 2>&1 &
echo writing
"#;

/// Stops a writer ([`DISK_WRITER`], [`INPLACE_WRITER`]), then reads its
/// files `glob` back from the disk (caches dropped): each must be the `seq`
/// of `span + 1` numbers its first line starts; prints `good N`.
fn files_check(glob: &str, span: u32) -> String {
    format!(
        r#"touch /run/stop-writer
while [ ! -e /run/writer-stopped ]; do sleep 0.1; done
sync
echo 3 > /proc/sys/vm/drop_caches
good=0
for f in {glob}; do a=$(head -n 1 $f); if seq $a $((a+{span})) | cmp -s - $f; then good=$((good+1)); else echo "bad $f"; fi; done
echo "good $good"
"#
    )
}

/// Starts `writer` in the guest behind `sock` and lets it run 2 s.
fn start_writer(sock: &Path, writer: &str) {
    let w = Client::connect(sock).exec_timeout(writer, Some(60_000));
    assert!(w.iter().any(|l| l == "writing"), "{w:?}");
    std::thread::sleep(Duration::from_secs(2));
}

/// The counter, and checksums of the file in memory and of the file on
/// the disk read from the disk itself (caches dropped).
const LOOK: &str = r#"echo 3 > /proc/sys/vm/drop_caches
echo "count $(cat /run/count)"
echo "ram $(sha256sum /data/ram.bin | cut -d' ' -f1)"
echo "disk $(sha256sum /mnt/app/app.bin | cut -d' ' -f1)"
"#;

struct Guest {
    count: u64,
    sums: [String; 2],
}

fn look(sock: &Path) -> Guest {
    let l = Client::connect(sock).exec_timeout(LOOK, Some(60_000));
    Guest {
        count: value(&l, "count").parse().unwrap(),
        sums: [value(&l, "ram"), value(&l, "disk")],
    }
}

fn qemu() -> bool {
    kimberley_qemu::qemu_for_tests()
}

/// One test at a time: a migration runs two QEMUs.
fn one_at_a_time() -> MutexGuard<'static, ()> {
    static L: Mutex<()> = Mutex::new(());
    L.lock().unwrap_or_else(|p| p.into_inner())
}

/// A key and a suspended Linux base VM (128 MiB, a 16 MiB disk), made once
/// per test binary.
fn template() -> &'static Path {
    static T: OnceLock<tempfile::TempDir> = OnceLock::new();
    T.get_or_init(|| {
        let a = linux_guest::artifacts();
        let t = tempfile::tempdir().unwrap();
        keygen(&t.path().join("key"));
        let disk = t.path().join("disk.raw");
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(16 << 20)
            .unwrap();
        ok(Command::new(bin("kimberlize"))
            .args(["base", "--qemu", "--memory", "128M", "--kernel"])
            .arg(&a.kernel)
            .arg("--initrd")
            .arg(&a.initrd)
            .arg("--disk")
            .arg(&disk)
            .arg("-o")
            .arg(t.path().join("vm"))
            .output()
            .unwrap());
        t
    })
    .path()
}

/// A running source VM (INSTALL run in it) in a directory of the test's
/// own.
struct Src {
    _lock: MutexGuard<'static, ()>,
    t: tempfile::TempDir,
    key: PathBuf,
    proc: Proc,
    sock: PathBuf,
}

impl Src {
    fn new() -> Src {
        Src::new_in(None)
    }

    /// [`Src::new`] with the VM's process in network namespace `ns`.
    fn new_in(ns: Option<&str>) -> Src {
        let lock = one_at_a_time();
        let tpl = template();
        let t = tempfile::tempdir().unwrap();
        std::fs::copy(tpl.join("key"), t.path().join("key")).unwrap();
        ok(Command::new("cp")
            .args(["-a", "--sparse=always"])
            .arg(tpl.join("vm"))
            .arg(t.path().join("vm"))
            .output()
            .unwrap());
        let sock = t.path().join("src.sock");
        let proc = run_in(ns, &t.path().join("vm"), &sock);
        Client::connect(&sock).exec_timeout(INSTALL, Some(120_000));
        Src {
            _lock: lock,
            key: t.path().join("key"),
            t,
            proc,
            sock,
        }
    }

    fn p(&self, n: &str) -> PathBuf {
        self.t.path().join(n)
    }

    /// The JSON file `n` of the test's directory (`--stats-json`).
    fn json(&self, n: &str) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.p(n)).unwrap()).unwrap()
    }

    /// `vmigrate recv` into `dst`, its shared disks beneath the test's
    /// directory.
    fn recv(&self, key: &Path) -> (Logged, String) {
        receiver(
            key,
            &self.p("dst"),
            &[
                "--shared-disk-dir".as_ref(),
                self.t.path().as_os_str(),
                "--stats-json".as_ref(),
                self.p("rstats.json").as_os_str(),
            ],
            Duration::from_secs(20),
        )
    }

    /// `vmigrate send --shared-disk` to `to`.
    fn send(&self, to: &str, key: &Path, extra: &[&str]) -> std::process::Output {
        let o = send_cmd(&self.sock, to, key)
            .arg("--stats-json")
            .arg(self.p("stats.json"))
            .args(extra)
            .output()
            .unwrap();
        eprintln!("[send] {}", String::from_utf8_lossy(&o.stderr));
        o
    }

    /// `send`s to `to` with `args`, which must succeed: the source is
    /// gone, and the receiver's guest (behind the returned control
    /// socket) has `before`'s memory and disk and counts on.
    fn migrated(&mut self, to: &str, args: &[&str], before: &Guest) -> PathBuf {
        ok(self.send(to, &self.key, args));
        self.gone();
        let dsock = self.p("dst.sock");
        let after = look(&dsock);
        assert_eq!(
            after.sums, before.sums,
            "memory or disk differ after migration"
        );
        assert!(after.count > before.count, "the counter did not continue");
        dsock
    }

    /// The source runs on with its guest intact.
    fn intact(&mut self, before: &Guest) {
        assert!(
            self.proc.0.try_wait().unwrap().is_none(),
            "the source process died"
        );
        let g = look(&self.sock);
        assert_eq!(g.sums, before.sums, "the source guest is damaged");
        assert!(g.count > before.count, "the source's counter stopped");
    }

    /// The source process exits 0 and its QEMU is gone (nothing holds its
    /// memory file open any more).
    fn gone(&mut self) {
        let t = Instant::now();
        while self.proc.0.try_wait().unwrap().is_none() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the source did not exit"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(self.proc.0.wait().unwrap().success());
        let mem = std::fs::canonicalize(self.p("vm/memory.raw")).unwrap();
        while holds_open(&mem) {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "a process (the source QEMU) still has {} open",
                mem.display()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// True if some process has `f` open.
fn holds_open(f: &Path) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|p| {
        std::fs::read_dir(p.path().join("fd"))
            .map(|fds| {
                fds.flatten()
                    .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l == f))
            })
            .unwrap_or(false)
    })
}

/// `vmigrate run DIR --control SOCK`, once the socket answers.
fn run(dir: &Path, sock: &Path) -> Proc {
    run_in(None, dir, sock)
}

/// `ip netns exec NS` in front of `c` (it runs the program itself).
fn in_ns(ns: Option<&str>, c: Command) -> Command {
    let Some(ns) = ns else { return c };
    let mut w = Command::new("ip");
    w.args(["netns", "exec", ns])
        .arg(c.get_program())
        .args(c.get_args());
    w
}

/// [`run`] in network namespace `ns`.
fn run_in(ns: Option<&str>, dir: &Path, sock: &Path) -> Proc {
    let p = Proc(
        in_ns(ns, run_cmd(dir, Some(sock)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let t = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(t.elapsed() < Duration::from_secs(60), "no control socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    p
}

fn stop_vm(sock: &Path, p: &mut Proc) {
    assert_eq!(Client::connect(sock).call(r#"{"cmd":"stop"}"#)["ok"], true);
    assert!(p.0.wait().unwrap().success());
}

#[test]
fn run_resumes_and_suspends_a_qemu_vm_directory() {
    if !qemu() {
        return;
    }
    let mut s = Src::new();
    let st = Client::connect(&s.sock).call(r#"{"cmd":"status"}"#);
    assert_eq!(st["backend"], "qemu", "{st}");
    let before = look(&s.sock);
    stop_vm(&s.sock, &mut s.proc);
    let mut again = run(&s.p("vm"), &s.sock);
    let after = look(&s.sock);
    assert_eq!(after.sums, before.sums);
    assert!(after.count >= before.count, "the counter went back");
    stop_vm(&s.sock, &mut again);
}

#[test]
fn migrates_a_linux_guest_with_its_shared_disk() {
    if !qemu() {
        return;
    }
    let mut s = Src::new();
    let before = look(&s.sock);
    let (mut dst, addr) = s.recv(&s.key);
    let dsock = s.migrated(&addr, &["--shared-disk", "--max-rounds", "5"], &before);
    let st = s.json("stats.json");
    for k in [
        "total_ms",
        "downtime_ms",
        "downtime_target_ms",
        "downtime_parts",
        "downtime_estimate",
        "measured_costs",
        "bytes_on_wire",
        "rounds",
        "stop_reason",
        "throttled",
        "max_throttle_pct",
        "state_bytes",
        "final_pages",
        "final_digest_blocks",
        "per_round",
    ] {
        assert!(st.get(k).is_some(), "stats lack {k}: {st}");
    }
    assert!(st["rounds"].as_u64().unwrap() >= 2, "{st}");
    assert!(st["bytes_on_wire"].as_u64().unwrap() > 1 << 20, "{st}");
    // The guest's page cache holds app.bin (LOOK read it back): its pages
    // went as references to the shared disk's blocks, not as bytes.
    let refs = &st["measured_costs"]["disk_refs"];
    assert!(refs["pages"].as_u64().unwrap() >= 400, "{st}");
    assert!(refs["indexed_blocks"].as_u64().unwrap() >= 488, "{st}");
    // The digests committed in the pause (the disk's from what the receiver
    // hashed in the background while the guest ran on the source) are
    // those of the files: this guest does not write its disk.
    let dir = kimberley_formats::vmdir::VmDir::open(&s.p("dst")).unwrap();
    for (i, c) in dir.manifest.components.iter().enumerate() {
        if c.kind == kimberley_formats::vmdir::Kind::Memory
            || c.kind == kimberley_formats::vmdir::Kind::State
        {
            continue;
        }
        let f = dir.open_component(i).unwrap();
        assert_eq!(
            kimberley_formats::vmdir::dir::digest_file(&f, c.size).unwrap(),
            c.digest,
            "{}",
            dir.manifest.file_name(i)
        );
    }
    // The received VM is a VM directory that suspends and resumes.
    assert_eq!(
        Client::connect(&dsock).call(r#"{"cmd":"stop"}"#)["ok"],
        true
    );
    assert!(dst.wait_exit(Duration::from_secs(60)).success());
    let mut again = run(&s.p("dst"), &dsock);
    let resumed = look(&dsock);
    assert_eq!(resumed.sums, before.sums);
    stop_vm(&dsock, &mut again);
}

#[test]
fn migrates_a_linux_guest_rewriting_its_shared_disk() {
    // The guest rewrites a file on its shared disk in place while it
    // migrates: a page of it sent as a reference to its block, which the
    // guest rewrites (and syncs) before the receiver reads it, ends as the
    // source's page (the memory check), never as the block's new bytes.
    if !qemu() {
        return;
    }
    let mut s = Src::new();
    start_writer(&s.sock, INPLACE_WRITER);
    let before = look(&s.sock);
    let (_dst, addr) = s.recv(&s.key);
    let dsock = s.migrated(&addr, &["--shared-disk", "--max-rounds", "8"], &before);
    let c =
        Client::connect(&dsock).exec_timeout(&files_check("/mnt/app/p.*", 10000), Some(120_000));
    assert!(!c.iter().any(|l| l.starts_with("bad ")), "{c:?}");
    assert_eq!(value(&c, "good"), "1", "{c:?}");
    let st = s.json("stats.json");
    let refs = &st["measured_costs"]["disk_refs"];
    eprintln!("references: {refs}");
    assert!(refs["pages"].as_u64().unwrap() > 0, "{st}");
}

#[test]
fn a_shared_disk_block_that_differs_on_the_receiver_is_repaired() {
    // The receiver's view of the shared disk differs from the sender's in
    // every block of app.bin (as if the guest had rewritten them after the
    // sender read them): each reference to one rebuilds a page of the
    // guest's page cache of app.bin with other bytes, the receiver counts
    // it (its hash differs), and the memory check at the end of the stream
    // finds the page and sends it again: the guest resumes with the
    // source's memory.
    if !qemu() {
        return;
    }
    let mut s = Src::new();
    let sum = |sock: &Path| {
        let l = Client::connect(sock).exec_timeout(
            "echo \"app $(sha256sum /mnt/app/app.bin | cut -d' ' -f1)\"\n",
            Some(60_000),
        );
        value(&l, "app")
    };
    let before = sum(&s.sock);
    // The receiver's view: the same files, app.bin's blocks changed.
    let alt = s.p("alt");
    std::fs::create_dir(&alt).unwrap();
    for f in ["kernel", "initrd", "disk0.raw"] {
        std::fs::copy(s.p("vm").join(f), alt.join(f)).unwrap();
    }
    let o = Command::new("debugfs")
        .args(["-R", "blocks /app.bin"])
        .arg(alt.join("disk0.raw"))
        .output()
        .unwrap();
    let blocks: Vec<u64> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(|b| b.parse().unwrap())
        .collect();
    assert!(blocks.len() >= 488, "{o:?}");
    let disk = std::fs::OpenOptions::new()
        .write(true)
        .open(alt.join("disk0.raw"))
        .unwrap();
    for b in &blocks {
        use std::os::unix::fs::FileExt;
        disk.write_all_at(b"changed", b * 4096).unwrap();
    }
    drop(disk);
    let (_dst, addr) = receiver_seeing(
        &s.key,
        &s.p("vm/dst"),
        &[
            "--shared-disk-dir".as_ref(),
            s.t.path().as_os_str(),
            "--stats-json".as_ref(),
            s.p("rstats.json").as_os_str(),
        ],
        Duration::from_secs(20),
        (&alt, &s.p("vm")),
    );
    ok(s.send(&addr, &s.key, &["--shared-disk", "--max-rounds", "5"]));
    s.gone();
    // The received guest's page cache of app.bin is the source's.
    assert_eq!(sum(&alt.join("dst.sock")), before);
    let st = s.json("stats.json");
    let rst = s.json("rstats.json");
    let refs = &st["measured_costs"]["disk_refs"]["pages"];
    let missed = rst["disk_refs"]["missed"].as_u64().unwrap();
    assert!(missed as usize >= blocks.len() - 8, "{rst}");
    assert!(refs.as_u64().unwrap() >= missed, "{st}");
    let repaired = st["measured_costs"]["repaired_pages"].as_u64().unwrap();
    assert!(repaired >= missed, "{st}");
}

#[test]
fn migrates_a_linux_guest_copying_its_disk_while_it_writes() {
    if !qemu() {
        return;
    }
    let mut s = Src::new();
    start_writer(&s.sock, DISK_WRITER);
    let before = look(&s.sock);
    // A receiver with no shared directory: nothing can be linked.
    let (mut dst, addr) = receiver_showing(
        &s.key,
        &s.p("dst"),
        &["--stats-json".as_ref(), s.p("rstats.json").as_os_str()],
        Duration::from_secs(20),
        &s.p("recv.stdout"),
    );
    let dsock = s.migrated(&addr, &["--max-rounds", "5"], &before);
    // The files rewritten during the migration read back whole from the
    // received disk.
    let c = Client::connect(&dsock).exec_timeout(&files_check("/mnt/app/w.*", 3000), Some(120_000));
    assert!(!c.iter().any(|l| l.starts_with("bad ")), "{c:?}");
    assert_eq!(value(&c, "good"), "4", "{c:?}");
    // QEMU's own messages (its block migration prints its progress) are
    // not the guest's console: the receiver does not show them as such.
    let shown = std::fs::read_to_string(s.p("recv.stdout")).unwrap();
    assert!(
        !shown.contains("Completed ") && !shown.contains("block device images"),
        "{shown:?}"
    );
    // The received disk is a new file of the VM directory, not a link to
    // the source's.
    let (src_disk, dst_disk) = (s.p("vm/disk0.raw"), s.p("dst/disk0.raw"));
    use std::os::unix::fs::MetadataExt;
    assert_ne!(
        std::fs::metadata(&src_disk).unwrap().ino(),
        std::fs::metadata(&dst_disk).unwrap().ino()
    );
    let st = s.json("stats.json");
    assert!(st["bytes_on_wire"].as_u64().unwrap() > 2_000_000, "{st}");
    // The received VM suspends and resumes with its disk.
    assert_eq!(
        Client::connect(&dsock).call(r#"{"cmd":"stop"}"#)["ok"],
        true
    );
    assert!(dst.wait_exit(Duration::from_secs(60)).success());
    let mut again = run(&s.p("dst"), &dsock);
    assert_eq!(look(&dsock).sums, before.sums);
    stop_vm(&dsock, &mut again);
}

#[test]
fn a_wrong_key_leaves_the_source_running() {
    if !qemu() {
        return;
    }
    let mut s = Src::new();
    let before = look(&s.sock);
    let (_dst, addr) = s.recv(&s.key);
    let other = s.p("other.key");
    keygen(&other);
    let o = s.send(&addr, &other, &["--shared-disk"]);
    assert_eq!(
        o.status.code(),
        Some(kimberley_cli::exit::AUTH as i32),
        "a wrong key"
    );
    assert!(!s.p("dst").exists());
    s.intact(&before);
}

/// Two network namespaces joined by a veth pair (10.78.0.1 and
/// 10.78.0.2), each end shaped by a `tc tbf` qdisc; removed on drop.
struct Link {
    a: String,
    b: String,
}

impl Link {
    fn new(rate: &str) -> Option<Link> {
        let id = std::process::id();
        let (a, b) = (format!("kqm{id}a"), format!("kqm{id}b"));
        let ip = |args: &[&str]| {
            Command::new("ip")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ip(&["netns", "add", &a]) {
            // Only root can; CI runs the suites as root.
            // SAFETY: geteuid(2) has no memory-safety requirements.
            let euid = unsafe { libc::geteuid() };
            assert!(euid != 0, "ip netns add failed as root");
            eprintln!("skipping: ip netns needs root");
            return None;
        }
        let l = Link { a, b };
        assert!(ip(&["netns", "add", &l.b]));
        assert!(ip(&[
            "link", "add", "veth0", "netns", &l.a, "type", "veth", "peer", "name", "veth1",
            "netns", &l.b
        ]));
        for (ns, dev, addr) in [
            (&l.a, "veth0", "10.78.0.1/30"),
            (&l.b, "veth1", "10.78.0.2/30"),
        ] {
            let n = |args: &[&str]| {
                let mut v = vec!["netns", "exec", ns.as_str()];
                v.extend_from_slice(args);
                assert!(ip(&v), "{args:?}");
            };
            n(&["ip", "addr", "add", addr, "dev", dev]);
            n(&["ip", "link", "set", dev, "up"]);
            n(&["ip", "link", "set", "lo", "up"]);
            n(&[
                "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate, "burst", "32kbit",
                "latency", "400ms",
            ]);
        }
        Some(l)
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

#[test]
fn migrates_between_network_namespaces_over_a_shaped_link() {
    if !qemu() {
        return;
    }
    let Some(link) = Link::new("100mbit") else {
        return;
    };
    let mut s = Src::new_in(Some(&link.a));
    let before = look(&s.sock);
    let mut rcmd = Command::new(bin("vmigrate"));
    rcmd.args(["recv", "--listen", "10.78.0.2:7070", "-k"])
        .arg(&s.key)
        .arg("-o")
        .arg(s.p("dst"))
        .arg("--control")
        .arg(s.p("dst.sock"))
        .arg("--shared-disk-dir")
        .arg(s.t.path());
    let dst = Logged::spawn(&mut in_ns(Some(&link.b), rcmd), "recv");
    dst.line_starting(
        "vmigrate: waiting for a migration on ",
        Duration::from_secs(20),
    );
    let t = Instant::now();
    ok(s.send("10.78.0.2:7070", &s.key, &["--shared-disk"]));
    let took = t.elapsed();
    s.gone();
    let after = look(&s.p("dst.sock"));
    assert_eq!(
        after.sums, before.sums,
        "memory or disk differ after migration"
    );
    assert!(after.count > before.count, "the counter did not continue");
    let st = s.json("stats.json");
    // The link was the limit: what went over it took at least its time.
    let wire = st["bytes_on_wire"].as_f64().unwrap();
    assert!(
        took.as_secs_f64() >= wire / 12.5e6 * 0.9,
        "{wire} bytes in {took:?} over 100 Mbit/s"
    );
    drop(dst);
}

/// Where the guest must run after a fault.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Source,
    Receiver,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    /// Both directions closed; the frame is not forwarded.
    Cut,
    /// SIGKILL to the receiver; the frame is not forwarded.
    KillReceiver,
}

/// The fault matrix for QEMU guests: `fault` strikes just before `at`;
/// the guest must then run in exactly one place, intact.
/// A fault cell with shared disks.
fn cell(fault: Fault, at: At, expect: Expect) {
    cell_with(fault, at, expect, &["--shared-disk"]);
}

/// A fault `fault` at `at`, `send` given `send_args`: `expect` runs
/// intact afterwards and the other is gone.
fn cell_with(fault: Fault, at: At, expect: Expect, send_args: &[&str]) -> Option<Src> {
    if !qemu() {
        return None;
    }
    let mut s = Src::new();
    let before = look(&s.sock);
    let (dst, addr) = s.recv(&s.key);
    let dst_log = dst.err.clone();
    let (mut dst, _) = dst.into_parts();
    let dst_pid = dst.0.id();
    let strike: Arc<dyn Fn() -> bool + Send + Sync> = Arc::new(move || {
        if fault == Fault::KillReceiver {
            // SAFETY: kill(2) has no memory-safety requirements.
            unsafe { libc::kill(dst_pid as libc::pid_t, libc::SIGKILL) };
        }
        false
    });
    let (paddr, struck) = proxy(addr, at, strike);
    let o = s.send(&paddr, &s.key, send_args);
    assert!(
        *struck.lock().unwrap(),
        "{fault:?} at {at:?}: never reached"
    );
    let dst_runs = |dst: &mut Proc| {
        dst.0.try_wait().unwrap().is_none()
            && dst_log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.starts_with("VM running; control socket"))
    };
    match expect {
        Expect::Source => {
            assert!(!o.status.success(), "{fault:?} at {at:?}: send succeeded");
            s.intact(&before);
            assert!(!dst_runs(&mut dst), "{fault:?} at {at:?}: two copies");
        }
        Expect::Receiver => {
            assert!(o.status.success(), "{fault:?} at {at:?}: send failed");
            s.gone();
            let t = Instant::now();
            while !dst_runs(&mut dst) {
                assert!(t.elapsed() < Duration::from_secs(60), "no copy runs");
                std::thread::sleep(Duration::from_millis(100));
            }
            let g = look(&s.p("dst.sock"));
            assert_eq!(g.sums, before.sums, "{fault:?} at {at:?}: damaged guest");
            assert!(g.count > before.count);
        }
    }
    Some(s)
}

const fn frame(to_receiver: bool, ty: u8, nth: usize) -> At {
    At::Frame {
        to_receiver,
        ty,
        nth,
    }
}

#[test]
fn cut_at_start_keeps_the_source() {
    cell(Fault::Cut, frame(true, 1, 1), Expect::Source);
}

#[test]
fn cut_during_the_stream_keeps_the_source() {
    cell(Fault::Cut, frame(true, 11, 20), Expect::Source);
}

#[test]
fn receiver_killed_during_the_stream_keeps_the_source() {
    cell(Fault::KillReceiver, frame(true, 11, 40), Expect::Source);
}

#[test]
fn cut_at_the_memory_check_keeps_the_source() {
    cell(Fault::Cut, frame(false, 20, 1), Expect::Source);
}

#[test]
fn cut_at_commit_keeps_the_source() {
    cell(Fault::Cut, frame(true, 5, 1), Expect::Source);
}

#[test]
fn cut_at_running_leaves_the_receiver() {
    cell(Fault::Cut, frame(false, 16, 1), Expect::Receiver);
}

/// Copied disks: a cut while QEMU's stream carries them leaves the source
/// running on its intact disk, with QEMU's block migration off again (a
/// suspend afterwards writes device state only, not the disk).
#[test]
fn cut_while_the_disks_are_copied_keeps_the_source() {
    let Some(mut s) = cell_with(Fault::Cut, frame(true, 11, 20), Expect::Source, &[]) else {
        return;
    };
    stop_vm(&s.sock, &mut s.proc);
    let state = std::fs::metadata(s.p("vm/state.bin")).unwrap().len();
    assert!(
        state < 1_000_000,
        "the suspend wrote {state} bytes of state: the disk (2 MB of random data) went with it"
    );
}

/// A sender holding the key names host files as the boot files
/// (BOOT_FILES): the receiver refuses them before any VM data moves and
/// links nothing. The same messages naming the VM's own kernel beneath
/// the shared directory are taken (the receiver waits for the rest of
/// round 0): the refusals come from the paths, not from the rest.
#[test]
fn sender_cannot_choose_host_files_as_boot_files() {
    use std::os::unix::fs::MetadataExt;
    use vmigrate::channel;
    use vmigrate::protocol::{DiskInfo, MachineMsg, Message, Start};
    if !qemu() {
        return;
    }
    let _l = one_at_a_time();
    let tpl = template();
    let t = tempfile::tempdir().unwrap();
    let shared = t.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    ok(Command::new("cp")
        .args(["-a", "--sparse=always"])
        .arg(tpl.join("vm"))
        .arg(shared.join("vm"))
        .output()
        .unwrap());
    let vm = kimberley_formats::vmdir::VmDir::open(&shared.join("vm")).unwrap();
    let spec = *vm.manifest.machine.clone().unwrap();
    let size = |k| {
        vm.manifest
            .components
            .iter()
            .find(|c| c.kind == k)
            .unwrap()
            .size
    };
    use kimberley_formats::vmdir::Kind;
    let (mem, kernel, initrd, disk) = (
        size(Kind::Memory),
        size(Kind::Kernel),
        size(Kind::Initrd),
        size(Kind::Disk),
    );
    let key = [7u8; 32];
    let key_path = t.path().join("key");
    std::fs::write(&key_path, key).unwrap();
    // A host file the sender must not get at, of the kernel's size.
    let secret = t.path().join("secret");
    std::fs::write(&secret, vec![0x5a; kernel as usize]).unwrap();
    std::os::unix::fs::symlink(&secret, shared.join("link")).unwrap();
    let s = |p: &Path| p.to_str().unwrap().to_string();
    let own = s(&shared.join("vm/kernel"));
    let cases = [
        ("outside the directory", s(&secret), false),
        ("a symlink inside", s(&shared.join("link")), false),
        (
            "dot-dot out",
            format!("{}/vm/../../secret", s(&shared)),
            false,
        ),
        ("the VM's own kernel", own, true),
    ];
    for (what, path, taken) in cases {
        let out = t.path().join("out");
        let (r, addr) = receiver(
            &key_path,
            &out,
            &["--shared-disk-dir".as_ref(), shared.as_os_str()],
            Duration::from_secs(20),
        );
        let c = std::net::TcpStream::connect(&addr).unwrap();
        let (mut tx, mut rx) = channel::handshake_sender(c, &key).unwrap();
        tx.send(Message::Start(Start {
            memory_size: mem,
            vcpus: 1,
            shared_disk: true,
            stream: true,
            disks: vec![DiskInfo {
                size: disk,
                path: s(&std::fs::canonicalize(shared.join("vm/disk0.raw")).unwrap()),
            }],
        }))
        .unwrap();
        tx.send(Message::Machine(Box::new(MachineMsg {
            kernel_size: kernel,
            initrd_size: initrd,
            spec: spec.clone(),
        })))
        .unwrap();
        tx.send(Message::BootFiles {
            kernel: path,
            initrd: s(&shared.join("vm/initrd")),
        })
        .unwrap();
        rx.stream()
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let m = rx.recv().ok();
        if taken {
            assert!(m.is_none(), "{what}: the receiver answered {m:?}");
        } else {
            assert!(
                matches!(&m, Some(Message::Error(_))),
                "{what}: the receiver answered {m:?}"
            );
            assert!(!out.exists(), "{what}: OUT exists");
        }
        let meta = std::fs::metadata(&secret).unwrap();
        assert_eq!(meta.nlink(), 1, "{what}: the host file was linked");
        drop(r);
    }
}
