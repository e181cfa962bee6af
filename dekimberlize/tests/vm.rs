//! The KVM end to end: `kimberlize base` → `kimberlize build` →
//! `dekimberlize --run`, with correctness shown through the guest, and the
//! VM failure modes. These tests need /dev/kvm; with
//! KIMBERLEY_REQUIRE_KVM=1 (set by scripts/test.sh when /dev/kvm exists)
//! they fail instead of skipping.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use common::*;
use kimberley_formats::vmdir::VmDir;

fn lines(b: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(b)
        .lines()
        .map(str::to_string)
        .collect()
}

const INSTALL: &str = "# an application install
print installing
fill app 24M 1 text
fill lib 8M 2 random
fill scratch 4M 0 zero
disk-write 0 4M 3
disk-write 64M 1M 4
checksum app
checksum lib
checksum scratch
disk-checksum 0 4M
disk-checksum 64M 1M
counter start
";
const RESUME: &str = "sleep 50\ncounter\nprint waiting for the user\n";

struct Setup {
    t: tempfile::TempDir,
    key: PathBuf,
    base: PathBuf,
}

impl Setup {
    fn new() -> Setup {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("key");
        ok(run(Command::new(bin("kimberlize"))
            .args(["keygen", "-o"])
            .arg(&key)));
        let base = t.path().join("base");
        ok(run(Command::new(bin("kimberlize"))
            .args(["base", "--memory", "128M", "--disk", "256M", "-o"])
            .arg(&base)));
        for (n, s) in [("install", INSTALL), ("resume", RESUME), ("install-x", "")] {
            std::fs::write(t.path().join(n), s).unwrap();
        }
        Setup { t, key, base }
    }

    fn p(&self, n: &str) -> PathBuf {
        self.t.path().join(n)
    }

    fn build(&self, install: &str, extra: &[&str]) -> Output {
        std::fs::write(self.p("install-x"), install).unwrap();
        run(Command::new(bin("kimberlize"))
            .args(["build", "--base"])
            .arg(&self.base)
            .arg("--install")
            .arg(self.p("install-x"))
            .arg("--resume")
            .arg(self.p("resume"))
            .arg("-k")
            .arg(&self.key)
            .args(extra))
    }
}

struct Running {
    child: Child,
    sock: PathBuf,
}

impl Running {
    fn start(s: &Setup, args: &[&Path], out: &Path, tag: &str) -> Running {
        let sock = s.p(&format!("{tag}.sock"));
        let stats = s.p(&format!("{tag}.json"));
        let child = Command::new(bin("dekimberlize"))
            .args(args)
            .arg("-k")
            .arg(&s.key)
            .arg("-o")
            .arg(out)
            .arg("--run")
            .arg("--control")
            .arg(&sock)
            .arg("--stats-json")
            .arg(&stats)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Waits (60 s at most) for the control socket.
        drop(Client::connect(&sock));
        Running { child, sock }
    }

    /// Runs a script that must succeed (the server's timeout).
    fn exec(&self, script: &str) -> Vec<String> {
        Client::open(&self.sock).exec_timeout(script, None)
    }

