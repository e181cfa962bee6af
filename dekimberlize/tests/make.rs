//! examples/layers/Makefile run with real `make` (KVM): incremental
//! rebuilds, `make -q`, the chain equals the launch VM, `make -j2`, and an
//! interrupted make leaves no target that looks finished.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use kimberley_formats::vmdir::{Kind, VmDir};

/// The example's directory in the source tree.
fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/layers")
}

/// True if `make` can run (panics if it must: KIMBERLEY_REQUIRE_KVM=1).
fn have_make() -> bool {
    let ok = Command::new("make").arg("--version").output().is_ok();
    if !ok {
        assert!(
            std::env::var("KIMBERLEY_REQUIRE_KVM").as_deref() != Ok("1"),
            "make is missing and KIMBERLEY_REQUIRE_KVM=1"
        );
        eprintln!("skipping: no make");
    }
    ok
}

/// A working directory with its own copy of the scripts (so touching them
/// leaves the source tree alone).
fn workdir(t: &Path, name: &str) -> PathBuf {
    let d = t.join(name);
    std::fs::create_dir_all(d.join("scripts")).unwrap();
    for f in [
        "os-install.txt",
        "os-resume.txt",
        "app-install.txt",
        "app-resume.txt",
    ] {
        std::fs::copy(example().join(f), d.join("scripts").join(f)).unwrap();
    }
    d
}

/// `make` in `dir` with the workspace's tools and `args`.
fn make_cmd(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("make");
    c.current_dir(dir)
        .arg("-f")
        .arg(example().join("Makefile"))
        .arg(format!("KIMBERLIZE={}", bin("kimberlize").display()))
        .arg(format!("DEKIMBERLIZE={}", bin("dekimberlize").display()))
        .arg(format!("SCRIPTS={}", dir.join("scripts").display()))
        .args(args);
    c
}

fn make(dir: &Path, args: &[&str]) -> Output {
    let o = run(&mut make_cmd(dir, args));
    assert!(
        o.status.success(),
        "make {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&o.stdout),
        stderr(&o)
    );
    o
}

fn mtime(p: &Path) -> SystemTime {
    std::fs::metadata(p).unwrap().modified().unwrap()
}

/// Marks `p` as changed (a later mtime than anything built so far).
fn touch(p: &Path) {
    std::thread::sleep(Duration::from_millis(20));
    let f = std::fs::File::options().write(true).open(p).unwrap();
    f.set_modified(SystemTime::now()).unwrap();
}

/// What the scripts made in a VM directory: its memory and the digests of
/// its disks (state.bin also holds the guest's clock, so it differs).
struct Content {
    memory: Vec<u8>,
    disks: Vec<[u8; 32]>,
}

fn content(vm: &Path) -> Content {
    let d = VmDir::open(vm).unwrap();
    let mut memory = None;
    let mut disks = Vec::new();
    for (i, c) in d.manifest.components.iter().enumerate() {
        match c.kind {
            Kind::Memory => memory = Some(d.read_component(i).unwrap()),
            Kind::Disk => disks.push(c.digest),
            _ => {}
        }
    }
    Content {
        memory: memory.expect("a memory component"),
        disks,
    }
}

/// Asserts `a` and `b` hold what the same scripts make: the same disks
/// and the same memory, byte for byte (docs/SCRIPTS.md, "Same scripts,
/// same launch VM").
fn assert_same_content(a: &Content, b: &Content, what: &str) {
    assert_eq!(a.disks, b.disks, "{what}: other disks");
    assert_eq!(a.memory.len(), b.memory.len(), "{what}: other memory size");
    let differ: Vec<usize> = a
        .memory
        .iter()
        .zip(&b.memory)
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, _)| i)
        .take(8)
        .collect();
    assert!(differ.is_empty(), "{what}: memory differs at {differ:x?}");
}

/// Asserts the overlays in `dir` are byte for byte `want` (os.ovl, app.ovl).
fn assert_same_overlays(dir: &Path, want: &[Vec<u8>; 2], what: &str) {
    for (name, want) in ["os.ovl", "app.ovl"].iter().zip(want) {
        let got = std::fs::read(dir.join(name)).unwrap();
        assert!(got == *want, "{what}: {name} has other bytes");
    }
}

fn overlays(dir: &Path) -> [Vec<u8>; 2] {
    ["os.ovl", "app.ovl"].map(|n| std::fs::read(dir.join(n)).unwrap())
}

