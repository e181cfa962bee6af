//! The tools as pipeline citizens: SIGINT/SIGTERM remove what they were
//! writing and exit 130/143, stale temporaries of dead runs are removed,
//! `-` and streams (FIFOs, devices, `/dev/fd/N`) as outputs, a cut output
//! (broken pipe) exits 141, and usage errors exit 2 from every tool.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kimberley_cli::exit;
use kimberley_formats::testkit::{Pair, PairSpec};

/// A pair whose diff takes seconds at zstd level 19 on one thread.
fn big() -> PairSpec {
    PairSpec {
        memory: 48 << 20,
        disks: vec![16 << 20],
        launch_disks: vec![16 << 20],
        change_percent: 60,
        ..Default::default()
    }
}

/// Waits until `child` has a temporary output in `dir` whose name starts
/// with `prefix`; returns its name.
fn wait_for_temp(child: &mut Child, dir: &Path, prefix: &str) -> String {
    let pid = child.id();
    let t = Instant::now();
    loop {
        if let Some(n) = temps(dir)
            .into_iter()
            .find(|n| n.starts_with(prefix) && n.contains(&format!(".tmp-{pid}-")))
        {
            return n;
        }
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "exited ({st}) before {prefix}* appeared in {}",
                dir.display()
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "no {prefix}* in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn diff_cmd(p: &Pair, key: &Path) -> Command {
    let mut c = Command::new(bin("kimberlize"));
    c.args(["diff", "-q", "--base"])
        .arg(&p.base)
        .arg("--launch")
        .arg(&p.launch)
        .arg("-k")
        .arg(key);
    c
}

#[test]
fn interrupted_diff_removes_its_partial_overlay() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &big());
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    for (sig, code, name) in [
        (libc::SIGINT, exit::INTERRUPTED, "SIGINT"),
        (libc::SIGTERM, exit::TERMINATED, "SIGTERM"),
    ] {
        let mut child = diff_cmd(&p, &key)
            .args(["--level", "19", "-j", "1", "-o"])
            .arg(out.join("app.ovl"))
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_temp(&mut child, &out, ".app.ovl.tmp-");
        let (c, err) = interrupt(child, sig);
        assert_eq!(c, code as i32, "{err}");
        assert_eq!(
            err.trim(),
            format!(
                "kimberlize diff: interrupted by {name}; removed the partial {}",
                out.join("app.ovl").display()
            )
        );
        assert_eq!(temps(&out), Vec::<String>::new());
        assert!(!out.join("app.ovl").exists());
    }
}

#[test]
fn interrupted_layered_diff_removes_its_scratch_directory() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &big());
    // Two parents that change nothing: the layered diff applies the first
    // into a scratch directory next to the launch VM (the last is held in
    // memory over it), then diffs all of it.
    let parent = t.path().join("parent.ovl");
    let parent2 = t.path().join("parent2.ovl");
    for (out, over) in [(&parent, None), (&parent2, Some(&parent))] {
        let mut c = Command::new(bin("kimberlize"));
        c.args(["diff", "-q", "--base"])
            .arg(&p.base)
            .arg("--launch")
            .arg(&p.base)
            .arg("-k")
            .arg(&key)
            .arg("-o")
            .arg(out);
        if let Some(o) = over {
            c.arg("--parent").arg(o);
        }
        ok(c.output().unwrap());
    }
    let mut child = diff_cmd(&p, &key)
        .arg("--parent")
        .arg(&parent)
        .arg("--parent")
        .arg(&parent2)
        .args(["--level", "19", "-j", "1", "-o"])
        .arg(t.path().join("child.ovl"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_temp(&mut child, t.path(), ".child.ovl.tmp-");
    assert!(
        temps(t.path())
            .iter()
            .any(|n| n.starts_with(".launch.tmp-")),
        "{:?}",
        temps(t.path())
    );
    let (c, err) = interrupt(child, libc::SIGINT);
    assert_eq!(c, exit::INTERRUPTED as i32, "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "kimberlize diff: interrupted by SIGINT; removed the partial {} and 1 temporary directory",
            t.path().join("child.ovl").display()
        )
    );
    assert_eq!(temps(t.path()), Vec::<String>::new());
}

