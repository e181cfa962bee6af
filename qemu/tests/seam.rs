//! The QEMU backend through the machine seam: boot into a VM directory,
//! restore a copy into a new one, run scripts through the agent, suspend
//! into it, restore that in place and suspend in place; directories it
//! cannot resume are refused with a clear error.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use kimberley_formats::vmdir::{Kind, VmDir, VmDirWriter, MANIFEST};
use kimberley_machine::{Backend, Machine, RestoreOptions};
use kimberley_qemu::{boot, qemu_for_tests, AccelChoice, BootConfig, QemuBackend};

const SCRIPT: Duration = Duration::from_secs(60);

fn run(m: &mut dyn Machine, script: &str) -> Vec<String> {
    let mut streamed = Vec::new();
    let o = m
        .agent()
        .run_script(script, &mut |l| streamed.push(l.to_string()), SCRIPT)
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    assert_eq!(o.status, 0, "{script}: {:?}", o.lines);
    assert_eq!(streamed, o.lines);
    o.lines
}

fn count(m: &mut dyn Machine) -> u64 {
    run(m, "cat /tmp/count")[0].parse().unwrap()
}

fn rewrite_manifest(dir: &Path, edit: impl FnOnce(&mut kimberley_formats::vmdir::MachineSpec)) {
    let p = dir.join(MANIFEST);
    let mut m = kimberley_formats::vmdir::Manifest::parse(&std::fs::read(&p).unwrap()).unwrap();
    edit(m.machine.as_mut().unwrap());
    std::fs::write(&p, m.encode()).unwrap();
}

