//! Boot the test guest and run scripts (real KVM).

mod common;

use std::time::{Duration, Instant};

use common::gen::{fill_random, fill_text, xxh64, SplitMix};
use common::*;

#[test]
fn every_command() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), 8 << 20);
    let mut vm = boot(128, &[&disk]);
    let script = "\
# a comment, then a blank line

print hello   world
fill r 1M 7 random
fill t 100000 9 text
fill z 64K 1 zero
checksum r
checksum t
checksum z
disk-write 4096 1M 42
disk-checksum 4096 1M
counter start
sleep 20
counter
dirty r 4M
sleep 10
dirty r 0
";
    let mut seen = Vec::new();
    let o = vm
        .run_script(script, &mut |l| seen.push(l.to_string()), T)
        .unwrap();
    assert_eq!(o.status, 0, "{:?}", o.lines);
    assert_eq!(seen, o.lines);
    let mut r = vec![0u8; 1 << 20];
    fill_random(&mut r, 7);
    let mut t = vec![0u8; 100000];
    fill_text(&mut t, 9);
    assert!(t
        .iter()
        .all(|b| b.is_ascii_lowercase() || *b == b' ' || *b == b'\n'));
    let z = vec![0u8; 64 << 10];
    let mut d = vec![0u8; 1 << 20];
    SplitMix::new(42).fill(&mut d);
    assert_eq!(o.lines.len(), 6, "{:?}", o.lines);
    assert_eq!(o.lines[0], "hello   world");
    assert_eq!(o.lines[1], format!("checksum r {}", hex(xxh64(&r))));
    assert_eq!(o.lines[2], format!("checksum t {}", hex(xxh64(&t))));
    assert_eq!(o.lines[3], format!("checksum z {}", hex(xxh64(&z))));
    assert_eq!(
        o.lines[4],
        format!("disk-checksum 4096 1M {}", hex(xxh64(&d)))
    );
    let counter: u64 = o.lines[5]
        .strip_prefix("counter ")
        .unwrap()
        .parse()
        .unwrap();
    assert!(counter > 0, "{}", o.lines[5]);
    // The disk file holds what the guest wrote.
    let on_disk = std::fs::read(&disk).unwrap();
    assert_eq!(&on_disk[4096..4096 + (1 << 20)], &d[..]);
    // Blocks 1..=256 were written.
    let blocks = vm.dirty_disk_blocks(0).unwrap();
    assert_eq!(
        blocks.iter_set().collect::<Vec<_>>(),
        (1..=256).collect::<Vec<_>>()
    );
    assert_eq!(vm.dirty_disk_blocks(0).unwrap().count(), 0);

    // The counter keeps counting between scripts.
    std::thread::sleep(Duration::from_millis(20));
    let l = run_ok(&mut vm, "counter");
    let c2: u64 = l[0].strip_prefix("counter ").unwrap().parse().unwrap();
    assert!(c2 > counter);

    // dirty rewrote pages of r: its checksum changed.
    let l = run_ok(&mut vm, "checksum r\n");
    assert_ne!(l[0], o.lines[1]);
    // Re-filling restores it.
    let l = run_ok(&mut vm, "fill r 1M 7 random\nchecksum r");
    assert_eq!(l[0], o.lines[1]);
}

#[test]
fn script_errors() {
    if !kvm_available() {
        return;
    }
    let mut vm = boot(32, &[]);
    let o = vm
        .run_script("print a\n\nbogus 1 2\nprint never", &mut |_| {}, T)
        .unwrap();
    assert_ne!(o.status, 0);
    assert_eq!(
        o.lines,
        vec![
            "a".to_string(),
            "error 3: unknown command 'bogus'".to_string()
        ]
    );
    // Each error kind gives a line and a non-zero status; the VM stays usable.
    for (script, want) in [
        ("fill x 1Q 1 random", "error 1: bad size '1Q'"),
        ("fill x 1K 1 purple", "error 1: unknown kind 'purple'"),
        ("fill x 1K 1", "error 1: wrong number of arguments"),
        ("checksum nope", "error 1: no region named 'nope'"),
        (
            "fill x 8M 1 zero\nfill y 1G 1 zero",
            "error 2: out of memory",
        ),
        ("disk-write 0 4096 1", "error 1: no disk"),
        ("dirty nope 1M", "error 1: no region named 'nope'"),
        ("sleep soon", "error 1: bad milliseconds 'soon'"),
    ] {
        let o = vm.run_script(script, &mut |_| {}, T).unwrap();
        assert_eq!(o.status, 1, "{script}");
        assert_eq!(
            o.lines.last().map(String::as_str),
            Some(want),
            "{script}: {:?}",
            o.lines
        );
    }
    assert_eq!(run_ok(&mut vm, "print still here"), vec!["still here"]);
    // A script may not contain the end marker.
    assert!(vm.run_script("print \u{4}", &mut |_| {}, T).is_err());
}

#[test]
fn disk_errors() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), 1 << 20);
    let mut vm = boot(32, &[&disk]);
    for (script, want) in [
        (
            "disk-write 1 512 1",
            "error 1: offset and size must be multiples of 512",
        ),
        ("disk-write 1M 512 1", "error 1: range beyond end of disk"),
        ("disk-checksum 0 2M", "error 1: range beyond end of disk"),
        (
            "disk-discard 0 100",
            "error 1: offset and size must be multiples of 512",
        ),
        ("disk-zero 512 1M", "error 1: range beyond end of disk"),
        ("disk-discard 0", "error 1: wrong number of arguments"),
    ] {
        let o = vm.run_script(script, &mut |_| {}, T).unwrap();
        assert_eq!(o.status, 1);
        assert_eq!(o.lines, vec![want.to_string()]);
    }
    let zero = vec![0u8; 1 << 20];
    assert_eq!(
        run_ok(&mut vm, "disk-checksum 0 1M"),
        vec![format!("disk-checksum 0 1M {}", hex(xxh64(&zero)))]
    );
}

