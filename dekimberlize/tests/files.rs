//! What the tools create and open on disk, attacked: outputs are private
//! even under umask 000, a symbolic link (or a FIFO) inside a VM directory
//! is refused, and a dangling symbolic link at an output is never replaced.

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use kimberley_formats::testkit::{make_pair, Pair, PairSpec};

fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_dekimberlize")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --bins)",
        p.display()
    );
    p
}

/// Runs `name args` with umask 000 (when `open_umask`) or the inherited one.
fn tool_with<S: AsRef<OsStr>>(open_umask: bool, name: &str, args: &[S]) -> Output {
    let mut c = if open_umask {
        let mut c = Command::new("sh");
        c.args(["-c", "umask 000 && exec \"$0\" \"$@\""])
            .arg(bin(name));
        c
    } else {
        Command::new(bin(name))
    };
    c.args(args).stdin(Stdio::null()).output().unwrap()
}

fn tool<S: AsRef<OsStr>>(name: &str, args: &[S]) -> Output {
    tool_with(false, name, args)
}

fn ok(o: Output) -> Output {
    assert!(
        o.status.success(),
        "exit {:?}: {}",
        o.status.code(),
        err(&o)
    );
    o
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited, not killed")
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn setup(dir: &Path) -> (Pair, PathBuf, PathBuf) {
    let pair = make_pair(dir, &PairSpec::default()).unwrap();
    let key = dir.join("key");
    ok(tool(
        "kimberlize",
        &[OsStr::new("keygen"), OsStr::new("-o"), key.as_os_str()],
    ));
    let ovl = dir.join("a.ovl");
    ok(tool(
        "kimberlize",
        &[
            "diff".as_ref(),
            "-q".as_ref(),
            "--base".as_ref(),
            pair.base.as_os_str(),
            "--launch".as_ref(),
            pair.launch.as_os_str(),
            "-k".as_ref(),
            key.as_os_str(),
            "-o".as_ref(),
            ovl.as_os_str(),
        ],
    ));
    (pair, key, ovl)
}

/// A VM directory and the files in it, with their modes.
fn assert_private_vmdir(dir: &Path) {
    assert_eq!(mode(dir), 0o700, "{}", dir.display());
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        assert_eq!(mode(&p), 0o600, "{}", p.display());
        n += 1;
    }
    assert!(n >= 3, "{} has {n} files", dir.display());
}

#[test]
fn every_output_is_private_under_umask_000() {
    let t = tempfile::tempdir().unwrap();
    let pair = make_pair(t.path(), &PairSpec::default()).unwrap();
    let p = |n: &str| t.path().join(n);
    let u = |name: &str, args: &[&OsStr]| ok(tool_with(true, name, args));
    let key = p("key");
    u(
        "kimberlize",
        &["keygen".as_ref(), "-o".as_ref(), key.as_ref()],
    );
    assert_eq!(mode(&key), 0o600, "key file");
    // Show the umask really was 000 in the children: a file the tools do
    // not create privately (the shell's redirection) is world-writable.
    let o = Command::new("sh")
        .args(["-c", "umask 000 && : > \"$0\""])
        .arg(p("control"))
        .status()
        .unwrap();
    assert!(o.success());
    assert_eq!(mode(&p("control")), 0o666);

    let (ovl, stats) = (p("a.ovl"), p("diff.json"));
    u(
        "kimberlize",
        &[
            "diff".as_ref(),
            "-q".as_ref(),
            "--base".as_ref(),
            pair.base.as_ref(),
            "--launch".as_ref(),
            pair.launch.as_ref(),
            "-k".as_ref(),
            key.as_ref(),
            "-o".as_ref(),
            ovl.as_ref(),
            "--stats-json".as_ref(),
            stats.as_ref(),
        ],
    );
    assert_eq!(mode(&ovl), 0o600, "overlay");
    assert_eq!(mode(&stats), 0o600, "stats JSON");

    let (out, stats) = (p("out"), p("apply.json"));
    u(
        "dekimberlize",
        &[
            "-q".as_ref(),
            "--base".as_ref(),
            pair.base.as_ref(),
            "-i".as_ref(),
            ovl.as_ref(),
            "-k".as_ref(),
            key.as_ref(),
            "-o".as_ref(),
            out.as_ref(),
            "--stats-json".as_ref(),
            stats.as_ref(),
        ],
    );
    assert_private_vmdir(&out);
    assert_eq!(mode(&stats), 0o600, "stats JSON");

    let imported = p("imported");
    u(
        "kimberlize",
        &[
            "import".as_ref(),
            "-o".as_ref(),
            imported.as_ref(),
            "--memory".as_ref(),
            p("raw-base-memory").as_ref(),
            "--disk".as_ref(),
            p("raw-base-disk0").as_ref(),
            "--state".as_ref(),
            p("raw-base-state").as_ref(),
        ],
    );
    assert_private_vmdir(&imported);
    // Nothing unfinished was left behind.
    for e in std::fs::read_dir(t.path()).unwrap() {
        let n = e.unwrap().file_name();
        assert!(!n.to_string_lossy().starts_with('.'), "{n:?} left behind");
    }
}

