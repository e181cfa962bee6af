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

/// Runs a program of e2fsprogs, which these tests need.
fn e2(prog: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
    let mut c = Command::new(prog);
    for a in args {
        c.arg(a);
    }
    c.stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{prog} (Debian: e2fsprogs) is needed by these tests: {e}"))
}

/// Bytes that are never all zero in a block.
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8 | 1
        })
        .collect()
}

/// A 64 MiB ext4 image made by mkfs.ext4 (`opts`), with `keep` written
/// and a 3 MB `gone` written then deleted through debugfs. Returns the
/// image, the block size and the blocks `gone` held.
fn ext4_with_a_deleted_file(t: &Path, opts: &[&str]) -> (PathBuf, u64, Vec<u64>) {
    let img = t.join("fs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"-q", &"-F", &"-E", &"nodiscard"];
    for o in opts {
        args.push(o);
    }
    args.push(&img);
    let o = e2("mkfs.ext4", &args);
    assert!(o.status.success(), "mkfs.ext4: {}", text(&o));
    for (name, len, seed) in [("gone", 3_000_000, 1), ("keep", 500_000, 2)] {
        let src = t.join(name);
        std::fs::write(&src, noise(len, seed)).unwrap();
        let req = format!("write {} {name}", src.display());
        let o = e2("debugfs", &[&"-w", &"-R", &req, &img]);
        assert!(o.status.success(), "debugfs: {}", text(&o));
    }
    let o = e2("debugfs", &[&"-R", &"blocks gone", &img]);
    let gone: Vec<u64> = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .map(|b| b.parse().unwrap())
        .collect();
    assert!(gone.len() > 700, "{gone:?}");
    let o = e2("debugfs", &[&"-w", &"-R", &"rm gone", &img]);
    assert!(o.status.success(), "debugfs: {}", text(&o));
    let o = e2("dumpe2fs", &[&"-h", &img]);
    let bs: u64 = String::from_utf8_lossy(&o.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    (img, bs, gone)
}

/// The free blocks dumpe2fs lists, group by group.
fn dumpe2fs_free(img: &Path) -> Vec<(u64, u64)> {
    let o = e2("dumpe2fs", &[&img]);
    let mut free = Vec::new();
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let Some(list) = l.strip_prefix("  Free blocks: ") else {
            continue;
        };
        for r in list.split(", ").filter(|r| !r.is_empty()) {
            let (a, b) = r.split_once('-').unwrap_or((r, r));
            free.push((a.parse().unwrap(), b.parse::<u64>().unwrap() + 1));
        }
    }
    free
}

#[test]
fn trim_makes_the_freed_ext4_blocks_holes_and_keeps_the_file_system() {
    for opts in [&["-b", "1024"][..], &["-b", "4096"]] {
        let t = tempfile::tempdir().unwrap();
        let (mem, _) = raws(t.path());
        let (img, bs, gone) = ext4_with_a_deleted_file(t.path(), opts);
        let before = std::fs::read(&img).unwrap();
        let o = import(t.path(), "vm", &mem, &img, &["--trim"]);
        assert!(o.status.success(), "{opts:?}: {}", text(&o));
        assert!(text(&o).contains("disk0.raw copied, "), "{}", text(&o));
        assert!(text(&o).contains(" free trimmed"), "{}", text(&o));
        let vm = t.path().join("vm");
        let disk = vm.join("disk0.raw");
        // The deleted file's blocks are zeros now, and holes wherever
        // they fill whole pages (a punch zeroes the parts of pages).
        let after = std::fs::read(&disk).unwrap();
        let f = std::fs::File::open(&disk).unwrap();
        let data = data_extents(&f, 64 << 20).unwrap();
        let page = 4096u64.max(bs);
        let mut holes = 0;
        for b in &gone {
            let (a, z) = ((b * bs) as usize, ((b + 1) * bs) as usize);
            assert!(before[a..z].iter().any(|&x| x != 0));
            assert!(after[a..z].iter().all(|&x| x == 0), "{opts:?}: block {b}");
            let p = b * bs / page * page;
            let whole = (p / bs..(p + page) / bs).all(|x| gone.contains(&x));
            if whole && (b * bs) % page == 0 {
                holes += 1;
                assert!(
                    !data.iter().any(|&(s, e)| s < p + page && p < e),
                    "{opts:?}: the page at {p} of the deleted file is not a hole"
                );
            }
        }
        assert!(holes > 500, "{opts:?}: {holes} whole pages");
        // Only free blocks changed (to zeros).
        let free = dumpe2fs_free(&img);
        for (i, (x, y)) in before
            .chunks(bs as usize)
            .zip(after.chunks(bs as usize))
            .enumerate()
        {
            if x != y {
                let i = i as u64;
                assert!(
                    free.iter().any(|&(a, b)| a <= i && i < b),
                    "{opts:?}: block {i} in use changed"
                );
                assert!(y.iter().all(|&b| b == 0), "{opts:?}: block {i}");
            }
        }
        let o = e2("e2fsck", &[&"-fn", &disk]);
        assert!(o.status.success(), "{opts:?}: e2fsck: {}", text(&o));
        let o = e2("debugfs", &[&"-R", &"cat keep", &disk]);
        assert_eq!(o.stdout, noise(500_000, 2), "{opts:?}");
        // The manifest says so, and its digest is of the trimmed disk.
        assert!(
            manifest(&vm).contains("\"trimmed\": true"),
            "{}",
            manifest(&vm)
        );
        VmDir::open(&vm).unwrap().verify().unwrap();
    }
}

#[test]
fn trim_leaves_a_disk_without_ext4_as_it_is_with_a_note() {
    let t = tempfile::tempdir().unwrap();
    let (mem, disk) = raws(t.path());
    let plain = import(t.path(), "plain", &mem, &disk, &[]);
    assert!(plain.status.success(), "{}", text(&plain));
    let o = import(t.path(), "trim", &mem, &disk, &["--trim"]);
    assert!(o.status.success(), "{}", text(&o));
    let e = text(&o);
    assert!(
        e.contains("note: disk0.raw: not trimmed: no ext4 file system or partition table found; left as it is"),
        "{e}"
    );
    assert!(e.contains("disk0.raw copied, not trimmed"), "{e}");
    assert_eq!(
        manifest(&t.path().join("plain")),
        manifest(&t.path().join("trim"))
    );
}

/// A file system whose structures lie is not trimmed: a block bitmap
/// pointing past its end, a superblock with an absurd block size, a
/// bitmap that frees a used block.
#[test]
fn attack_a_corrupt_ext4_is_left_as_it_is() {
    let t = tempfile::tempdir().unwrap();
    let (mem, _) = raws(t.path());
    let (img, bs, _) = ext4_with_a_deleted_file(t.path(), &["-b", "4096"]);
    let good = std::fs::read(&img).unwrap();
    // Group 0's descriptor is at the start of block 1.
    let gd = bs as usize;
    let bitmap = u32::from_le_bytes(good[gd..gd + 4].try_into().unwrap()) as usize;
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut d = good.clone();
    d[gd..gd + 4].copy_from_slice(&0xFFFF_FF00u32.to_le_bytes());
    cases.push(("bitmap-out", d, "outside the file system"));
    let mut d = good.clone();
    d[1024 + 0x18] = 30;
    cases.push(("block-size", d, "block size"));
    // The root directory's block (in use) marked free in the bitmap.
    let mut d = good.clone();
    let o = e2("debugfs", &[&"-R", &"blocks /", &img]);
    let root: usize = String::from_utf8_lossy(&o.stdout).trim().parse().unwrap();
    d[bitmap * bs as usize + root / 8] &= !(1 << (root % 8));
    cases.push(("bitmap-frees", d, "free blocks, its descriptor says"));
    for (name, bytes, why) in cases {
        let p = t.path().join(format!("{name}.img"));
        std::fs::write(&p, &bytes).unwrap();
        let o = import(t.path(), name, &mem, &p, &["--trim"]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        assert!(text(&o).contains("not trimmed: "), "{name}: {}", text(&o));
        assert!(text(&o).contains(why), "{name}: {}", text(&o));
        let vm = t.path().join(name);
        assert!(!manifest(&vm).contains("\"trimmed\""), "{name}");
        assert!(
            std::fs::read(vm.join("disk0.raw")).unwrap() == bytes,
            "{name}"
        );
    }
}