#[test]
fn interrupted_dekimberlize_removes_its_partial_vm() {
    let t = tempfile::tempdir().unwrap();
    let spec = PairSpec {
        memory: 8 << 20,
        ..Default::default()
    };
    let (p, key) = setup_with(t.path(), &spec);
    let ovl = diff_cmd(&p, &key).output().unwrap().stdout;
    assert!(ovl.len() > 100_000);
    let out = t.path().join("app");
    for (sig, code) in [
        (libc::SIGINT, exit::INTERRUPTED),
        (libc::SIGTERM, exit::TERMINATED),
    ] {
        let mut child = Command::new(bin("dekimberlize"))
            .arg("--base")
            .arg(&p.base)
            .arg("-k")
            .arg(&key)
            .arg("-o")
            .arg(&out)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Half the overlay: the output directory is being filled.
        let mut stdin = child.stdin.take().unwrap();
        stdin.write_all(&ovl[..ovl.len() / 2]).unwrap();
        wait_for_temp(&mut child, t.path(), ".app.tmp-");
        let (c, err) = interrupt(child, sig);
        drop(stdin);
        assert_eq!(c, code as i32, "{err}");
        assert!(
            err.starts_with("dekimberlize: interrupted by SIG")
                && err.contains(&format!("removed the partial {}", out.display())),
            "{err}"
        );
        assert_eq!(temps(t.path()), Vec::<String>::new());
        assert!(!out.exists());
    }
}

#[test]
fn interrupted_import_removes_its_partial_vm() {
    let t = tempfile::tempdir().unwrap();
    // 256 MiB of written data: the copy takes a while.
    let mem = t.path().join("mem.raw");
    let f = std::fs::File::create(&mem).unwrap();
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..256 {
        (&f).write_all(&block).unwrap();
    }
    drop(f);
    let mut child = Command::new(bin("kimberlize"))
        .args(["import", "-o"])
        .arg(t.path().join("vm"))
        .arg("--memory")
        .arg(&mem)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_temp(&mut child, t.path(), ".vm.tmp-");
    let (c, err) = interrupt(child, libc::SIGTERM);
    assert_eq!(c, exit::TERMINATED as i32, "{err}");
    assert!(
        err.starts_with("kimberlize import: interrupted by SIGTERM; removed the partial"),
        "{err}"
    );
    assert_eq!(temps(t.path()), Vec::<String>::new());
    assert!(!t.path().join("vm").exists());
}

#[test]
fn interrupted_build_removes_the_launch_vm_and_the_overlay() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = |n: &str| t.path().join(n);
    keygen(&d("key"));
    make_base(&d("base"), "32M", "4M");
    std::fs::write(d("install"), "sleep 60000\n").unwrap();
    std::fs::write(d("resume"), "sleep 1\n").unwrap();
    let mut child = Command::new(bin("kimberlize"))
        .args(["build", "-q", "--base"])
        .arg(d("base"))
        .arg("--install")
        .arg(d("install"))
        .arg("--resume")
        .arg(d("resume"))
        .arg("-k")
        .arg(d("key"))
        .arg("-o")
        .arg(d("app.ovl"))
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The overlay's temporary file, then the launch VM's directory (a
    // scratch one without --launch-out) while the install script runs.
    wait_for_temp(&mut child, t.path(), ".app.ovl.tmp-");
    std::thread::sleep(Duration::from_millis(1000));
    assert!(
        temps(t.path())
            .iter()
            .any(|n| n.contains("base-launch.tmp-")),
        "{:?}",
        temps(t.path())
    );
    let (c, err) = interrupt(child, libc::SIGINT);
    assert_eq!(c, exit::INTERRUPTED as i32, "{err}");
    assert_eq!(
        err.trim(),
        format!(
            "kimberlize build: interrupted by SIGINT; removed the partial {} and 1 temporary directory",
            d("app.ovl").display()
        )
    );
    assert_eq!(temps(t.path()), Vec::<String>::new(), "{err}");
}

#[test]
fn stale_temporaries_of_dead_runs_are_removed_live_ones_kept() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    let mut c = Command::new("true").spawn().unwrap();
    let dead = c.id();
    c.wait().unwrap();
    let live = std::process::id();
    let out = t.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let o = |n: &str| out.join(n);
    std::fs::write(o(&format!(".app.ovl.tmp-{dead}-0")), b"partial").unwrap();
    std::fs::create_dir(o(&format!(".vm.tmp-{dead}-4"))).unwrap();
    std::fs::write(o(&format!(".vm.tmp-{dead}-4/memory.raw")), b"x").unwrap();
    std::fs::write(o(&format!(".other.ovl.tmp-{live}-0")), b"in use").unwrap();
    std::fs::write(o(&format!("notours.tmp-{dead}-0")), b"x").unwrap();
    ok(diff_cmd(&p, &key)
        .arg("-o")
        .arg(o("app.ovl"))
        .output()
        .unwrap());
    assert_eq!(temps(&out), [format!(".other.ovl.tmp-{live}-0")]);
    assert!(o(&format!("notours.tmp-{dead}-0")).exists());
    assert!(o("app.ovl").exists());
    // dekimberlize sweeps where it creates its output too.
    std::fs::write(o(&format!(".x.tmp-{dead}-9")), b"partial").unwrap();
    ok(Command::new(bin("dekimberlize"))
        .arg("--base")
        .arg(&p.base)
        .arg("-i")
        .arg(o("app.ovl"))
        .arg("-k")
        .arg(&key)
        .arg("-o")
        .arg(o("app"))
        .output()
        .unwrap());
    assert_eq!(temps(&out), [format!(".other.ovl.tmp-{live}-0")]);
}

