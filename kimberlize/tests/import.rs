//! `kimberlize import`: images in another format are detected by their magic and converted with qemu-img (or refused), never taken as raw; `--reflink` copies the same content.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kimberley_formats::sparse::data_extents;
use kimberley_formats::vmdir::VmDir;

fn text(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn qemu_img(args: &[&dyn AsRef<std::ffi::OsStr>]) {
    let mut c = Command::new("qemu-img");
    for a in args {
        c.arg(a);
    }
    let o = c
        .output()
        .expect("qemu-img (Debian: qemu-utils) is needed by these tests");
    assert!(o.status.success(), "qemu-img: {}", text(&o));
}

/// A 4 MiB raw disk with data at a few offsets and holes elsewhere, and a
/// 1 MiB raw memory file.
fn raws(t: &Path) -> (PathBuf, PathBuf) {
    let disk = t.join("disk.raw");
    let f = std::fs::File::create(&disk).unwrap();
    f.set_len(4 << 20).unwrap();
    for (off, byte) in [(0u64, 0x11u8), (1 << 20, 0x22), ((3 << 20) + 4096, 0x33)] {
        let data: Vec<u8> = (0..65536u32).map(|i| byte ^ (i % 251) as u8).collect();
        f.write_all_at(&data, off).unwrap();
    }
    let mem = t.join("mem.raw");
    let m = std::fs::File::create(&mem).unwrap();
    m.set_len(1 << 20).unwrap();
    m.write_all_at(b"guest memory", 8192).unwrap();
    (mem, disk)
}

fn import(t: &Path, out: &str, mem: &Path, disk: &Path, extra: &[&str]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kimberlize"));
    c.args(["import", "--name", "vm", "-o"])
        .arg(t.join(out))
        .arg("--memory")
        .arg(mem)
        .arg("--disk")
        .arg(disk)
        .args(extra)
        .stdin(Stdio::null());
    c.output().unwrap()
}

fn manifest(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("manifest.json")).unwrap()
}

fn data_bytes(p: &Path) -> u64 {
    let f = std::fs::File::open(p).unwrap();
    let size = f.metadata().unwrap().len();
    data_extents(&f, size)
        .unwrap()
        .iter()
        .map(|(a, b)| b - a)
        .sum()
}

#[test]
fn a_qcow2_disk_imports_to_the_raw_disks_digest() {
    let t = tempfile::tempdir().unwrap();
    let (mem, disk) = raws(t.path());
    let q = t.path().join("disk.qcow2");
    qemu_img(&[&"convert", &"-f", &"raw", &"-O", &"qcow2", &disk, &q]);
    let raw = import(t.path(), "raw-vm", &mem, &disk, &[]);
    assert!(raw.status.success(), "{}", text(&raw));
    let conv = import(t.path(), "qcow2-vm", &mem, &q, &[]);
    assert!(conv.status.success(), "{}", text(&conv));
    // The same VM: sizes and digests in the manifests are equal.
    assert_eq!(
        manifest(&t.path().join("raw-vm")),
        manifest(&t.path().join("qcow2-vm"))
    );
    let vm = VmDir::open(&t.path().join("qcow2-vm")).unwrap();
    vm.verify().unwrap();
    // Converted sparse: the holes of the 4 MiB disk stay holes.
    let d = data_bytes(&t.path().join("qcow2-vm/disk0.raw"));
    assert!(d < 1 << 20, "{d} bytes of data in the converted disk");
    // The summary says what happened.
    let e = text(&conv);
    assert!(e.contains("disk0.raw converted from qcow2"), "{e}");
    assert!(e.starts_with("imported "), "{e}");
}

#[test]
fn vmdk_vdi_and_fixed_vhd_are_converted_not_taken_raw() {
    let t = tempfile::tempdir().unwrap();
    let (mem, disk) = raws(t.path());
    let want = {
        let o = import(t.path(), "raw-vm", &mem, &disk, &[]);
        assert!(o.status.success(), "{}", text(&o));
        manifest(&t.path().join("raw-vm"))
    };
    // A fixed VHD has no header, only a footer at its end.
    for (fmt, opts, name) in [
        ("vmdk", "", "VMDK"),
        ("vdi", "", "VDI"),
        ("vpc", "subformat=fixed,force_size=on", "VHD"),
        ("vhdx", "", "VHDX"),
    ] {
        let img = t.path().join(format!("disk.{fmt}"));
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> =
            vec![&"convert", &"-f", &"raw", &"-O", &fmt];
        if !opts.is_empty() {
            args.extend([&"-o" as &dyn AsRef<std::ffi::OsStr>, &opts]);
        }
        args.extend([&disk as &dyn AsRef<std::ffi::OsStr>, &img]);
        qemu_img(&args);
        let out = format!("{fmt}-vm");
        let o = import(t.path(), &out, &mem, &img, &[]);
        assert!(o.status.success(), "{fmt}: {}", text(&o));
        assert!(
            text(&o).contains(&format!("converted from {name}")),
            "{fmt}: {}",
            text(&o)
        );
        assert_eq!(manifest(&t.path().join(&out)), want, "{fmt}");
    }
}

