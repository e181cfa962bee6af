//! Suspends of a VM restored copy-on-write from its VMDIR write only the
//! pages it changed (in place, or into a copy elsewhere), resume byte for
//! byte, keep digests right, and never update a memory file another VM
//! still maps.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use common::*;
use kimberley_formats::vmdir::{VmDir, VmDirWriter};
use kimberley_vmm::{vmdir, Vm};

const REGIONS: &str = "checksum cold\nchecksum hot\nchecksum zz";

/// A suspended 64 MiB VM whose memory is mostly a 24 MiB random region.
fn suspended(dir: &Path) -> PathBuf {
    let mut vm = boot(64, &[]);
    run_ok(&mut vm, "fill cold 24M 1 random");
    vmdir::save_into(&mut vm, VmDirWriter::create(&dir.join("vm")).unwrap(), "vm").unwrap()
}

/// Rewrites pages of `cold` (a dirty job), writes a fresh random region
/// and written zeros; returns the checksums of all three.
fn change(vm: &mut Vm, n: u32) -> Vec<String> {
    let seed = 10 + n;
    run_ok(
        vm,
        &format!(
            "dirty cold 400M\nsleep 10\ndirty cold 0\n\
             fill hot{n} 1M {seed} random\nfill zz{n} 1M 0 zero\n\
             checksum cold\nchecksum hot{n}\nchecksum zz{n}"
        ),
    )
}

fn regions(n: u32) -> String {
    REGIONS
        .replace("hot", &format!("hot{n}"))
        .replace("zz", &format!("zz{n}"))
}

fn ino(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().ino()
}

/// Resumes the VM in `dir` and checks what it holds.
fn resume_and_check(dir: &Path, n: u32, want: &[String]) -> Vm {
    let d = VmDir::open(dir).unwrap();
    d.verify().unwrap();
    let mut vm = vmdir::restore(&d).unwrap();
    assert_eq!(run_ok(&mut vm, &regions(n)), want);
    vm
}

#[test]
fn in_place_updates_the_memory_file_and_resumes_identically() {
    if !kvm_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = suspended(t.path());
    let mem = path.join("memory.raw");
    let first = ino(&mem);
    let mut want = Vec::new();
    // Twice: the second suspend starts from the hashes the first left.
    for n in 0..2 {
        let dir = VmDir::open(&path).unwrap();
        let mut vm = vmdir::restore(&dir).unwrap();
        want = change(&mut vm, n);
        assert_ne!(want[0], "checksum cold 0000000000000000");
        vmdir::save_in_place(&mut vm, &dir).unwrap();
        drop(vm);
        assert_eq!(
            ino(&mem),
            first,
            "the memory file was rewritten, not updated"
        );
        // The digest was computed from the changed blocks only: `verify`
        // reads the whole file.
        drop(resume_and_check(&path, n, &want));
    }
    // The first round's regions are still there too.
    let mut vm = resume_and_check(&path, 1, &want);
    let old = run_ok(&mut vm, &regions(0));
    assert_eq!(old.len(), 3);
}

#[test]
fn elsewhere_copies_the_memory_file_and_leaves_the_source_alone() {
    if !kvm_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = suspended(t.path());
    let before = std::fs::read(path.join("memory.raw")).unwrap();
    let dir = VmDir::open(&path).unwrap();
    let mut vm = vmdir::restore(&dir).unwrap();
    let want = change(&mut vm, 0);
    let out = vmdir::save_into(
        &mut vm,
        VmDirWriter::create(&t.path().join("copy")).unwrap(),
        "copy",
    )
    .unwrap();
    drop(vm);
    assert_ne!(ino(&out.join("memory.raw")), ino(&path.join("memory.raw")));
    assert_eq!(std::fs::read(path.join("memory.raw")).unwrap(), before);
    VmDir::open(&path).unwrap().verify().unwrap();
    drop(resume_and_check(&out, 0, &want));
}