/// Bytes and modification time of a file.
fn snapshot(p: &Path) -> (Vec<u8>, SystemTime) {
    (
        std::fs::read(p).unwrap(),
        std::fs::metadata(p).unwrap().modified().unwrap(),
    )
}

/// A copy of the VMDIR `src` at `dst` whose `file` is a symbolic link to a
/// host file holding exactly the bytes it should (so only the link is wrong).
fn with_symlink(src: &Path, dst: &Path, file: &str, host: &Path) {
    std::fs::create_dir(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    std::fs::rename(dst.join(file), host).unwrap();
    std::os::unix::fs::symlink(host, dst.join(file)).unwrap();
}

#[test]
fn a_symlink_inside_a_vm_directory_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (pair, key, ovl) = setup(t.path());
    for file in ["manifest.json", "memory.raw", "disk0.raw", "state.bin"] {
        let (base, launch) = (
            t.path().join(format!("base-{file}")),
            t.path().join(format!("launch-{file}")),
        );
        let (hb, hl) = (
            t.path().join(format!("host-base-{file}")),
            t.path().join(format!("host-launch-{file}")),
        );
        with_symlink(&pair.base, &base, file, &hb);
        with_symlink(&pair.launch, &launch, file, &hl);
        let before = (snapshot(&hb), snapshot(&hl));
        let out = t.path().join(format!("out-{file}"));
        let k = key.as_os_str();
        let runs: [(&str, Vec<&OsStr>); 5] = [
            (
                "dekimberlize",
                vec![
                    "-q".as_ref(),
                    "--base".as_ref(),
                    base.as_ref(),
                    "-i".as_ref(),
                    ovl.as_ref(),
                    "-k".as_ref(),
                    k,
                    "-o".as_ref(),
                    out.as_ref(),
                ],
            ),
            (
                "dekimberlize",
                vec![
                    "-q".as_ref(),
                    "--base".as_ref(),
                    base.as_ref(),
                    "-i".as_ref(),
                    ovl.as_ref(),
                    "-k".as_ref(),
                    k,
                    "-o".as_ref(),
                    out.as_ref(),
                    "--run".as_ref(),
                ],
            ),
            (
                "dekimberlize",
                vec![
                    "verify".as_ref(),
                    "-q".as_ref(),
                    "--base".as_ref(),
                    base.as_ref(),
                    "-i".as_ref(),
                    ovl.as_ref(),
                    "-k".as_ref(),
                    k,
                ],
            ),
            (
                "kimberlize",
                vec![
                    "diff".as_ref(),
                    "-q".as_ref(),
                    "--base".as_ref(),
                    base.as_ref(),
                    "--launch".as_ref(),
                    pair.launch.as_ref(),
                    "-k".as_ref(),
                    k,
                    "-o".as_ref(),
                    out.as_ref(),
                ],
            ),
            (
                "kimberlize",
                vec![
                    "diff".as_ref(),
                    "-q".as_ref(),
                    "--base".as_ref(),
                    pair.base.as_ref(),
                    "--launch".as_ref(),
                    launch.as_ref(),
                    "-k".as_ref(),
                    k,
                    "-o".as_ref(),
                    out.as_ref(),
                ],
            ),
        ];
        for (name, args) in runs {
            let o = tool(name, &args);
            assert_eq!(code(&o), 7, "{file}: {name} {args:?}: {}", err(&o));
            assert!(err(&o).contains(file), "{}", err(&o));
            assert!(!out.exists(), "{file}: {name} wrote {}", out.display());
        }
        assert!(
            before == (snapshot(&hb), snapshot(&hl)),
            "{file}: a host file changed"
        );
    }
}

