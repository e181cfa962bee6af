//! Shared by the dekimberlize test suites: the tools' paths and runs, and
//! (one home with the vmm, vmigrate and formats suites) the control-socket
//! client, the tools as processes, and crafted overlay bytes.

#![allow(dead_code)]

#[path = "../../../formats/tests/common/crafted.rs"]
pub mod crafted;
#[path = "../../../vmm/tests/common/ctl.rs"]
pub mod ctl;
#[path = "../../../qemu/tests/common/guest.rs"]
pub mod linux_guest;
#[path = "../../../vmm/tests/common/tools.rs"]
pub mod tools;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kimberley_formats::testkit::{make_pair, Pair, PairSpec};

// What every suite may use; not every suite does.
#[allow(unused_imports)]
pub use ctl::{value, Client};
#[allow(unused_imports)]
pub use tools::{keygen, make_base, ok, stop, Logged};

/// A workspace binary: both tools are built into the same directory.
pub fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_dekimberlize")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --bins)",
        p.display()
    );
    p
}

/// True if KVM tests can run; panics if they must (KIMBERLEY_REQUIRE_KVM=1).
pub fn kvm() -> bool {
    kimberley_vmm::kvm_for_tests()
}

/// Runs `cmd` with no stdin; returns its output.
pub fn run(cmd: &mut Command) -> Output {
    cmd.stdin(Stdio::null()).output().unwrap()
}

/// Runs a Kimberley binary with arguments (anything `AsRef<OsStr>`).
#[allow(unused_macros)]
macro_rules! tool {
    ($name:expr $(, $arg:expr)* $(,)?) => {{
        let mut c = std::process::Command::new($crate::common::bin($name));
        $( c.arg($arg); )*
        $crate::common::run(&mut c)
    }};
}
#[allow(unused_imports)]
pub(crate) use tool;

pub fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

/// Sends `sig` to `child` (its stderr piped), waits for it to exit;
/// returns the exit code and everything it wrote on stderr.
pub fn interrupt(child: std::process::Child, sig: libc::c_int) -> (i32, String) {
    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
    let (st, err) = finish(child);
    let code = st
        .code()
        .unwrap_or_else(|| panic!("killed by a signal ({st}): {err}"));
    (code, err)
}

/// Reads all `child` writes on stderr (piped) and waits for it to exit.
pub fn finish(mut child: std::process::Child) -> (std::process::ExitStatus, String) {
    use std::io::Read;
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    (child.wait().unwrap(), err)
}

/// Entries of `dir` named like a temporary output (`.NAME.tmp-PID-N`).
pub fn temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.') && n.contains(".tmp-"))
        .collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A base and launch VM (`make_pair`) in `dir`, and a new key file `dir/key`.
pub fn setup(dir: &Path) -> (Pair, PathBuf) {
    setup_with(dir, &PairSpec::default())
}

/// [`setup`] with the pair made as `spec` says.
pub fn setup_with(dir: &Path, spec: &PairSpec) -> (Pair, PathBuf) {
    let pair = make_pair(dir, spec).unwrap();
    let key = dir.join("key");
    keygen(&key);
    (pair, key)
}

/// `kimberlize diff -q --base BASE --launch LAUNCH -o OUT ARGS...` (ARGS:
/// the secret, `--parent`, `--stats-json`...).
pub fn diff(base: &Path, launch: &Path, out: &Path, args: &[&OsStr]) -> Output {
    let mut c = Command::new(bin("kimberlize"));
    c.args(["diff", "-q", "--base"])
        .arg(base)
        .arg("--launch")
        .arg(launch)
        .arg("-o")
        .arg(out)
        .args(args);
    run(&mut c)
}

/// A chain of two layers on `p.base` under `key`, in `dir`: `l1.ovl` gives
/// `p.launch`, `l2.ovl` on top of it gives the launch VM of
/// [`second_pair`], which is returned with them.
pub fn two_layers(dir: &Path, p: &Pair, key: &Path) -> (PathBuf, PathBuf, Pair) {
    let p2 = second_pair(dir);
    let (l1, l2) = (dir.join("l1.ovl"), dir.join("l2.ovl"));
    ok(diff(
        &p.base,
        &p.launch,
        &l1,
        &["-k".as_ref(), key.as_os_str()],
    ));
    ok(diff(
        &p.base,
        &p2.launch,
        &l2,
        &[
            "--parent".as_ref(),
            l1.as_os_str(),
            "-k".as_ref(),
            key.as_os_str(),
        ],
    ));
    (l1, l2, p2)
}

/// Writes `path` readable and writable by its owner only, as a key or
/// passphrase file should be.
pub fn write_private(path: &Path, bytes: impl AsRef<[u8]>) {
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// A second base and launch VM, from another seed, in `dir/2`.
pub fn second_pair(dir: &Path) -> Pair {
    let d2 = dir.join("2");
    std::fs::create_dir(&d2).unwrap();
    make_pair(
        &d2,
        &PairSpec {
            seed: 7,
            ..Default::default()
        },
    )
    .unwrap()
}
