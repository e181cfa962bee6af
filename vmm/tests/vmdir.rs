//! VM directories under attack (real KVM): a component swapped for a
//! symbolic link or another file after the directory was checked is never
//! used, a path given to `Vm::restore` is not followed through a link, and
//! a suspended VM is private even under umask 000.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use common::*;
use kimberley_formats::vmdir::{VmDir, VmDirWriter};
use kimberley_vmm::{vmdir, Vm};

/// A suspended VM with one 4 MiB disk the guest wrote to, at `dir/vm`.
fn suspended(dir: &Path) -> PathBuf {
    let disk = make_disk(dir, 4 << 20);
    let mut vm = boot(32, &[&disk]);
    run_ok(&mut vm, "disk-write 0 64K 3\nfill a 1M 5 random");
    let w = VmDirWriter::create(&dir.join("vm")).unwrap();
    let out = vmdir::save_into(&mut vm, w, "vm").unwrap();
    std::fs::remove_file(disk).unwrap();
    out
}

/// Bytes and modification time of a file.
fn snapshot(p: &Path) -> (Vec<u8>, SystemTime) {
    (
        std::fs::read(p).unwrap(),
        std::fs::metadata(p).unwrap().modified().unwrap(),
    )
}

#[test]
fn a_component_swapped_after_the_check_is_not_used() {
    if !kvm_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm = suspended(t.path());
    let host = t.path().join("host-file");
    for file in ["disk0.raw", "memory.raw", "state.bin"] {
        let dir = VmDir::open(&vm).unwrap();
        // A host file with exactly the component's bytes, linked in its place.
        std::fs::copy(vm.join(file), &host).unwrap();
        let original = t.path().join("original");
        std::fs::rename(vm.join(file), &original).unwrap();
        std::os::unix::fs::symlink(&host, vm.join(file)).unwrap();
        let before = snapshot(&host);
        let r = vmdir::restore(&dir);
        if file == "disk0.raw" {
            // The disk is the one file opened again (read-write): refused.
            let e = r.expect_err(file).to_string();
            assert!(e.contains(file), "{e}");
        } else {
            // Memory and state come from the files opened when the
            // directory was checked, not from the path.
            let mut v = r.unwrap_or_else(|e| panic!("{file}: {e}"));
            run_ok(&mut v, "disk-write 0 64K 4\nprint alive");
        }
        assert!(before == snapshot(&host), "{file}: the host file changed");
        std::fs::remove_file(vm.join(file)).unwrap();
        std::fs::rename(&original, vm.join(file)).unwrap();
    }
    // Another regular file in place of the disk is refused too.
    let dir = VmDir::open(&vm).unwrap();
    std::fs::copy(vm.join("disk0.raw"), &host).unwrap();
    std::fs::rename(&host, vm.join("disk0.raw")).unwrap();
    let e = vmdir::restore(&dir)
        .expect_err("a replaced disk")
        .to_string();
    assert!(e.contains("disk0.raw"), "{e}");
}

#[test]
fn restore_by_path_does_not_follow_links() {
    if !kvm_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let vm = suspended(t.path());
    let state = std::fs::read(vm.join("state.bin")).unwrap();
    let (mem, disk) = (vm.join("memory.raw"), vm.join("disk0.raw"));
    let link = t.path().join("link");
    for target in [&mem, &disk] {
        std::os::unix::fs::symlink(target, &link).unwrap();
        let before = snapshot(target);
        let (m, d) = if target == &mem {
            (link.clone(), disk.clone())
        } else {
            (mem.clone(), link.clone())
        };
        let e = Vm::restore(&m, vec![d], &state).expect_err("followed a link");
        assert!(e.to_string().contains("link"), "{e}");
        assert!(before == snapshot(target));
        std::fs::remove_file(&link).unwrap();
    }
    // The same files, named directly, restore.
    let mut v = Vm::restore(&mem, vec![disk], &state).unwrap();
    run_ok(&mut v, "print alive");
}

#[test]
fn a_suspended_vm_is_private_under_umask_000() {
    const CHILD: &str = "KIMBERLEY_TEST_UMASK_CHILD";
    let name = "a_suspended_vm_is_private_under_umask_000";
    if std::env::var(CHILD).as_deref() != Ok(name) {
        if !kvm_available() {
            return;
        }
        // The umask is per process: run this test again in a child.
        let o = std::process::Command::new("sh")
            .args(["-c", "umask 000 && exec \"$0\" \"$@\""])
            .arg(std::env::current_exe().unwrap())
            .args([name, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD, name)
            .output()
            .unwrap();
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && out.contains("1 passed"),
            "{out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let mode = |p: &Path| std::fs::symlink_metadata(p).unwrap().mode() & 0o7777;
    let control = t.path().join("control");
    std::fs::File::create(&control).unwrap();
    assert_eq!(mode(&control), 0o666, "the child's umask is not 000");
    let vm = suspended(t.path());
    let check = |vm: &Path| {
        assert_eq!(mode(vm), 0o700);
        for f in ["manifest.json", "memory.raw", "disk0.raw", "state.bin"] {
            assert_eq!(mode(&vm.join(f)), 0o600, "{f}");
        }
    };
    check(&vm);
    // Suspending in place writes a new version of the directory.
    let dir = VmDir::open(&vm).unwrap();
    let mut v = vmdir::restore(&dir).unwrap();
    run_ok(&mut v, "print alive");
    vmdir::save_in_place(&mut v, &dir).unwrap();
    check(&vm);
}