#[test]
fn without_qemu_img_an_image_is_refused_with_the_command_to_convert_it() {
    let t = tempfile::tempdir().unwrap();
    let (mem, disk) = raws(t.path());
    let vdi = t.path().join("disk.vdi");
    qemu_img(&[&"convert", &"-f", &"raw", &"-O", &"vdi", &disk, &vdi]);
    let o = Command::new(env!("CARGO_BIN_EXE_kimberlize"))
        .args(["import", "-o"])
        .arg(t.path().join("vm"))
        .arg("--memory")
        .arg(&mem)
        .arg("--disk")
        .arg(&vdi)
        .env("PATH", t.path().join("nowhere"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let e = text(&o);
    assert!(e.contains("is a VDI image, not raw"), "{e}");
    assert!(e.contains("qemu-img convert -f vdi -O raw"), "{e}");
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(!t.path().join("vm").exists());
}

#[test]
fn guest_memory_in_an_image_format_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (mem, disk) = raws(t.path());
    let q = t.path().join("mem.qcow2");
    qemu_img(&[&"convert", &"-f", &"raw", &"-O", &"qcow2", &mem, &q]);
    let o = import(t.path(), "vm", &q, &disk, &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        text(&o).contains("is a qcow2 image: guest memory must be a raw file"),
        "{}",
        text(&o)
    );
    assert!(!t.path().join("vm").exists());
}

/// An image naming a backing file would copy whatever that file is (any
/// file the importing user can read) into the VM directory.
#[test]
fn attack_an_image_with_a_backing_file_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (mem, _) = raws(t.path());
    let secret = t.path().join("secret");
    std::fs::write(&secret, b"the host's private key").unwrap();
    let q = t.path().join("innocent.qcow2");
    qemu_img(&[
        &"create", &"-f", &"qcow2", &"-F", &"raw", &"-b", &secret, &q, &"1M",
    ]);
    let o = import(t.path(), "vm", &mem, &q, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("names other files"), "{}", text(&o));
    assert!(!t.path().join("vm").exists());
}

#[test]
fn reflink_copies_the_same_content_and_digest() {
    let t = tempfile::tempdir().unwrap();
    let (mem, disk) = raws(t.path());
    let plain = import(t.path(), "plain", &mem, &disk, &[]);
    assert!(plain.status.success(), "{}", text(&plain));
    let r = import(t.path(), "reflinked", &mem, &disk, &["--reflink"]);
    assert!(r.status.success(), "{}", text(&r));
    assert_eq!(
        manifest(&t.path().join("plain")),
        manifest(&t.path().join("reflinked"))
    );
    for f in ["memory.raw", "disk0.raw"] {
        assert_eq!(
            std::fs::read(t.path().join("plain").join(f)).unwrap(),
            std::fs::read(t.path().join("reflinked").join(f)).unwrap(),
            "{f}"
        );
    }
    VmDir::open(&t.path().join("reflinked"))
        .unwrap()
        .verify()
        .unwrap();
    // Whichever way worked on this file system, the summary names it.
    let e = text(&r);
    assert!(
        e.contains("disk0.raw reflinked") || e.contains("disk0.raw copied in the kernel"),
        "{e}"
    );
}

#[test]
fn summary_off_a_terminal_unless_quiet() {
    let t = tempfile::tempdir().unwrap();
    let (mem, disk) = raws(t.path());
    let o = import(t.path(), "a", &mem, &disk, &[]);
    assert!(o.status.success());
    let e = text(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(e.contains("5.0 MiB VM from 5.0 MiB of images in "), "{e}");
    let o = import(t.path(), "b", &mem, &disk, &["-q"]);
    assert!(o.status.success());
    assert_eq!(text(&o), "");
}

/// A VMDK descriptor names its extents: a "flat" extent that is another
/// file would copy that file into the VM directory.
#[test]
fn attack_a_vmdk_descriptor_naming_another_file_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (mem, _) = raws(t.path());
    let secret = t.path().join("secret");
    std::fs::write(&secret, b"the host's private key").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&secret)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let d = t.path().join("disk.vmdk");
    std::fs::write(
        &d,
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\nRW 2048 FLAT \"secret\" 0\nddb.adapterType = \"ide\"\n",
    )
    .unwrap();
    let o = import(t.path(), "vm", &mem, &d, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("names other files"), "{}", text(&o));
    assert!(!t.path().join("vm").exists());
}

/// A qcow2 image may keep its data in an external data file.
#[test]
fn attack_a_qcow2_with_an_external_data_file_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let (mem, _) = raws(t.path());
    let q = t.path().join("disk.qcow2");
    let data = t.path().join("data.raw");
    let opts = format!("data_file={},data_file_raw=on", data.display());
    qemu_img(&[&"create", &"-q", &"-f", &"qcow2", &"-o", &opts, &q, &"1M"]);
    std::fs::write(&data, b"the host's private key").unwrap();
    let o = import(t.path(), "vm", &mem, &q, &[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("names other files"), "{}", text(&o));
    assert!(!t.path().join("vm").exists());
}

#[test]
fn relative_image_paths_convert() {
    let t = tempfile::tempdir().unwrap();
    let (mem, disk) = raws(t.path());
    std::fs::create_dir(t.path().join("sub")).unwrap();
    for fmt in ["qcow2", "vmdk"] {
        let img = t.path().join("sub").join(format!("disk.{fmt}"));
        qemu_img(&[&"convert", &"-f", &"raw", &"-O", &fmt, &disk, &img]);
        let o = Command::new(env!("CARGO_BIN_EXE_kimberlize"))
            .args(["import", "-o", &format!("{fmt}-vm"), "--memory"])
            .arg(&mem)
            .args(["--disk", &format!("sub/disk.{fmt}")])
            .current_dir(t.path())
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(o.status.success(), "{fmt}: {}", text(&o));
    }
}
