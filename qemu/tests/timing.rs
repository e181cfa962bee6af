//! Suspend (pause to committed VM directory, fsync included) and resume
//! (restore to the agent's first answer) of 256 MiB and 1 GiB guests,
//! measured and printed (the targets: 200 ms and 500 ms).

mod common;

use std::time::{Duration, Instant};

use kimberley_formats::vmdir::{VmDir, VmDirWriter};
use kimberley_machine::{Backend, RestoreOptions};
use kimberley_qemu::{boot, qemu_for_tests, BootConfig, QemuBackend};

#[test]
fn suspend_and_resume_times() {
    if !qemu_for_tests() {
        return;
    }
    let a = common::artifacts();
    let _slot = common::qemu_slot();
    let t = tempfile::tempdir().unwrap();
    let backend = QemuBackend::default();
    for (label, size) in [("256 MiB", 256u64 << 20), ("1 GiB", 1 << 30)] {
        let mut cfg = BootConfig::new(&a.kernel, Some(a.initrd.clone()));
        cfg.memory_size = size;
        let dir = t.path().join(format!("vm-{size}"));
        let b = boot(
            &cfg,
            VmDirWriter::create(&dir).unwrap(),
            "timing",
            Duration::from_secs(60),
        )
        .unwrap();
        let vm = VmDir::open(&b.dir).unwrap();
        // The first check asks QEMU what it offers (then cached).
        let tc = Instant::now();
        backend.check(&vm).unwrap();
        let check = tc.elapsed();
        let t0 = Instant::now();
        let mut m = backend.restore(&vm, RestoreOptions::in_place()).unwrap();
        let restored = t0.elapsed();
        m.agent().ping(Duration::from_secs(30)).unwrap();
        let resume = t0.elapsed();
        let ts = Instant::now();
        let o = m
            .agent()
            .run_script("echo x > /tmp/x", &mut |_| {}, Duration::from_secs(30))
            .unwrap();
        let script = ts.elapsed();
        assert_eq!(o.status, 0);
        let t1 = Instant::now();
        m.pause().unwrap();
        m.suspend_in_place(&vm).unwrap();
        let suspend = t1.elapsed();
        drop(m);
        VmDir::open(&b.dir).unwrap().verify().unwrap();
        eprintln!(
            "TIMING {label}: boot {:?}; suspend after boot {:?}; check {check:?}; restore (cont) \
             {restored:?}, to the agent's first answer {resume:?}; a one-line script {script:?}; suspend in place \
             (pause to committed) {suspend:?}",
            b.boot_time, b.suspend_time
        );
    }
}