    fn stop(mut self) -> Output {
        assert_eq!(
            Client::open(&self.sock).call(r#"{"cmd":"stop"}"#)["ok"],
            true
        );
        let mut out = Vec::new();
        let mut err = Vec::new();
        use std::io::Read;
        self.child
            .stdout
            .take()
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
        self.child
            .stderr
            .take()
            .unwrap()
            .read_to_end(&mut err)
            .unwrap();
        let status = self.child.wait().unwrap();
        Output {
            status,
            stdout: out,
            stderr: err,
        }
    }
}

#[test]
fn build_synthesise_and_resume_where_it_was() {
    if !kvm() {
        return;
    }
    let s = Setup::new();
    let base_before = std::fs::read(s.base.join("manifest.json")).unwrap();
    let ovl = s.p("app.ovl");
    let built = ok(s.build(
        INSTALL,
        &[
            "-o",
            ovl.to_str().unwrap(),
            "--launch-out",
            s.p("launch").to_str().unwrap(),
            "--stats-json",
            s.p("build.json").to_str().unwrap(),
        ],
    ));
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.p("build.json")).unwrap()).unwrap();
    assert_eq!(stats["schema"], 1, "{stats}");
    // Trim is asked of every backend; the microVM's guest has no file
    // system, and says so.
    assert_eq!(stats["reclaim"]["applicable"], false, "{stats}");
    assert!(
        stats["reclaim"]["notes"][0]
            .as_str()
            .unwrap()
            .contains("no file system"),
        "{stats}"
    );
    // The guest's output went to stderr, line by line.
    let printed = lines(&built.stderr);
    assert!(printed.contains(&"installing".to_string()), "{printed:?}");
    let counter0: u64 = value(&printed, "counter").parse().unwrap();
    // The base is untouched.
    assert_eq!(
        std::fs::read(s.base.join("manifest.json")).unwrap(),
        base_before
    );
    VmDir::open(&s.base).unwrap().verify().unwrap();

    let out = s.p("out");
    let r = Running::start(
        &s,
        &[Path::new("--base"), &s.base, Path::new("-i"), &ovl],
        &out,
        "run1",
    );
    // `sleep` runs the guest's background work (the counter) at least once,
    // however little CPU the guest got since it resumed.
    let got = r.exec("checksum app\nchecksum lib\nchecksum scratch\ndisk-checksum 0 4M\ndisk-checksum 64M 1M\nsleep 1\ncounter\n");
    for what in [
        "checksum app",
        "checksum lib",
        "checksum scratch",
        "disk-checksum 0 4M",
        "disk-checksum 64M 1M",
    ] {
        assert_eq!(value(&got, what), value(&printed, what), "{what}");
    }
    let counter1: u64 = value(&got, "counter").parse().unwrap();
    assert!(
        counter1 > counter0,
        "counter went from {counter0} to {counter1}"
    );
    r.exec("fill later 1M 9 random\ndisk-write 8M 1M 5\n");
    let after = r.exec("checksum later\ndisk-checksum 8M 1M\ncounter\n");
    let stopped = r.stop();
    assert!(
        stopped.status.success(),
        "{}",
        String::from_utf8_lossy(&stopped.stderr)
    );
    assert!(lines(&stopped.stdout).contains(&"kimberley: launch VM resumed".to_string()));
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.p("run1.json")).unwrap()).unwrap();
    for k in ["receive_ms", "apply_ms", "resume_ms", "first_answer_ms"] {
        assert!(stats["times"][k].is_u64(), "{k} missing from {stats}");
    }
    assert_eq!(stats["schema"], 1, "{stats}");

    // Suspended cleanly into the VMDIR, losing nothing: run it again.
    VmDir::open(&out).unwrap().verify().unwrap();
    let again = s.p("again");
    std::fs::rename(&out, &again).unwrap();
    // Resume it directly: an empty chain is not allowed, so use the VMDIR
    // through a no-op overlay made against itself.
    let noop = s.p("noop.ovl");
    ok(run(Command::new(bin("kimberlize"))
        .args(["diff", "--base"])
        .arg(&again)
        .arg("--launch")
        .arg(&again)
        .arg("-k")
        .arg(&s.key)
        .arg("-o")
        .arg(&noop)));
    let r = Running::start(
        &s,
        &[Path::new("--base"), &again, Path::new("-i"), &noop],
        &out,
        "run2",
    );
    let got = r.exec("checksum later\ndisk-checksum 8M 1M\nchecksum app\ncounter\n");
    assert_eq!(
        value(&got, "checksum later"),
        value(&after, "checksum later")
    );
    assert_eq!(
        value(&got, "disk-checksum 8M 1M"),
        value(&after, "disk-checksum 8M 1M")
    );
    assert_eq!(value(&got, "checksum app"), value(&printed, "checksum app"));
    let c2: u64 = value(&got, "counter").parse().unwrap();
    assert!(
        c2 > value(&after, "counter").parse::<u64>().unwrap(),
        "counter went back"
    );
    assert!(r.stop().status.success());
}