/// `dekimberlize --base base -i os.ovl -i app.ovl` gives app-vm.
fn check_chain(dir: &Path) {
    let check = dir.join("check-vm");
    let _ = std::fs::remove_dir_all(&check);
    let o = tool!(
        "dekimberlize",
        "-q",
        "--base",
        dir.join("base"),
        "-i",
        dir.join("os.ovl"),
        "-i",
        dir.join("app.ovl"),
        "-k",
        dir.join("overlay.key"),
        "-o",
        &check
    );
    ok(o);
    let got = VmDir::open(&check).unwrap();
    let want = VmDir::open(&dir.join("app-vm")).unwrap();
    assert_eq!(got.identity(), want.identity(), "the chain is not app-vm");
    std::fs::remove_dir_all(&check).unwrap();
}

/// Targets that exist must be complete: overlays authenticate and parse,
/// VM directories open and match their manifests.
fn no_half_targets(dir: &Path) {
    for ovl in ["os.ovl", "app.ovl"] {
        let p = dir.join(ovl);
        if p.exists() {
            let o = tool!("kimberlize", "inspect", &p, "-k", dir.join("overlay.key"));
            assert!(
                o.status.success(),
                "{ovl} looks finished but is not: {}",
                stderr(&o)
            );
        }
    }
    for vm in ["base", "app-vm"] {
        if dir.join(vm).join("manifest.json").exists() {
            VmDir::open(&dir.join(vm)).unwrap().verify().unwrap();
        }
    }
}

#[test]
fn the_layers_example_builds_incrementally() {
    if !kvm() || !have_make() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = workdir(t.path(), "a");
    let p = |n: &str| d.join(n);

    // First run: all three layers (base, OS, application).
    make(&d, &[]);
    for f in [
        "base/manifest.json",
        "os.ovl",
        "app.ovl",
        "app-vm/manifest.json",
    ] {
        assert!(p(f).exists(), "{f} missing after make");
    }
    check_chain(&d);
    // A second make has nothing to do.
    assert!(
        run(&mut make_cmd(&d, &["-q"])).status.success(),
        "make -q after make"
    );

    // The application's script: only the application layer.
    let (os0, app0) = (mtime(&p("os.ovl")), mtime(&p("app.ovl")));
    let vm0 = content(&p("app-vm"));
    let bytes0 = overlays(&d);
    touch(&p("scripts/app-install.txt"));
    assert!(!run(&mut make_cmd(&d, &["-q"])).status.success());
    make(&d, &[]);
    assert_eq!(mtime(&p("os.ovl")), os0, "the OS layer was rebuilt");
    assert!(
        mtime(&p("app.ovl")) > app0,
        "the application layer was not rebuilt"
    );
    assert_same_content(&content(&p("app-vm")), &vm0, "app layer rebuilt");
    assert_same_overlays(&d, &bytes0, "app layer rebuilt");
    check_chain(&d);

    // The OS layer's script: both layers, each with the same bytes as
    // before (deterministic scripts, reproducible suspends and overlays).
    let (os1, app1) = (mtime(&p("os.ovl")), mtime(&p("app.ovl")));
    touch(&p("scripts/os-install.txt"));
    make(&d, &[]);
    assert!(mtime(&p("os.ovl")) > os1, "the OS layer was not rebuilt");
    assert!(
        mtime(&p("app.ovl")) > app1,
        "the application layer was not rebuilt"
    );
    assert_same_content(&content(&p("app-vm")), &vm0, "both layers rebuilt");
    assert_same_overlays(&d, &bytes0, "both layers rebuilt");
    check_chain(&d);
    assert!(run(&mut make_cmd(&d, &["-q"])).status.success());

    // A depfile names what the build read: a changed key rebuilds.
    let deps = std::fs::read_to_string(p("app.ovl.d")).unwrap();
    for dep in [
        "base/manifest.json",
        "os.ovl",
        "app-install.txt",
        "overlay.key",
    ] {
        assert!(deps.contains(dep), "{dep} not in app.ovl.d:\n{deps}");
    }

    // make -j2 from clean (the same key, a new base): the same bytes.
    let d2 = workdir(t.path(), "b");
    std::fs::copy(p("overlay.key"), d2.join("overlay.key")).unwrap();
    make(&d2, &["-j2"]);
    assert_same_content(&content(&d2.join("app-vm")), &vm0, "make -j2");
    assert_same_overlays(&d2, &bytes0, "make -j2");
    check_chain(&d2);
    assert!(run(&mut make_cmd(&d2, &["-q"])).status.success());

    // Ctrl-C mid-build (SIGINT to make's process group): whatever exists
    // is complete; a new make finishes the job.
    let d3 = workdir(t.path(), "c");
    std::fs::copy(p("overlay.key"), d3.join("overlay.key")).unwrap();
    interrupt_when(&d3, &d3.join("os.ovl"));
    no_half_targets(&d3);
    // The interrupted kimberlize removed what it was writing.
    assert_eq!(temps(&d3), Vec::<String>::new());
    assert!(
        !run(&mut make_cmd(&d3, &["-q"])).status.success(),
        "make -q is true after an interrupted make"
    );
    make(&d3, &[]);
    check_chain(&d3);
    assert_same_content(&content(&d3.join("app-vm")), &vm0, "make after Ctrl-C");
    assert_same_overlays(&d3, &bytes0, "make after Ctrl-C");
}