#[test]
fn base_build_run_through_the_seam() {
    if !qemu_for_tests() {
        return;
    }
    let a = common::artifacts();
    let _slot = common::qemu_slot();
    let t = tempfile::tempdir().unwrap();

    // base
    let mut cfg = BootConfig::new(&a.kernel, Some(a.initrd.clone()));
    cfg.accel = AccelChoice::Auto;
    // A qcow2 disk (converted to raw into the VM directory) with a marker.
    let raw = t.path().join("disk.raw");
    std::fs::write(&raw, b"qcow2-marker").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&raw)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let disk = t.path().join("disk.qcow2");
    let ok = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&disk)
        .status()
        .unwrap();
    assert!(ok.success());
    cfg.disks = vec![disk];
    let booted = boot(
        &cfg,
        VmDirWriter::create(&t.path().join("base")).unwrap(),
        "base",
        Duration::from_secs(60),
    )
    .unwrap();
    eprintln!(
        "base: {:?} ({}), booted in {:?}, suspended in {:?}",
        booted.accel, booted.accel_reason, booted.boot_time, booted.suspend_time
    );
    let base = VmDir::open(&booted.dir).unwrap();
    base.verify().unwrap();
    let spec = base.manifest.machine.as_deref().unwrap().clone();
    assert_eq!(
        (spec.backend.as_str(), spec.machine_type.as_str()),
        ("qemu", "pc-i440fx-7.2")
    );
    assert!(
        spec.version.starts_with("7.") || spec.version.contains('.'),
        "{spec:?}"
    );
    assert_eq!(base.manifest.components[1].size, 8 << 20);
    let kinds: Vec<Kind> = base.manifest.components.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        [
            Kind::Memory,
            Kind::Disk,
            Kind::Kernel,
            Kind::Initrd,
            Kind::State
        ]
    );
    let backend = QemuBackend::default();
    backend.check(&base).unwrap();

    // build: run on copies in a new directory, suspend into it.
    let w = VmDirWriter::create(&t.path().join("launch")).unwrap();
    let mut m = backend
        .restore(&base, RestoreOptions::copy_into(&w))
        .unwrap();
    m.agent().ping(Duration::from_secs(30)).unwrap();
    assert_eq!(run(m.as_mut(), "head -c 12 /dev/vda"), ["qcow2-marker"]);
    let token = common::token();
    run(
        m.as_mut(),
        &format!(
            "echo {token} > /tmp/file; dd if=/dev/zero of=/dev/vda bs=4096 count=1 2>/dev/null; \
             echo {token} | dd of=/dev/vda conv=notrunc 2>/dev/null; sync; \
             (i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done) >/dev/null 2>&1 & sleep 0.6"
        ),
    );
    let c1 = count(m.as_mut());
    let t0 = Instant::now();
    let launch = m.suspend_into(w, "launch").unwrap();
    eprintln!("suspend_into (copies in place): {:?}", t0.elapsed());
    assert!(m.is_paused());
    // Its files are the launch directory's now: it must not run again.
    assert!(m.resume().is_err());
    drop(m);
    let launch = VmDir::open(&launch).unwrap();
    launch.verify().unwrap();
    // The base was only read.
    base.verify().unwrap();

    // run: in place, then suspend in place.
    let t1 = Instant::now();
    let mut m = backend
        .restore(&launch, RestoreOptions::in_place())
        .unwrap();
    m.agent().ping(Duration::from_secs(30)).unwrap();
    eprintln!(
        "in-place restore to the agent's first answer: {:?}",
        t1.elapsed()
    );
    assert_eq!(run(m.as_mut(), "cat /tmp/file"), [token.as_str()]);
    assert_eq!(
        run(m.as_mut(), "head -c 12 /dev/vda"),
        [token[..12].to_string()]
    );
    let c2 = count(m.as_mut());
    assert!(c2 >= c1 && c2 < c1 + 50, "{c1} -> {c2}");
    run(m.as_mut(), "echo second > /tmp/file2");
    let again = m.suspend_in_place(&launch).unwrap();
    assert_eq!(again, launch.path);
    drop(m);
    let launch = VmDir::open(&again).unwrap();
    launch.verify().unwrap();

    // A snapshot of a machine that keeps running elsewhere: copies.
    let mut m = backend
        .restore(&launch, RestoreOptions::in_place())
        .unwrap();
    assert_eq!(run(m.as_mut(), "cat /tmp/file2"), ["second"]);
    let snap = m
        .suspend_into(VmDirWriter::create(&t.path().join("snap")).unwrap(), "snap")
        .unwrap();
    m.resume().unwrap();
    let c3 = count(m.as_mut());
    assert!(c3 >= c2, "{c2} -> {c3}");
    drop(m);
    VmDir::open(&snap).unwrap().verify().unwrap();

    // Forwards need a NIC.
    let e = backend
        .restore(
            &VmDir::open(&snap).unwrap(),
            RestoreOptions {
                forwards: vec!["18080:80".parse().unwrap()],
                ..RestoreOptions::in_place()
            },
        )
        .err()
        .unwrap();
    assert!(e.to_string().contains("no network card"), "{e}");

    // Directories it cannot resume.
    let snap = t.path().join("snap");
    rewrite_manifest(&snap, |s| s.machine_type = "pc-i440fx-99.0".into());
    let e = backend.check(&VmDir::open(&snap).unwrap()).unwrap_err();
    assert!(e.to_string().contains("pc-i440fx-99.0"), "{e}");
    rewrite_manifest(&snap, |s| {
        s.machine_type = "pc-i440fx-7.2".into();
        s.accel = "kvm".into();
    });
    if kimberley_qemu::accel::HostFacts::probe()
        .kvm_runs_linux()
        .is_err()
    {
        let e = backend.check(&VmDir::open(&snap).unwrap()).unwrap_err();
        assert!(e.to_string().contains("KVM"), "{e}");
    }
    rewrite_manifest(&snap, |s| {
        s.accel = "tcg".into();
        s.backend = "other".into();
    });
    let e = backend.check(&VmDir::open(&snap).unwrap()).unwrap_err();
    assert!(e.to_string().contains("\"other\""), "{e}");
}