/// Issue 10: a guest that writes 32 MiB and discards it leaves a hole in the
/// launch VM's disk, and the overlay costs about what one without the
/// write does; without the discard it is over 32 MiB bigger. Resumed, the
/// region reads as zeros.
#[test]
fn discarded_disk_blocks_cost_nothing_in_the_overlay() {
    if !kvm() {
        return;
    }
    let s = Setup::new();
    let size = |n: &str| std::fs::metadata(s.p(n)).unwrap().len();
    let build = |install: &str, name: &str, launch: &str| {
        let (o, l) = (s.p(name), s.p(launch));
        ok(s.build(
            install,
            &[
                "-o",
                o.to_str().unwrap(),
                "--launch-out",
                l.to_str().unwrap(),
            ],
        ))
    };
    let common = "disk-write 0 4M 3\n";
    build(common, "none.ovl", "launch-none");
    let written = format!("{common}disk-write 32M 32M 7\ndisk-checksum 32M 32M\n");
    let kept = build(&written, "kept.ovl", "launch-kept");
    let discarded = build(
        &format!(
            "{written}disk-discard 32M 32M\ndisk-checksum 32M 32M\n\
             disk-checksum 128M 32M\ndisk-checksum 0 4M\n"
        ),
        "discarded.ovl",
        "launch-discarded",
    );
    let (none, kept_size, disc) = (size("none.ovl"), size("kept.ovl"), size("discarded.ovl"));
    eprintln!("overlay bytes: no write {none}, written {kept_size}, written then discarded {disc}");
    assert!(kept_size > none + (32 << 20), "{kept_size} vs {none}");
    assert!(disc < none + (64 << 10), "{disc} vs {none}");
    // The guest wrote the data (its checksum was not of zeros), then the
    // range read as zeros (the checksum of a never-written range).
    let printed = lines(&discarded.stderr);
    let sums: Vec<&str> = (printed.iter())
        .filter_map(|l| l.strip_prefix("disk-checksum 32M 32M "))
        .collect();
    assert_eq!(sums.len(), 2, "{printed:?}");
    let data = value(&lines(&kept.stderr), "disk-checksum 32M 32M");
    let zeros = value(&printed, "disk-checksum 128M 32M");
    assert_ne!(data, zeros);
    assert_eq!(sums, vec![data.as_str(), zeros.as_str()]);
    // The launch VM's disk has a hole there; the one that kept the data
    // does not.
    let disk_extents = |launch: &str| {
        let v = VmDir::open(&s.p(launch)).unwrap();
        let i = (v.manifest.components.iter())
            .position(|c| c.kind == kimberley_formats::vmdir::Kind::Disk)
            .unwrap();
        let f = v.open_component(i).unwrap();
        kimberley_formats::sparse::data_extents(&f, v.manifest.components[i].size).unwrap()
    };
    let overlaps = |ext: &[(u64, u64)]| ext.iter().any(|&(a, b)| a < 64 << 20 && b > 32 << 20);
    let ext = disk_extents("launch-discarded");
    assert!(!overlaps(&ext), "data in the discarded range: {ext:?}");
    assert!(overlaps(&disk_extents("launch-kept")));

    // Resumed from the overlay, the range reads as zeros in the guest.
    let out = s.p("out");
    let r = Running::start(
        &s,
        &[
            Path::new("--base"),
            &s.base,
            Path::new("-i"),
            &s.p("discarded.ovl"),
        ],
        &out,
        "run-discard",
    );
    let got = r.exec("disk-checksum 32M 32M\ndisk-checksum 0 4M\n");
    assert_eq!(value(&got, "disk-checksum 32M 32M"), zeros);
    assert_eq!(
        value(&got, "disk-checksum 0 4M"),
        value(&printed, "disk-checksum 0 4M")
    );
    assert!(r.stop().status.success());
}