/// `disk-discard` punches holes in the disk file and `disk-zero` zeroes in
/// place; both read back as zeros in the guest and count as written
/// blocks. A discard larger than the device's per-segment limit is split.
#[test]
fn disk_discard_and_zero() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let size = (3u64 << 30) + (8 << 20);
    let disk = make_disk(dir.path(), size);
    let mut vm = boot(32, &[&disk]);
    let z = |n: usize| hex(xxh64(&vec![0u8; n]));
    run_ok(&mut vm, "disk-write 0 8M 5");
    assert_eq!(vm.dirty_disk_blocks(0).unwrap().count(), 2048);
    let l = run_ok(
        &mut vm,
        "disk-discard 1M 2M\ndisk-zero 4M 1M\ndisk-checksum 1M 2M\ndisk-checksum 4M 1M",
    );
    assert_eq!(
        l,
        vec![
            format!("disk-checksum 1M 2M {}", z(2 << 20)),
            format!("disk-checksum 4M 1M {}", z(1 << 20)),
        ]
    );
    // Both ranges are recorded as written blocks.
    let blocks: Vec<usize> = vm.dirty_disk_blocks(0).unwrap().iter_set().collect();
    assert_eq!(blocks, (256..768).chain(1024..1280).collect::<Vec<_>>());
    let f = std::fs::File::open(&disk).unwrap();
    let ext = kimberley_formats::sparse::data_extents(&f, size).unwrap();
    // The discarded range is a hole; the zeroed one stays allocated.
    assert_eq!(ext, vec![(0, 1 << 20), (3 << 20, 8 << 20)], "{ext:?}");
    let mut on_disk = vec![0u8; 8 << 20];
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut on_disk, 0).unwrap();
    let mut d = vec![0u8; 8 << 20];
    SplitMix::new(5).fill(&mut d);
    d[1 << 20..3 << 20].fill(0);
    d[4 << 20..5 << 20].fill(0);
    assert!(on_disk == d, "disk contents");

    // A discard of more than 1 GiB (the per-segment limit) over the whole
    // disk leaves nothing allocated.
    run_ok(
        &mut vm,
        &format!(
            "disk-write {} 1M 6\ndisk-discard 0 {size}",
            size - (1 << 20)
        ),
    );
    assert_eq!(
        kimberley_formats::sparse::data_extents(&f, size).unwrap(),
        vec![]
    );
    let l = run_ok(&mut vm, &format!("disk-checksum {} 1M", size - (1 << 20)));
    assert_eq!(
        l,
        vec![format!(
            "disk-checksum {} 1M {}",
            size - (1 << 20),
            z(1 << 20)
        )]
    );
    assert_eq!(vm.dirty_disk_blocks(0).unwrap().count() as u64, size / 4096);
}

#[test]
fn triple_fault_is_reported() {
    if !kvm_available() {
        return;
    }
    let mut vm = boot(32, &[]);
    let e = vm
        .run_script("print bye\ndebug-triple-fault", &mut |_| {}, T)
        .unwrap_err();
    assert_eq!(e.to_string(), "guest crashed (triple fault)");
    // Later calls keep reporting it; nothing panics.
    assert!(vm.run_script("print x", &mut |_| {}, T).is_err());
    assert!(vm.save_state().is_err());
}

#[test]
fn guest_panic_is_reported() {
    if !kvm_available() {
        return;
    }
    let mut vm = boot(32, &[]);
    let e = vm.run_script("debug-panic", &mut |_| {}, T).unwrap_err();
    assert!(e.to_string().contains("debug-panic command"), "{e}");
}

#[test]
fn hang_times_out() {
    if !kvm_available() {
        return;
    }
    let mut vm = boot(32, &[]);
    let t0 = Instant::now();
    let e = vm
        .run_script("debug-hang", &mut |_| {}, Duration::from_millis(300))
        .unwrap_err();
    assert!(matches!(e, kimberley_vmm::Error::Timeout(_)), "{e}");
    assert!(t0.elapsed() < Duration::from_secs(5));
    // Pausing a spinning guest works (the vCPU is kicked out of KVM_RUN).
    vm.pause().unwrap();
    drop(vm);
}

#[test]
fn several_vcpus() {
    if !kvm_available() {
        return;
    }
    let cfg = kimberley_vmm::VmConfig {
        memory_size: 32 << 20,
        vcpus: 2,
        disks: vec![],
    };
    let mut vm = kimberley_vmm::Vm::boot(&cfg).unwrap();
    vm.wait_ready(T).unwrap();
    assert_eq!(vm.vcpus(), 2);
    assert_eq!(run_ok(&mut vm, "print two"), vec!["two"]);
}

#[test]
fn bad_config() {
    if !kvm_available() {
        return;
    }
    let cfg = kimberley_vmm::VmConfig {
        memory_size: 5 << 20,
        vcpus: 1,
        disks: vec![],
    };
    assert!(matches!(
        kimberley_vmm::Vm::boot(&cfg),
        Err(kimberley_vmm::Error::Config(_))
    ));
    let cfg = kimberley_vmm::VmConfig {
        memory_size: 32 << 20,
        vcpus: 0,
        disks: vec![],
    };
    assert!(matches!(
        kimberley_vmm::Vm::boot(&cfg),
        Err(kimberley_vmm::Error::Config(_))
    ));
}
