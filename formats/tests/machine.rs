//! Version-2 VM directories (a machine description, kernel and initrd
//! components) through diff and apply: the launch VM keeps its base's
//! machine, and VMs of different machines are never related.

mod common;

use std::path::Path;

use common::*;
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::diff::{diff, DiffOptions, Protection};
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::dir::digest_file;
use kimberley_formats::vmdir::{Component, Kind, MachineSpec, VmDir};

fn spec(accel: &str) -> MachineSpec {
    MachineSpec {
        backend: "qemu".into(),
        version: "7.2.19".into(),
        machine_type: "pc-i440fx-7.2".into(),
        accel: accel.into(),
        cpu: "qemu64".into(),
        cmdline: "console=ttyS0 quiet".into(),
        devices: vec!["virtio-serial-pci".into(), "virtio-blk-pci".into()],
    }
}

/// Turns the VM directory at `dir` into a version-2 one with a kernel
/// and an initrd (`initrd` bytes) and `machine`, in place.
fn make_v2(dir: &Path, initrd: &[u8], machine: MachineSpec) {
    let mut m = VmDir::open(dir).unwrap().manifest;
    let kernel: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let state = m.components.pop().filter(|c| c.kind == Kind::State);
    for (kind, bytes) in [(Kind::Kernel, &kernel[..]), (Kind::Initrd, initrd)] {
        let name = kimberley_formats::vmdir::file_name(kind, 0);
        std::fs::write(dir.join(&name), bytes).unwrap();
        let f = std::fs::File::open(dir.join(&name)).unwrap();
        m.components.push(Component {
            kind,
            size: bytes.len() as u64,
            digest: digest_file(&f, bytes.len() as u64).unwrap(),
            trimmed: false,
        });
    }
    m.components.extend(state);
    m.machine = Some(Box::new(machine));
    std::fs::write(dir.join("manifest.json"), m.encode()).unwrap();
}

fn initrd(seed: u8, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect()
}

#[test]
fn a_launch_vm_runs_on_its_base_machine() {
    let t = tempfile::tempdir().unwrap();
    let pair = small_pair(t.path(), 3);
    make_v2(&pair.base, &initrd(3, 100_000), spec("tcg"));
    let mut changed = initrd(3, 100_000);
    changed[50_000..50_100].fill(0xee);
    changed.extend_from_slice(b"grown");
    make_v2(&pair.launch, &changed, spec("tcg"));
    let text = std::fs::read_to_string(pair.launch.join("manifest.json")).unwrap();
    assert!(text.contains("\"version\": 2") && text.contains("\"kind\": \"initrd\""));

    let (ovl, _) = diff_bytes(&pair.base, &pair.launch, Protection::Key(KEY), None);
    let out = t.path().join("out");
    apply(&pair.base, &[&ovl], &out, Some(Secret::Key(KEY))).unwrap();
    assert_same_vm(&out, &pair.launch);
    let o = VmDir::open(&out).unwrap();
    assert_eq!(o.manifest.machine.as_deref(), Some(&spec("tcg")));
    assert_eq!(
        std::fs::read_to_string(out.join("manifest.json")).unwrap(),
        text,
        "the launch manifest is written back exactly"
    );
}

#[test]
fn vms_of_different_machines_are_not_diffed() {
    let t = tempfile::tempdir().unwrap();
    let pair = small_pair(t.path(), 4);
    make_v2(&pair.base, &initrd(4, 8192), spec("tcg"));
    make_v2(&pair.launch, &initrd(4, 8192), spec("kvm"));
    let err = |base: &Path, launch: &Path| {
        let base = VmDir::open(base).unwrap();
        let launch = VmDir::open(launch).unwrap();
        let opts = DiffOptions::new(Protection::Key(KEY));
        let Err(e) = diff(&base, &launch, &opts, Vec::new(), &Progress::default()) else {
            panic!("diff must refuse");
        };
        e
    };
    let e = err(&pair.base, &pair.launch);
    assert_eq!(e.exit_code(), 7, "{e}");
    assert!(e.to_string().contains("another machine"), "{e}");

    // A microVM base (version 1) and a QEMU launch VM: refused too.
    std::fs::create_dir(t.path().join("v1")).unwrap();
    let v1 = small_pair(&t.path().join("v1"), 4);
    let e = err(&v1.base, &pair.launch);
    assert_eq!(e.exit_code(), 7, "{e}");
}

#[test]
fn a_version_1_directory_with_a_kernel_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let pair = small_pair(t.path(), 5);
    make_v2(&pair.base, &initrd(5, 4096), spec("tcg"));
    let text = std::fs::read_to_string(pair.base.join("manifest.json")).unwrap();
    let start = text.find(",\n  \"machine\"").unwrap();
    let end = text.rfind('}').unwrap();
    let v1 =
        format!("{}\n{}", &text[..start], &text[end..]).replace("\"version\": 2", "\"version\": 1");
    std::fs::write(pair.base.join("manifest.json"), v1).unwrap();
    let Err(e) = VmDir::open(&pair.base) else {
        panic!("a version-1 manifest with a kernel must be refused");
    };
    assert_eq!(e.exit_code(), 7, "{e}");
    assert!(e.to_string().contains("machine description"), "{e}");
}

/// The golden version-2 manifest (testdata/vectors/machine, written by
/// `kimberlize base --qemu`): read, re-encoded byte for byte, and its
/// identity as listed in testdata/vectors/README.md.
#[test]
fn the_golden_version_2_manifest() {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/vectors/machine/manifest-v2.json");
    let bytes = std::fs::read(p).unwrap();
    let m = kimberley_formats::vmdir::Manifest::parse(&bytes).unwrap();
    let spec = m.machine.as_deref().unwrap();
    assert_eq!(
        (
            spec.backend.as_str(),
            spec.machine_type.as_str(),
            spec.accel.as_str()
        ),
        ("qemu", "pc-i440fx-7.2", "tcg")
    );
    let kinds: Vec<Kind> = m.components.iter().map(|c| c.kind).collect();
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
    assert_eq!(m.encode(), bytes, "writers emit exactly this");
    assert_eq!(
        kimberley_formats::digest::hex(&m.identity()),
        GOLDEN_IDENTITY
    );
    // The machine is not part of the identity.
    let mut other = m.clone();
    other.machine = None;
    other
        .components
        .retain(|c| !matches!(c.kind, Kind::Kernel | Kind::Initrd));
    let mut same = m.clone();
    same.machine.as_mut().unwrap().version = "9.9.9".into();
    assert_eq!(same.identity(), m.identity());
    assert_ne!(other.identity(), m.identity());
}

const GOLDEN_IDENTITY: &str = "94cdccdc3281ee09d2171a9021a5048060b40b61aaa20e672a1a62ca4140f1b3";