#[test]
fn lazily_restored_memory_is_still_written_whole() {
    if !kvm_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = suspended(t.path());
    let dir = VmDir::open(&path).unwrap();
    let mut vm = vmdir::restore_as(&dir, kimberley_machine::MemorySource::Lazy).unwrap();
    let want = change(&mut vm, 0);
    vmdir::save_in_place(&mut vm, &dir).unwrap();
    drop(vm);
    drop(resume_and_check(&path, 0, &want));
}

/// Attack: a second VM maps the same memory file (restored from the same
/// directory) while the first suspends in place. Updating the file in
/// place would change the second VM's memory under it; the suspend must
/// write a new file instead.
#[test]
fn a_memory_file_another_vm_maps_is_not_updated_in_place() {
    if !kvm_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = suspended(t.path());
    let mem = path.join("memory.raw");
    let first = ino(&mem);
    let dir = VmDir::open(&path).unwrap();
    let mut other = vmdir::restore(&dir).unwrap();
    let original = run_ok(&mut other, "sleep 1");
    assert!(original.is_empty());
    let mut vm = vmdir::restore(&dir).unwrap();
    let cold0 = run_ok(&mut vm, "checksum cold");
    let want = change(&mut vm, 0);
    assert_ne!(want[0], cold0[0]);
    vmdir::save_in_place(&mut vm, &dir).unwrap();
    drop(vm);
    // The other VM still sees the memory it was restored with.
    assert_eq!(run_ok(&mut other, "checksum cold"), cold0);
    assert_ne!(ino(&mem), first, "the file another VM maps was updated");
    drop(other);
    drop(resume_and_check(&path, 0, &want));
}

/// A suspend leaves `memory.blocks` (FORMAT.md section 5.8) beside the
/// memory: the next restore knows every block's hash at once (no
/// background hashing), and suspends in place from them, digests right.
#[test]
fn the_block_hashes_travel_with_the_directory() {
    if !kvm_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = suspended(t.path());
    let dir = VmDir::open(&path).unwrap();
    assert!(
        dir.read_memory_blocks().is_some(),
        "no memory.blocks after a suspend"
    );
    let mut vm = vmdir::restore(&dir).unwrap();
    assert!(vm.memory_hashed(), "the restore hashed the memory again");
    let want = change(&mut vm, 0);
    vmdir::save_in_place(&mut vm, &dir).unwrap();
    drop(vm);
    let dir = VmDir::open(&path).unwrap();
    assert!(
        dir.read_memory_blocks().is_some(),
        "no memory.blocks after an in-place suspend"
    );
    drop(resume_and_check(&path, 0, &want));
}

/// Attack: `memory.blocks` is only a cache. One whose hashes do not give
/// the manifest's memory digest (a block's hash changed) is ignored: the
/// restore hashes the file itself, and the in-place suspend still writes
/// a directory whose digests are those of its files.
#[test]
fn forged_block_hashes_are_ignored() {
    if !kvm_available() {
        return;
    }
    let t = tempfile::tempdir().unwrap();
    let path = suspended(t.path());
    let blocks = path.join(kimberley_formats::vmdir::blocks::BLOCKS_FILE);
    let mut b = std::fs::read(&blocks).unwrap();
    // The hash of block 3, which the VM does not change below.
    b[kimberley_formats::vmdir::blocks::HEADER_LEN + 3 * 32] ^= 1;
    std::fs::write(&blocks, &b).unwrap();
    let dir = VmDir::open(&path).unwrap();
    assert!(
        dir.read_memory_blocks().is_none(),
        "a forged memory.blocks was accepted"
    );
    let mut vm = vmdir::restore(&dir).unwrap();
    let want = change(&mut vm, 0);
    vmdir::save_in_place(&mut vm, &dir).unwrap();
    drop(vm);
    // `verify` reads every file and compares with the manifest.
    drop(resume_and_check(&path, 0, &want));
}