/// Starts make in its own process group, sends the group SIGINT once
/// `when` exists (the application layer is then being built), waits.
fn interrupt_when(dir: &Path, when: &Path) {
    use std::os::unix::process::CommandExt;
    let mut c = make_cmd(dir, &[]);
    c.process_group(0)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = c.spawn().unwrap();
    let t0 = Instant::now();
    while !when.exists() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "make ended before {} appeared",
            when.display()
        );
        assert!(t0.elapsed() < Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(5));
    }
    std::thread::sleep(Duration::from_millis(100));
    let k = Command::new("kill")
        .args(["-INT", "--", &format!("-{}", child.id())])
        .status()
        .unwrap();
    assert!(k.success());
    let st = child.wait().unwrap();
    assert!(!st.success(), "make finished although interrupted");
}

/// `build` in `dir` on `base` with `args` (the example's OS layer
/// scripts, which fit any 64M base).
fn build(dir: &Path, args: &[&std::ffi::OsStr]) -> Output {
    let mut c = Command::new(bin("kimberlize"));
    c.current_dir(dir)
        .args(["build", "-q", "--progress", "none", "--base", "base"])
        .arg("--install")
        .arg(example().join("os-install.txt"))
        .arg("--resume")
        .arg(example().join("os-resume.txt"))
        .args(args);
    run(&mut c)
}

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

#[test]
fn build_outputs_for_make() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_base(&d.join("base"), "64M", "256M");

    // --launch-out alone: the launch VM, no overlay, no key needed.
    let o = build(
        d,
        &[os("--launch-out"), os("vm"), os("--depfile"), os("vm d")],
    );
    ok(o.clone());
    assert!(o.stdout.is_empty(), "an overlay was written to stdout");
    let first = VmDir::open(&d.join("vm")).unwrap().identity();
    // The depfile names the launch VM and what the build read, escaped.
    let deps = std::fs::read_to_string(d.join("vm d")).unwrap();
    assert!(deps.starts_with("vm:"), "{deps}");
    assert!(deps.contains("base/manifest.json"), "{deps}");
    assert!(deps.contains("os-install.txt"), "{deps}");

    // An existing launch VM: refused without --force (exit 6), replaced
    // as a whole with it.
    let o = build(d, &[os("--launch-out"), os("vm")]);
    assert_eq!(
        code(&o),
        kimberley_cli::exit::EXISTS as i32,
        "{}",
        stderr(&o)
    );
    assert_eq!(VmDir::open(&d.join("vm")).unwrap().identity(), first);
    ok(build(d, &[os("--launch-out"), os("vm"), os("--force")]));
    VmDir::open(&d.join("vm")).unwrap().verify().unwrap();
    assert_eq!(temps(d), Vec::<String>::new());

    // Attack: --force never replaces what is not a VM directory (a home
    // directory given by mistake), nor follows a symbolic link to one.
    let home = d.join("home");
    std::fs::create_dir(&home).unwrap();
    std::fs::write(home.join("thesis.tex"), "years of work").unwrap();
    let o = build(d, &[os("--launch-out"), os("home"), os("--force")]);
    assert_eq!(
        code(&o),
        kimberley_cli::exit::EXISTS as i32,
        "{}",
        stderr(&o)
    );
    assert_eq!(
        std::fs::read_to_string(home.join("thesis.tex")).unwrap(),
        "years of work"
    );
    std::os::unix::fs::symlink("vm", d.join("link")).unwrap();
    let before = VmDir::open(&d.join("vm")).unwrap().identity();
    let o = build(d, &[os("--launch-out"), os("link"), os("--force")]);
    assert_eq!(
        code(&o),
        kimberley_cli::exit::EXISTS as i32,
        "{}",
        stderr(&o)
    );
    assert!(std::fs::symlink_metadata(d.join("link"))
        .unwrap()
        .is_symlink());
    assert_eq!(VmDir::open(&d.join("vm")).unwrap().identity(), before);

    // --depfile needs a target to name: with stdout only, refused before
    // the VM runs (usage, nothing written).
    let mut c = Command::new(bin("kimberlize"));
    c.current_dir(d)
        .args([
            "build",
            "-q",
            "--base",
            "base",
            "--no-encrypt",
            "--depfile",
            "x.d",
        ])
        .arg("--install")
        .arg(example().join("app-install.txt"))
        .arg("--resume")
        .arg(example().join("app-resume.txt"))
        .stdout(std::process::Stdio::null());
    let o = c.stdin(std::process::Stdio::null()).output().unwrap();
    assert_eq!(
        code(&o),
        kimberley_cli::exit::USAGE as i32,
        "{}",
        stderr(&o)
    );
    assert!(!d.join("x.d").exists());
    assert_eq!(temps(d), Vec::<String>::new());
}

