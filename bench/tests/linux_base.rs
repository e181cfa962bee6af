//! `scripts/linux-base.sh`: usage errors, missing tools, and a real `-o
//! --busybox` base under QEMU (fails instead of skipping with
//! KIMBERLEY_REQUIRE_QEMU=1).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/linux-base.sh")
}

/// The directory of the workspace's binaries (beside this package's).
fn bin_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_kimberley-bench"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A fresh directory, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static N: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "kimberley-linux-base-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir(&p).unwrap();
        Scratch(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &[][..],
        &["--bogus"],
        &["-o"],
        &["-o", "/nonexistent/x", "--vcpus", "0"],
        &["-o", "/nonexistent/x", "--disk-size", "lots"],
        &["-o", "/nonexistent/x", "--init", "sysv"],
        &["-o", "/nonexistent/x", "--timeout", "-1"],
    ] {
        let o = run(Command::new(script()).args(args));
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).starts_with("linux-base.sh: "),
            "{args:?}: {}",
            stderr(&o)
        );
    }
}

#[test]
fn help_teaches_and_exits_0() {
    let o = run(Command::new(script()).arg("--help"));
    assert_eq!(o.status.code(), Some(0));
    let h = String::from_utf8_lossy(&o.stdout);
    for s in [
        "-o VMDIR",
        "--busybox",
        "--disk-size",
        "debootstrap",
        "Example:",
    ] {
        assert!(h.contains(s), "--help lacks {s}: {h}");
    }
}

#[test]
fn an_existing_vmdir_is_refused_with_6() {
    let t = Scratch::new();
    let o = run(Command::new(script()).args(["--busybox", "-o"]).arg(&t.0));
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(stderr(&o).contains("exists"), "{}", stderr(&o));
}

/// A PATH holding only what the script needs before its tool checks, plus
/// `extra` (names from /usr/bin or /usr/sbin).
fn bare_path(dir: &Path, extra: &[&str]) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for t in ["readlink", "realpath", "dirname", "id", "sed"]
        .iter()
        .chain(extra)
    {
        let src = ["/usr/bin", "/bin", "/usr/sbin", "/sbin"]
            .iter()
            .map(|d| Path::new(d).join(t))
            .find(|p| p.exists())
            .unwrap_or_else(|| panic!("{t} not found on this host"));
        std::os::unix::fs::symlink(src, bin.join(t)).unwrap();
    }
    bin
}

#[test]
fn missing_tools_are_named() {
    let t = Scratch::new();
    let bin = bare_path(&t.0, &[]);
    let o = run(Command::new("/bin/bash")
        .arg(script())
        .args(["--busybox", "-o"])
        .arg(t.0.join("vm"))
        .env("PATH", &bin));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("qemu-system-x86_64 not found (apt-get install qemu-system-x86)"),
        "{}",
        stderr(&o)
    );

    // The Debian root needs debootstrap; said before anything is built.
    let t = Scratch::new();
    let bin = bare_path(&t.0, &["qemu-system-x86_64"]);
    let o = run(Command::new("/bin/bash")
        .arg(script())
        .arg("-o")
        .arg(t.0.join("vm"))
        .env("PATH", &bin));
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("debootstrap not found"),
        "{}",
        stderr(&o)
    );
    assert!(!t.0.join("vm").exists());
}

fn qemu() -> bool {
    let ok = Command::new("qemu-system-x86_64")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var("KIMBERLEY_REQUIRE_QEMU").as_deref() != Ok("1"),
            "qemu-system-x86_64 cannot be run and KIMBERLEY_REQUIRE_QEMU=1"
        );
        eprintln!("skipping: no qemu-system-x86_64");
    }
    ok
}

#[test]
fn busybox_base_boots_and_suspends() {
    if !qemu() {
        return;
    }
    let kimberlize = bin_dir().join("kimberlize");
    assert!(
        kimberlize.exists(),
        "{} is missing: build the workspace binaries first (cargo build --bins)",
        kimberlize.display()
    );
    // The artifacts cache the Linux end-to-end tests share (same lock).
    let target = bin_dir().parent().unwrap().to_path_buf();
    let t = Scratch::new();
    let vm = t.0.join("base");
    let o = run(Command::new("flock")
        .arg(target.join("kimberley-linux-artifacts.lock"))
        .arg(script())
        .args([
            "--busybox",
            "--memory",
            "128M",
            "--disk-size",
            "64M",
            "--artifacts",
        ])
        .arg(target.join("kimberley-linux-artifacts"))
        .arg("-o")
        .arg(&vm)
        .env("KIMBERLIZE", &kimberlize)
        .env("TMPDIR", &t.0));
    let e = stderr(&o);
    assert!(o.status.success(), "{e}");
    assert!(
        e.contains(&format!("using {}", kimberlize.display())),
        "{e}"
    );
    assert!(e.contains("Linux base VM ready and suspended"), "{e}");
    for (f, len) in [("memory.raw", 128 << 20), ("disk0.raw", 64 << 20)] {
        assert_eq!(std::fs::metadata(vm.join(f)).unwrap().len(), len, "{f}");
    }
    assert!(vm.join("manifest.json").exists());
    assert!(vm.join("state.bin").exists());
    // The empty disk was a temporary file (in TMPDIR): nothing of it is left.
    let left: Vec<_> = std::fs::read_dir(&t.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, [std::ffi::OsString::from("base")]);

    // A second -o on the same directory: refused, the VM untouched.
    let o = run(Command::new(script())
        .args(["--busybox", "-o"])
        .arg(&vm)
        .env("KIMBERLIZE", &kimberlize));
    assert_eq!(o.status.code(), Some(6), "{}", stderr(&o));
    assert!(vm.join("manifest.json").exists());
}