#[test]
fn a_fifo_inside_a_vm_directory_is_refused_without_blocking() {
    let t = tempfile::tempdir().unwrap();
    let (pair, key, ovl) = setup(t.path());
    for file in ["manifest.json", "state.bin"] {
        let base = t.path().join(format!("base-{file}"));
        with_symlink(
            &pair.base,
            &base,
            file,
            &t.path().join(format!("host-{file}")),
        );
        std::fs::remove_file(base.join(file)).unwrap();
        let ok = Command::new("mkfifo")
            .arg(base.join(file))
            .status()
            .unwrap();
        assert!(ok.success());
        let out = t.path().join(format!("out-{file}"));
        let mut child = Command::new(bin("dekimberlize"))
            .args(["-q", "--base"])
            .arg(&base)
            .arg("-i")
            .arg(&ovl)
            .arg("-k")
            .arg(&key)
            .arg("-o")
            .arg(&out)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let t0 = std::time::Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait().unwrap() {
                break s;
            }
            if t0.elapsed() > std::time::Duration::from_secs(10) {
                child.kill().unwrap();
                child.wait().unwrap();
                panic!("{file}: dekimberlize blocked on a FIFO");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert_eq!(status.code(), Some(7), "{file}");
        assert!(!out.exists());
    }
}

#[test]
fn a_dangling_symlink_at_an_output_is_never_replaced() {
    let t = tempfile::tempdir().unwrap();
    let (pair, key, ovl) = setup(t.path());
    let p = |n: &str| t.path().join(n);
    let k = key.as_os_str();
    let mem = p("raw-base-memory");
    let runs: [(&str, Vec<&OsStr>); 5] = [
        ("kimberlize", vec!["keygen".as_ref(), "-o".as_ref()]),
        ("kimberlize", vec!["base".as_ref(), "-o".as_ref()]),
        (
            "kimberlize",
            vec![
                "diff".as_ref(),
                "-q".as_ref(),
                "--base".as_ref(),
                pair.base.as_ref(),
                "--launch".as_ref(),
                pair.launch.as_ref(),
                "-k".as_ref(),
                k,
                "-o".as_ref(),
            ],
        ),
        (
            "dekimberlize",
            vec![
                "-q".as_ref(),
                "--base".as_ref(),
                pair.base.as_ref(),
                "-i".as_ref(),
                ovl.as_ref(),
                "-k".as_ref(),
                k,
                "-o".as_ref(),
            ],
        ),
        (
            "kimberlize",
            vec![
                "import".as_ref(),
                "--memory".as_ref(),
                mem.as_ref(),
                "-o".as_ref(),
            ],
        ),
    ];
    for (i, (name, mut args)) in runs.into_iter().enumerate() {
        let link = p(&format!("out-{i}"));
        let target = p(&format!("target-{i}"));
        std::os::unix::fs::symlink(&target, &link).unwrap();
        args.push(link.as_os_str());
        let o = tool(name, &args);
        assert_eq!(code(&o), 6, "{name} {args:?}: {}", err(&o));
        assert_eq!(
            std::fs::read_link(&link).unwrap(),
            target,
            "{name}: link replaced"
        );
        assert!(!target.exists(), "{name} wrote through the link");
    }
    // Nothing unfinished was left behind.
    for e in std::fs::read_dir(t.path()).unwrap() {
        let n = e.unwrap().file_name();
        assert!(!n.to_string_lossy().starts_with('.'), "{n:?} left behind");
    }
}

#[test]
fn kimberlize_build_refuses_a_symlink_in_its_base() {
    if !kimberley_vmm::kvm_for_tests() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let p = |n: &str| t.path().join(n);
    let base = p("base");
    ok(tool(
        "kimberlize",
        &[
            "base".as_ref(),
            "--memory".as_ref(),
            "32M".as_ref(),
            "--disk".as_ref(),
            "4M".as_ref(),
            "-o".as_ref(),
            base.as_os_str(),
        ],
    ));
    let key = p("key");
    ok(tool(
        "kimberlize",
        &[OsStr::new("keygen"), OsStr::new("-o"), key.as_os_str()],
    ));
    std::fs::write(p("script"), "print hello\n").unwrap();
    for file in ["manifest.json", "memory.raw", "disk0.raw", "state.bin"] {
        let linked = p(&format!("base-{file}"));
        let host = p(&format!("host-{file}"));
        with_symlink(&base, &linked, file, &host);
        let before = snapshot(&host);
        let out = p(&format!("out-{file}"));
        let o = tool(
            "kimberlize",
            &[
                "build".as_ref(),
                "-q".as_ref(),
                "--base".as_ref(),
                linked.as_os_str(),
                "--install".as_ref(),
                p("script").as_os_str(),
                "--resume".as_ref(),
                p("script").as_os_str(),
                "-k".as_ref(),
                key.as_os_str(),
                "-o".as_ref(),
                out.as_os_str(),
            ],
        );
        assert_eq!(code(&o), 7, "{file}: {}", err(&o));
        assert!(err(&o).contains(file), "{}", err(&o));
        assert!(!out.exists());
        assert!(before == snapshot(&host), "{file}: the host file changed");
    }
}