fn mkfifo(p: &Path) {
    assert!(Command::new("mkfifo").arg(p).status().unwrap().success());
}

/// Reads the FIFO `p` to its end on a thread.
fn drain(p: &Path) -> std::thread::JoinHandle<Vec<u8>> {
    let p = p.to_path_buf();
    std::thread::spawn(move || std::fs::read(p).unwrap())
}

fn verify(ovl: &Path, key: &Path) {
    ok(Command::new(bin("dekimberlize"))
        .args(["verify", "-q", "-i"])
        .arg(ovl)
        .arg("-k")
        .arg(key)
        .output()
        .unwrap());
}

#[test]
fn fifos_and_devices_are_written_in_place() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    let fifo = t.path().join("fifo");
    mkfifo(&fifo);
    for force in [false, true] {
        let reader = drain(&fifo);
        let mut c = diff_cmd(&p, &key);
        c.arg("-o").arg(&fifo);
        if force {
            c.arg("--force");
        }
        ok(c.output().unwrap());
        let bytes = reader.join().unwrap();
        let copy = t.path().join("copy.ovl");
        std::fs::write(&copy, &bytes).unwrap();
        verify(&copy, &key);
        let m = std::fs::symlink_metadata(&fifo).unwrap();
        assert!(
            m.file_type().is_fifo(),
            "force={force}: the FIFO was replaced"
        );
        assert_eq!(temps(t.path()), Vec::<String>::new());
    }
    // A character device, also through a symbolic link.
    let link = t.path().join("null");
    std::os::unix::fs::symlink("/dev/null", &link).unwrap();
    for out in [Path::new("/dev/null"), &link] {
        let o = diff_cmd(&p, &key).arg("-o").arg(out).output().unwrap();
        assert!(o.status.success(), "{}: {}", out.display(), stderr(&o));
    }
    assert!(std::fs::symlink_metadata("/dev/null")
        .unwrap()
        .file_type()
        .is_char_device());
    assert!(std::fs::symlink_metadata(&link).unwrap().is_symlink());
    // --force replaces regular files only: not a directory.
    let dir = t.path().join("dir");
    std::fs::create_dir(&dir).unwrap();
    let o = diff_cmd(&p, &key)
        .arg("-o")
        .arg(&dir)
        .arg("--force")
        .output()
        .unwrap();
    assert_eq!(code(&o), exit::EXISTS as i32, "{}", stderr(&o));
    assert!(stderr(&o).contains("regular files only"), "{}", stderr(&o));
    assert!(dir.is_dir());
}

#[test]
fn descriptor_paths_and_dash_are_streams() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    // `-o >(cmd)`: bash passes /dev/fd/63.
    let count = t.path().join("count");
    let script = "\"$0\" diff -q --base \"$1\" --launch \"$2\" -k \"$3\" -o >(wc -c > \"$4\"); r=$?; wait $!; exit $r";
    let o = Command::new("bash")
        .arg("-c")
        .arg(script)
        .arg(bin("kimberlize"))
        .arg(&p.base)
        .arg(&p.launch)
        .arg(&key)
        .arg(&count)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let n: u64 = std::fs::read_to_string(&count)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(n > 1000, "{n} bytes through >(wc -c)");
    // -o /dev/stdout into a file, and -o - the same.
    for out in ["/dev/stdout", "-"] {
        let file = t.path().join("stdout.ovl");
        let f = std::fs::File::create(&file).unwrap();
        let o = diff_cmd(&p, &key)
            .arg("-o")
            .arg(out)
            .stdout(f)
            .output()
            .unwrap();
        assert!(o.status.success(), "{out}: {}", stderr(&o));
        verify(&file, &key);
    }
    assert!(std::fs::symlink_metadata("/dev/stdout")
        .unwrap()
        .is_symlink());
    // --stats-json -: JSON on stdout, no file named "-".
    let o = diff_cmd(&p, &key)
        .arg("-o")
        .arg(t.path().join("a.ovl"))
        .args(["--stats-json", "-"])
        .current_dir(t.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["overlay_bytes"].as_u64().unwrap() > 0);
    assert!(!t.path().join("-").exists());
    // dekimberlize --stats-json - too, and inspect reads stdin for -.
    let o = Command::new(bin("dekimberlize"))
        .arg("--base")
        .arg(&p.base)
        .arg("-i")
        .arg(t.path().join("a.ovl"))
        .arg("-k")
        .arg(&key)
        .arg("-o")
        .arg(t.path().join("app"))
        .args(["--stats-json", "-"])
        .current_dir(t.path())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["launch_bytes"].as_u64().unwrap() > 0);
    assert!(!t.path().join("-").exists());
    let o = Command::new(bin("kimberlize"))
        .args(["inspect", "-", "-k"])
        .arg(&key)
        .stdin(std::fs::File::open(t.path().join("a.ovl")).unwrap())
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
}