#[test]
fn build_parent_reads_the_chain_with_the_key() {
    if !kvm() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let d = t.path();
    make_base(&d.join("base"), "64M", "256M");
    let (k1, k2) = (d.join("k1"), d.join("k2"));
    keygen(&k1);
    keygen(&k2);
    ok(build(
        d,
        &[os("-k"), k1.as_os_str(), os("-o"), os("os.ovl")],
    ));
    ok(build(d, &[os("--no-encrypt"), os("-o"), os("plain.ovl")]));
    let app = |key: &Path, parent: &str, more: &[&str], out: &str| {
        let mut c = Command::new(bin("kimberlize"));
        c.current_dir(d)
            .args(["build", "-q", "--progress", "none", "--base", "base"])
            .args(["--parent", parent, "-k"])
            .arg(key)
            .arg("--install")
            .arg(example().join("app-install.txt"))
            .arg("--resume")
            .arg(example().join("app-resume.txt"))
            .args(more)
            .args(["-o", out]);
        run(&mut c)
    };
    // Another key: refused (exit 4) before anything is written.
    let o = app(&k2, "os.ovl", &[], "a.ovl");
    assert_eq!(code(&o), kimberley_cli::exit::AUTH as i32, "{}", stderr(&o));
    assert!(!d.join("a.ovl").exists());
    // An unencrypted parent under a key: refused unless
    // --allow-unencrypted, as dekimberlize and diff --parent read it.
    let o = app(&k1, "plain.ovl", &[], "b.ovl");
    assert_eq!(code(&o), kimberley_cli::exit::AUTH as i32, "{}", stderr(&o));
    ok(app(&k1, "plain.ovl", &["--allow-unencrypted"], "b.ovl"));
    // The right key: the layer applies on top of its parent.
    ok(app(&k1, "os.ovl", &[], "a.ovl"));
    let v = tool!(
        "dekimberlize",
        "verify",
        "--base",
        d.join("base"),
        "-i",
        d.join("os.ovl"),
        "-i",
        d.join("a.ovl"),
        "-k",
        &k1
    );
    ok(v);
    assert_eq!(temps(d), Vec::<String>::new());
}

/// Without SCRIPTS on the command line, the examples find their scripts
/// beside themselves also once the depfiles exist (`-include` appends them
/// to MAKEFILE_LIST, which the directory used to be taken from lazily).
#[test]
fn the_examples_find_their_scripts_after_the_depfiles_exist() {
    if !have_make() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    std::fs::write(t.path().join("os.ovl.d"), "os.ovl: base/manifest.json\n").unwrap();
    std::fs::write(t.path().join("app.ovl.d"), "app.ovl: os.ovl\n").unwrap();
    for mk in ["Makefile", "linux.mk"] {
        let o = run(Command::new("make")
            .current_dir(t.path())
            .arg("-s")
            .arg("-f")
            .arg(example().join(mk))
            .args(["--eval", "show-scripts: ; @echo $(SCRIPTS)", "show-scripts"]));
        assert!(o.status.success(), "{mk}: {}", stderr(&o));
        let shown = String::from_utf8_lossy(&o.stdout).trim().to_string();
        assert_eq!(
            std::fs::canonicalize(&shown).unwrap(),
            std::fs::canonicalize(example()).unwrap(),
            "{mk}: SCRIPTS is {shown:?}"
        );
    }
}