#[test]
fn vm_failures_are_clear_and_leave_nothing() {
    if !kvm() {
        return;
    }
    let s = Setup::new();
    let listing = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    let before = listing(s.t.path());
    let check = |o: Output, want: &str| {
        assert_eq!(
            o.status.code(),
            Some(9),
            "{}",
            String::from_utf8_lossy(&o.stderr)
        );
        let e = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(e.contains(want), "{e:?} lacks {want:?}");
        assert_eq!(listing(s.t.path()), before, "left something behind");
        VmDir::open(&s.base).unwrap().verify().unwrap();
    };
    let o = s.p("x.ovl");
    let o = o.to_str().unwrap();
    check(
        s.build("print a\nbogus-command 1\n", &["-o", o]),
        "error 2:",
    );
    check(
        s.build("print a\nbogus-command 1\n", &["-o", o]),
        "install script failed",
    );
    check(s.build("debug-triple-fault\n", &["-o", o]), "triple fault");
    check(
        s.build("debug-hang\n", &["-o", o, "--timeout", "2"]),
        "timed out",
    );
    // A state blob of another version.
    let bad = s.p("badver");
    std::fs::create_dir(&bad).unwrap();
    for f in ["manifest.json", "memory.raw", "disk0.raw", "state.bin"] {
        std::fs::copy(s.base.join(f), bad.join(f)).unwrap();
    }
    let mut st = std::fs::read(bad.join("state.bin")).unwrap();
    st[8] ^= 0x7f; // the version field follows the 8-byte magic
    std::fs::write(bad.join("state.bin"), st).unwrap();
    let r = run(Command::new(bin("kimberlize"))
        .args(["build", "--base"])
        .arg(&bad)
        .arg("--install")
        .arg(s.p("install"))
        .arg("--resume")
        .arg(s.p("resume"))
        .arg("--no-encrypt")
        .arg("-o")
        .arg(s.p("y.ovl")));
    assert_eq!(
        r.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert!(
        String::from_utf8_lossy(&r.stderr).contains("version"),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    std::fs::remove_dir_all(&bad).unwrap();
    // An unreadable VMDIR.
    let r = run(Command::new(bin("kimberlize"))
        .args(["build", "--base"])
        .arg(s.p("nonexistent"))
        .arg("--install")
        .arg(s.p("install"))
        .arg("--resume")
        .arg(s.p("resume"))
        .arg("--no-encrypt")
        .arg("-o")
        .arg(s.p("y.ovl")));
    assert_eq!(
        r.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&r.stderr)
    );
    assert_eq!(listing(s.t.path()), before);
}

#[test]
fn no_usable_kvm_is_a_clear_error() {
    if !kvm() {
        return;
    }
    // Hide /dev/kvm behind /dev/null in a private mount namespace.
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("base");
    let script = format!(
        "mount --bind /dev/null /dev/kvm && exec {} base -o {}",
        bin("kimberlize").display(),
        out.display()
    );
    let o = run(Command::new("unshare").args([
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        &script,
    ]));
    assert_eq!(
        o.status.code(),
        Some(9),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("/dev/kvm") && e.starts_with("error: "), "{e}");
    assert_eq!(std::fs::read_dir(t.path()).unwrap().count(), 0);
}

/// Feeds `bytes` into `stdin` at about `rate` bytes per second in 64 KiB
/// pieces (all of them, or the first `upto`), then closes it; returns when
/// the last byte was written.
fn feed(
    mut stdin: std::process::ChildStdin,
    bytes: Vec<u8>,
    rate: u64,
    upto: usize,
) -> std::thread::JoinHandle<std::time::Instant> {
    use std::io::Write;
    std::thread::spawn(move || {
        let t0 = std::time::Instant::now();
        let mut sent = 0usize;
        for piece in bytes[..upto].chunks(64 << 10) {
            if stdin.write_all(piece).is_err() {
                break;
            }
            sent += piece.len();
            let due = std::time::Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(t0.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        std::time::Instant::now()
    })
}

/// `dekimberlize --run --early-start` reading `ovl` from a pipe fed at
/// `rate` (the first `upto` bytes): the child, the feeder, the socket.
fn early(
    s: &Setup,
    ovl: &Path,
    out: &Path,
    tag: &str,
    rate: u64,
    upto: Option<usize>,
) -> (Child, std::thread::JoinHandle<std::time::Instant>, PathBuf) {
    let sock = s.p(&format!("{tag}.sock"));
    let mut child = Command::new(bin("dekimberlize"))
        .arg("--base")
        .arg(&s.base)
        .arg("-k")
        .arg(&s.key)
        .arg("-o")
        .arg(out)
        .args(["--run", "--early-start", "--control"])
        .arg(&sock)
        .arg("--stats-json")
        .arg(s.p(&format!("{tag}.json")))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let bytes = std::fs::read(ovl).unwrap();
    let n = upto.unwrap_or(bytes.len());
    let fed = feed(child.stdin.take().unwrap(), bytes, rate, n);
    (child, fed, sock)
}

/// Issue 11: `build --early-start` records the pages the resumed launch VM
/// touches (its resume script checksums `lib`) and writes them first in a
/// version-2 overlay. Arriving through a slow pipe, the overlay's VM runs
/// and answers that checksum before the last byte; once everything
/// arrived, every checksum is the install's and the VMDIR is committed;
/// the statistics say how little had arrived. Cut at 50 % or with a flipped
/// bit in a late segment, the VM that already ran is killed and nothing is
/// left, with the exit codes of a full apply (3, 4). A version-1 overlay is
/// applied in full first.
#[test]
fn early_start_runs_the_guest_before_the_overlay_has_arrived() {
    if !kvm() {
        return;
    }
    let s = Setup::new();
    std::fs::write(s.p("resume"), "counter start\nchecksum lib\nsleep 20\n").unwrap();
    let launch = s.p("launch");
    let v2 = s.p("v2.ovl");
    let ws = s.p("ws");
    let built = ok(s.build(
        INSTALL,
        &[
            "-o",
            v2.to_str().unwrap(),
            "--launch-out",
            launch.to_str().unwrap(),
            "--early-start",
            "--working-set-out",
            ws.to_str().unwrap(),
        ],
    ));
    let printed = lines(&built.stderr);
    // The 8 MiB `lib` region, at least, in first-touch order.
    let recorded = kimberley_formats::working_set::parse(&std::fs::read(&ws).unwrap()).unwrap();
    assert!(recorded.len() >= 2048, "{} pages recorded", recorded.len());
    let size = std::fs::metadata(&v2).unwrap().len();
    // About 6 s of transfer, whatever the overlay's size.
    let rate = size / 6;
    let out = s.p("out");
    let (child, fed, sock) = early(&s, &v2, &out, "e1", rate, None);
    let mut c = Client::connect(&sock);
    let status = c.call(r#"{"cmd":"status"}"#);
    assert_eq!(status["status"], "running", "{status}");
    let first = c.exec_timeout("checksum lib\n", None);
    let answered = std::time::Instant::now();
    let got = Client::open(&sock).exec_timeout(
        "checksum app\nchecksum scratch\ndisk-checksum 0 4M\ndisk-checksum 64M 1M\n",
        None,
    );
    let last_byte = fed.join().unwrap();
    assert!(
        answered < last_byte,
        "the guest answered {:?} after the last byte",
        answered - last_byte
    );
    assert_eq!(
        value(&first, "checksum lib"),
        value(&printed, "checksum lib")
    );
    for what in [
        "checksum app",
        "checksum scratch",
        "disk-checksum 0 4M",
        "disk-checksum 64M 1M",
    ] {
        assert_eq!(value(&got, what), value(&printed, what), "{what}");
    }
    // Committed once everything arrived and checked; the statistics come
    // with it.
    let t = std::time::Instant::now();
    while !s.p("e1.json").exists() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(60),
            "no statistics"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let stats: serde_json::Value =
        serde_json::from_slice(&std::fs::read(s.p("e1.json")).unwrap()).unwrap();
    let e = &stats["early_start"];
    assert_eq!(e["overlay_bytes"], size, "{stats}");
    let at_first = e["received_bytes_at_first_instruction"].as_u64().unwrap();
    assert!(at_first < size / 2, "{stats}");
    assert!(e["pages_from_overlay"].as_u64().unwrap() > 0, "{stats}");
    assert!(e["faults"].as_u64().unwrap() > 0, "{stats}");
    assert!(e["prefetched_bytes"].is_u64(), "{stats}");
    VmDir::open(&out).unwrap().verify().unwrap();
    assert_eq!(Client::open(&sock).call(r#"{"cmd":"stop"}"#)["ok"], true);
    let (st, err) = finish(child);
    assert!(st.success(), "{err}");
    assert!(err.contains("launch VM suspended into"), "{err}");
    VmDir::open(&out).unwrap().verify().unwrap();

    // Cut at 50 %, or a flipped bit at 80 %: the VM ran, and is killed.
    let bytes = std::fs::read(&v2).unwrap();
    let mut bad = bytes.clone();
    bad[bytes.len() * 4 / 5] ^= 1;
    std::fs::write(s.p("bad.ovl"), &bad).unwrap();
    for (tag, ovl, upto, code_want) in [
        ("cut", v2.clone(), Some(bytes.len() / 2), 3),
        ("flip", s.p("bad.ovl"), None, 4),
    ] {
        let out = s.p(tag);
        let (child, fed, sock) = early(&s, &ovl, &out, tag, rate, upto);
        assert_eq!(
            Client::connect(&sock).call(r#"{"cmd":"status"}"#)["status"],
            "running",
            "{tag}"
        );
        fed.join().unwrap();
        let (st, err) = finish(child);
        assert_eq!(st.code(), Some(code_want), "{tag}: {err}");
        assert!(!out.exists(), "{tag}: the launch VM was kept");
        assert!(
            temps(s.t.path()).is_empty(),
            "{tag}: {:?}",
            temps(s.t.path())
        );
        assert!(!sock.exists(), "{tag}: the control socket was left");
    }

    // A version-1 overlay: applied in full first, with a note.
    let v1 = s.p("v1.ovl");
    ok(diff(
        &s.base,
        &launch,
        &v1,
        &["-k".as_ref(), s.key.as_os_str()],
    ));
    let out = s.p("out-v1");
    let (child, fed, sock) = early(&s, &v1, &out, "e3", rate * 4, None);
    let mut c = Client::connect(&sock);
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "running");
    let last = fed.join().unwrap();
    let _ = last;
    assert!(
        out.join("manifest.json").exists(),
        "not applied in full first"
    );
    assert_eq!(c.call(r#"{"cmd":"stop"}"#)["ok"], true);
    let (st, err) = finish(child);
    assert!(st.success(), "{err}");
    assert!(err.contains("no coverage map"), "{err}");
}