#[test]
fn a_cut_output_is_a_failure() {
    let t = tempfile::tempdir().unwrap();
    let spec = PairSpec {
        memory: 8 << 20,
        ..Default::default()
    };
    let (p, key) = setup_with(t.path(), &spec);
    // A reader that takes 1000 bytes and goes away.
    let mut child = diff_cmd(&p, &key)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = vec![0u8; 1000];
    out.read_exact(&mut first).unwrap();
    drop(out);
    let (st, err) = finish(child);
    assert_eq!(st.code(), Some(exit::BROKEN_PIPE as i32), "{err}");
    assert!(err.contains("the output was cut"), "{err}");
    // What a shell with pipefail sees.
    let o = Command::new("bash")
        .arg("-c")
        .arg("set -o pipefail; \"$0\" diff --base \"$1\" --launch \"$2\" -k \"$3\" | head -c 1000 > /dev/null")
        .arg(bin("kimberlize"))
        .arg(&p.base)
        .arg(&p.launch)
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(code(&o), exit::BROKEN_PIPE as i32, "{}", stderr(&o));
}

#[test]
fn the_same_failure_is_the_same_usage_code_everywhere() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    let ovl = t.path().join("a.ovl");
    ok(diff_cmd(&p, &key).arg("-o").arg(&ovl).output().unwrap());
    let usage = exit::USAGE as i32;
    let apply = |extra: &[&std::ffi::OsStr]| {
        Command::new(bin("dekimberlize"))
            .arg("--base")
            .arg(&p.base)
            .arg("-i")
            .arg(&ovl)
            .arg("-o")
            .arg(t.path().join("never"))
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    // No key: a missing option, from diff and dekimberlize alike.
    let o = tool!(
        "kimberlize",
        "diff",
        "--base",
        &p.base,
        "--launch",
        &p.launch,
        "-o",
        t.path().join("x.ovl")
    );
    assert_eq!(code(&o), usage, "{}", stderr(&o));
    let o = apply(&[]);
    assert_eq!(code(&o), usage, "{}", stderr(&o));
    assert!(stderr(&o).contains("--key-file"), "{}", stderr(&o));
    // A key file of the wrong length.
    let short = t.path().join("short.key");
    std::fs::write(&short, [7u8; 31]).unwrap();
    let o = tool!(
        "kimberlize",
        "diff",
        "--base",
        &p.base,
        "--launch",
        &p.launch,
        "-k",
        &short,
        "-o",
        t.path().join("x.ovl")
    );
    assert_eq!(code(&o), usage, "{}", stderr(&o));
    let o = apply(&["-k".as_ref(), short.as_os_str()]);
    assert_eq!(code(&o), usage, "{}", stderr(&o));
    assert!(!t.path().join("x.ovl").exists() && !t.path().join("never").exists());
    // Sizes: checked before anything runs, limits in human units.
    let vm = t.path().join("vm");
    for (mem, qemu, want) in [
        ("1T", false, "at most 3 GiB"),
        ("8M", false, "at least 16 MiB"),
        ("32M", true, "at least 64 MiB"),
        ("2T", true, "at most 1 TiB"),
        ("63M", false, "multiple of 2 MiB"),
        ("64MB", false, "64MiB"),
        ("lots", false, "not a size"),
    ] {
        let mut c = Command::new(bin("kimberlize"));
        c.args(["base", "--memory", mem, "-o"]).arg(&vm);
        if qemu {
            c.args(["--qemu", "--kernel", "/nonexistent"]);
        }
        let o = c.stdin(Stdio::null()).output().unwrap();
        assert_eq!(code(&o), usage, "{mem}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{mem}: {}", stderr(&o));
        assert!(!vm.exists());
    }
    // Accepted spellings get past the size check (to the existing output).
    std::fs::create_dir(&vm).unwrap();
    for mem in ["64MiB", "64M", "64m", "1GiB", "67108864"] {
        let o = tool!("kimberlize", "base", "--memory", mem, "-o", &vm);
        assert_eq!(code(&o), exit::EXISTS as i32, "{mem}: {}", stderr(&o));
    }
}
