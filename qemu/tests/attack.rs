//! A VM directory swapped under a restore: QEMU must use the very files
//! `VmDir::open` checked, never a symbolic link planted afterwards (which
//! would let the guest read or overwrite a host file).

mod common;

use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use kimberley_formats::vmdir::{VmDir, VmDirWriter};
use kimberley_machine::{Backend, RestoreOptions};
use kimberley_qemu::{boot, qemu_for_tests, BootConfig, QemuBackend};

#[test]
fn components_swapped_for_links_after_open_are_not_used() {
    if !qemu_for_tests() {
        return;
    }
    let a = common::artifacts();
    let _slot = common::qemu_slot();
    let t = tempfile::tempdir().unwrap();
    let mut cfg = BootConfig::new(&a.kernel, Some(a.initrd.clone()));
    let disk = t.path().join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    cfg.disks = vec![disk];
    let b = boot(
        &cfg,
        VmDirWriter::create(&t.path().join("vm")).unwrap(),
        "vm",
        Duration::from_secs(60),
    )
    .unwrap();
    let backend = QemuBackend::default();
    for file in ["memory.raw", "disk0.raw", "kernel", "initrd"] {
        let dir = VmDir::open(&b.dir).unwrap();
        // A host file of the same size as the component, then the link.
        let p = dir.path.join(file);
        let host = t.path().join(format!("host-{file}"));
        let len = std::fs::metadata(&p).unwrap().len();
        std::fs::write(&host, vec![0x5a; len as usize]).unwrap();
        let aside = t.path().join(format!("aside-{file}"));
        std::fs::rename(&p, &aside).unwrap();
        std::os::unix::fs::symlink(&host, &p).unwrap();
        let before = std::fs::metadata(&host).unwrap();

        let r = backend.restore(&dir, RestoreOptions::in_place());
        if let Ok(mut m) = r {
            // It runs the checked files: the guest is the one suspended.
            m.agent().ping(Duration::from_secs(30)).unwrap();
            let o = m
                .agent()
                .run_script(
                    "uname -r; head -c 4096 /dev/vda | wc -c",
                    &mut |_| {},
                    Duration::from_secs(30),
                )
                .unwrap();
            assert_eq!(o.status, 0, "{file}: {:?}", o.lines);
            assert!(o.lines[0].contains("cloud-amd64"), "{file}: {:?}", o.lines);
            m.pause().unwrap();
            drop(m);
        }
        let after = std::fs::metadata(&host).unwrap();
        assert_eq!(
            (before.mtime(), before.mtime_nsec(), before.ino()),
            (after.mtime(), after.mtime_nsec(), after.ino()),
            "{file}: the host file was written"
        );
        assert!(
            std::fs::read(&host).unwrap().iter().all(|&x| x == 0x5a),
            "{file}: the host file changed"
        );
        std::fs::remove_file(&p).unwrap();
        std::fs::rename(&aside, &p).unwrap();
    }
}
