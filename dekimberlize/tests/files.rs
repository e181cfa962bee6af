//! What the tools create and open on disk, attacked: outputs are private
//! even under umask 000, a symbolic link (or a FIFO) inside a VM directory
//! is refused, and a dangling symbolic link at an output is never replaced.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::SystemTime;

use common::{bin, code, keygen, make_base, ok, stderr as err};
use kimberley_formats::testkit::{make_pair, Pair, PairSpec};

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

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

/// `lead`, then each option with its file, then `more`.
fn argv<'a>(lead: &[&'a str], opts: &[(&'a str, &'a Path)], more: &[&'a OsStr]) -> Vec<&'a OsStr> {
    let lead = lead.iter().map(|s| OsStr::new(*s));
    let opts = opts
        .iter()
        .flat_map(|&(o, p)| [OsStr::new(o), p.as_os_str()]);
    lead.chain(opts).chain(more.iter().copied()).collect()
}

/// `kimberlize diff -q --base BASE --launch LAUNCH -k KEY`, with `more`.
fn diff_args<'a>(
    base: &'a Path,
    launch: &'a Path,
    key: &'a Path,
    more: &[&'a OsStr],
) -> Vec<&'a OsStr> {
    argv(
        &["diff", "-q"],
        &[("--base", base), ("--launch", launch), ("-k", key)],
        more,
    )
}

/// `dekimberlize -q --base BASE -i OVL -k KEY`, with `more`.
fn apply_args<'a>(
    base: &'a Path,
    ovl: &'a Path,
    key: &'a Path,
    more: &[&'a OsStr],
) -> Vec<&'a OsStr> {
    argv(&["-q"], &[("--base", base), ("-i", ovl), ("-k", key)], more)
}

fn setup(dir: &Path) -> (Pair, PathBuf, PathBuf) {
    let pair = make_pair(dir, &PairSpec::default()).unwrap();
    let key = dir.join("key");
    keygen(&key);
    let ovl = dir.join("a.ovl");
    let o: [&OsStr; 2] = ["-o".as_ref(), ovl.as_ref()];
    ok(tool(
        "kimberlize",
        &diff_args(&pair.base, &pair.launch, &key, &o),
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
    let more: [&OsStr; 4] = [
        "-o".as_ref(),
        ovl.as_ref(),
        "--stats-json".as_ref(),
        stats.as_ref(),
    ];
    u(
        "kimberlize",
        &diff_args(&pair.base, &pair.launch, &key, &more),
    );
    assert_eq!(mode(&ovl), 0o600, "overlay");
    assert_eq!(mode(&stats), 0o600, "stats JSON");

    let (out, stats) = (p("out"), p("apply.json"));
    let more: [&OsStr; 4] = [
        "-o".as_ref(),
        out.as_ref(),
        "--stats-json".as_ref(),
        stats.as_ref(),
    ];
    u("dekimberlize", &apply_args(&pair.base, &ovl, &key, &more));
    assert_private_vmdir(&out);
    assert_eq!(mode(&stats), 0o600, "stats JSON");

    let imported = p("imported");
    let raw = ["memory", "disk0", "state"].map(|c| p(&format!("raw-base-{c}")));
    let import = [
        ("-o", &*imported),
        ("--memory", &raw[0]),
        ("--disk", &raw[1]),
        ("--state", &raw[2]),
    ];
    u("kimberlize", &argv(&["import"], &import, &[]));
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
        let o: [&OsStr; 2] = ["-o".as_ref(), out.as_ref()];
        let o_run: [&OsStr; 3] = ["-o".as_ref(), out.as_ref(), "--run".as_ref()];
        let runs: [(&str, Vec<&OsStr>); 5] = [
            ("dekimberlize", apply_args(&base, &ovl, &key, &o)),
            ("dekimberlize", apply_args(&base, &ovl, &key, &o_run)),
            (
                "dekimberlize",
                [
                    &["verify".as_ref()],
                    &apply_args(&base, &ovl, &key, &[])[..],
                ]
                .concat(),
            ),
            ("kimberlize", diff_args(&base, &pair.launch, &key, &o)),
            ("kimberlize", diff_args(&pair.base, &launch, &key, &o)),
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
        let o: [&OsStr; 2] = ["-o".as_ref(), out.as_ref()];
        let mut child = Command::new(bin("dekimberlize"))
            .args(apply_args(&base, &ovl, &key, &o))
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
    let mem = p("raw-base-memory");
    let o: [&OsStr; 1] = ["-o".as_ref()];
    let runs: [(&str, Vec<&OsStr>); 5] = [
        ("kimberlize", vec!["keygen".as_ref(), "-o".as_ref()]),
        ("kimberlize", vec!["base".as_ref(), "-o".as_ref()]),
        ("kimberlize", diff_args(&pair.base, &pair.launch, &key, &o)),
        ("dekimberlize", apply_args(&pair.base, &ovl, &key, &o)),
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
    make_base(&base, "32M", "4M");
    let key = p("key");
    keygen(&key);
    let script = p("script");
    std::fs::write(&script, "print hello\n").unwrap();
    for file in ["manifest.json", "memory.raw", "disk0.raw", "state.bin"] {
        let linked = p(&format!("base-{file}"));
        let host = p(&format!("host-{file}"));
        with_symlink(&base, &linked, file, &host);
        let before = snapshot(&host);
        let out = p(&format!("out-{file}"));
        let build = [
            ("--base", &*linked),
            ("--install", &script),
            ("--resume", &script),
            ("-k", &key),
            ("-o", &out),
        ];
        let o = tool("kimberlize", &argv(&["build", "-q"], &build, &[]));
        assert_eq!(code(&o), 7, "{file}: {}", err(&o));
        assert!(err(&o).contains(file), "{}", err(&o));
        assert!(!out.exists());
        assert!(before == snapshot(&host), "{file}: the host file changed");
    }
}
