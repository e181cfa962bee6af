//! Save/restore, dirty tracking and state-blob validation (real KVM).

mod common;

use std::time::{Duration, Instant};

use common::*;
use kimberley_vmm::{Error, Vm};

fn counter(lines: &[String]) -> u64 {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("counter "))
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn save_restore_continues() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), 4 << 20);
    let mut vm = boot(64, &[&disk]);
    let before = run_ok(
        &mut vm,
        "fill a 3M 5 random\nfill b 200K 6 text\ndisk-write 0 64K 3\nchecksum a\nchecksum b\ndisk-checksum 0 64K\ncounter start\nsleep 10\ncounter",
    );
    let c1 = counter(&before);
    let mem = dir.path().join("memory.raw");
    let t0 = Instant::now();
    let state = vm.save(&mem).unwrap();
    eprintln!(
        "save of 64 MiB: {:?}, blob {} bytes",
        t0.elapsed(),
        state.len()
    );
    // Sparse: far fewer blocks than 64 MiB are allocated.
    let meta = std::fs::metadata(&mem).unwrap();
    assert_eq!(meta.len(), 64 << 20);
    use std::os::unix::fs::MetadataExt;
    assert!(
        meta.blocks() * 512 < 16 << 20,
        "memory file uses {} bytes",
        meta.blocks() * 512
    );
    drop(vm);

    let t0 = Instant::now();
    let mut vm2 = Vm::restore(&mem, vec![disk.clone()], &state).unwrap();
    let entry = vm2.wait_first_exit(T).unwrap();
    eprintln!("restore to first exit: {:?}", entry - t0);
    let after = run_ok(
        &mut vm2,
        "checksum a\nchecksum b\ndisk-checksum 0 64K\nsleep 2\ncounter",
    );
    assert_eq!(&after[..3], &before[..3]);
    let c2 = counter(&after);
    assert!(c2 > c1, "counter went from {c1} to {c2}");

    // Save the restored VM again (over the file it was restored from) and restore once more.
    std::thread::sleep(Duration::from_millis(5));
    let state2 = vm2.save(&mem).unwrap();
    drop(vm2);
    let mut vm3 = Vm::restore(&mem, vec![disk.clone()], &state2).unwrap();
    let again = run_ok(&mut vm3, "checksum a\nsleep 2\ncounter");
    assert_eq!(again[0], before[0]);
    assert!(counter(&again) > c2);
}

#[test]
fn pause_resume_and_save_paused() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(32, &[]);
    run_ok(&mut vm, "counter start");
    vm.pause().unwrap();
    assert!(matches!(
        vm.run_script("counter", &mut |_| {}, T),
        Err(Error::Paused)
    ));
    vm.resume().unwrap();
    let c1 = counter(&run_ok(&mut vm, "sleep 2\ncounter"));
    let state = vm.save(&dir.path().join("m")).unwrap();
    vm.resume().unwrap();
    let c2 = counter(&run_ok(&mut vm, "sleep 2\ncounter"));
    assert!(c2 > c1);
    drop(vm);
    let mut vm2 = Vm::restore(&dir.path().join("m"), vec![], &state).unwrap();
    assert!(counter(&run_ok(&mut vm2, "sleep 2\ncounter")) > c1);
}

#[test]
fn dirty_log_reports_fill() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let disk = make_disk(dir.path(), 1 << 20);
    let mut vm = boot(64, &[&disk]);
    assert!(matches!(vm.dirty_pages(), Err(Error::DirtyLogDisabled)));
    vm.set_dirty_logging(true).unwrap();
    let _ = vm.dirty_pages().unwrap();
    run_ok(&mut vm, "fill big 4M 1 random");
    let d = vm.dirty_pages().unwrap();
    assert_eq!(d.len(), (64 << 20) / 4096);
    // At least the 1024 pages of the region (plus a few of stack/serial state).
    assert!(d.count() >= 1024, "{} dirty pages", d.count());
    let heap: Vec<usize> = d.iter_set().filter(|&p| p >= 0x60_0000 / 4096).collect();
    assert!(heap.len() >= 1024);
    // Fetch-and-clear: an idle guest dirties almost nothing.
    let again = vm.dirty_pages().unwrap();
    assert!(
        again.count() < 64,
        "{} pages dirty while idle",
        again.count()
    );
    // Disk reads DMA'd into guest memory are reported by the device.
    run_ok(&mut vm, "disk-checksum 0 256K");
    let d = vm.dirty_pages().unwrap();
    assert!(
        d.count() >= 64,
        "{} pages after a 256K disk read",
        d.count()
    );
    vm.set_dirty_logging(false).unwrap();
}

#[test]
fn corrupt_and_foreign_blobs_are_rejected() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(32, &[]);
    let mem = dir.path().join("memory.raw");
    let state = vm.save(&mem).unwrap();
    drop(vm);
    kimberley_vmm::validate_state(&state).unwrap();

    // Other version.
    let mut v2 = state.clone();
    v2[8] = 2;
    assert!(matches!(
        Vm::restore(&mem, vec![], &v2),
        Err(Error::StateVersion {
            found: 2,
            expected: 1
        })
    ));
    // Bad magic, truncation, flipped bytes everywhere: errors, never panics.
    let mut bad = state.clone();
    bad[0] ^= 1;
    assert!(matches!(
        Vm::restore(&mem, vec![], &bad),
        Err(Error::CorruptState(_))
    ));
    for len in [0, 5, 31, 32, 100, state.len() - 1] {
        assert!(Vm::restore(&mem, vec![], &state[..len]).is_err());
    }
    for i in (0..state.len()).step_by(97) {
        let mut b = state.clone();
        b[i] ^= 0x5a;
        assert!(
            kimberley_vmm::validate_state(&b).is_err(),
            "flip at {i} accepted"
        );
    }
    // A consistent envelope around garbage: still an error.
    let body: Vec<u8> = (0..5000u32).map(|i| (i * 7919 % 251) as u8).collect();
    let sealed = kimberley_vmm::persist::seal(&body);
    assert!(matches!(
        Vm::restore(&mem, vec![], &sealed),
        Err(Error::CorruptState(_))
    ));
    // Huge declared counts are refused by the caps.
    let mut w = kimberley_vmm::persist::Writer::new();
    w.section(1, |w| {
        w.u64(32 << 20);
        w.u32(u32::MAX);
    });
    let sealed = kimberley_vmm::persist::seal(&w.into_inner());
    let e = Vm::restore(&mem, vec![], &sealed).unwrap_err();
    assert!(e.to_string().contains("cap"), "{e}");
    // Wrong number of disks, wrong memory file size.
    assert!(matches!(
        Vm::restore(&mem, vec![mem.clone()], &state),
        Err(Error::StateMismatch(..))
    ));
    let small = dir.path().join("small.raw");
    std::fs::write(&small, [0u8; 4096]).unwrap();
    assert!(matches!(
        Vm::restore(&small, vec![], &state),
        Err(Error::StateMismatch(..))
    ));
    // The original still restores.
    let mut vm = Vm::restore(&mem, vec![], &state).unwrap();
    assert_eq!(run_ok(&mut vm, "print ok"), vec!["ok"]);
}

/// Boots, runs `script`, pauses reproducibly, saves: (idle?, memory, state).
fn reproducible_save(dir: &std::path::Path, script: &str) -> (bool, Vec<u8>, Vec<u8>) {
    let mut vm = boot(32, &[]);
    run_ok(&mut vm, script);
    let idle = vm.pause_reproducibly(Duration::from_secs(2)).unwrap();
    let mem = dir.join("m");
    let state = vm.save(&mem).unwrap();
    (idle, std::fs::read(&mem).unwrap(), state)
}

#[test]
fn reproducible_pauses_save_the_same_vm() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let script = "fill a 2M 5 random\nfill b 300K 6 text\nchecksum a";
    // Different host timings between two boots of the same script: the
    // second waits a while before its script runs, so its clocks and the
    // place a plain pause would stop it at differ.
    let (idle1, mem1, st1) = reproducible_save(dir.path(), script);
    std::thread::sleep(Duration::from_millis(300));
    let (idle2, mem2, st2) = reproducible_save(dir.path(), script);
    assert!(
        idle1 && idle2,
        "an idle guest was not paused at its idle point"
    );
    assert!(mem1 == mem2, "memory differs between two equal boots");
    assert!(st1 == st2, "state differs between two equal boots");

    // Restored from that state, equal scripts again save equal state, and
    // the guest still works (its clocks moved forward, not back).
    let mem = dir.path().join("base");
    std::fs::write(&mem, &mem1).unwrap();
    let mut saves = Vec::new();
    for wait in [0, 250] {
        let mut vm = Vm::restore(&mem, vec![], &st1).unwrap();
        std::thread::sleep(Duration::from_millis(wait));
        let lines = run_ok(&mut vm, "fill c 1M 7 text\nchecksum c\nchecksum a");
        assert!(vm.pause_reproducibly(Duration::from_secs(2)).unwrap());
        saves.push((lines, vm.save(&dir.path().join("m2")).unwrap()));
    }
    assert_eq!(saves[0].0, saves[1].0);
    assert!(
        saves[0].1 == saves[1].1,
        "state differs between two equal restores"
    );
    // A plain pause saves the time the guest happened to run.
    let mut vm = Vm::restore(&mem, vec![], &st1).unwrap();
    run_ok(&mut vm, "fill c 1M 7 text\nchecksum c\nchecksum a");
    std::thread::sleep(Duration::from_millis(50));
    vm.pause().unwrap();
    assert!(vm.save(&dir.path().join("m3")).unwrap() != saves[0].1);
}

#[test]
fn a_guest_with_background_work_is_paused_where_it_runs() {
    if !kvm_available() {
        return;
    }
    let mut vm = boot(32, &[]);
    run_ok(&mut vm, "counter start");
    let t0 = Instant::now();
    assert!(!vm.pause_reproducibly(Duration::from_millis(300)).unwrap());
    assert!(t0.elapsed() >= Duration::from_millis(300));
    assert!(vm.is_paused());
    vm.resume().unwrap();
    run_ok(&mut vm, "counter stop");
    assert!(vm.pause_reproducibly(Duration::from_secs(2)).unwrap());
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb << 10
}

#[test]
fn lazily_restored_memory_is_served_on_first_touch() {
    use kimberley_machine::MemorySource;
    use kimberley_vmm::OpenedFile;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // 256 MiB of which the guest wrote 24 MiB: the resumed guest touches
    // its 16 MiB region, not the rest.
    let mut vm = boot(256, &[]);
    let before = run_ok(
        &mut vm,
        "fill a 16M 5 random\nfill b 8M 6 text\nchecksum a\nchecksum b",
    );
    let mem = dir.path().join("memory.raw");
    let state = vm.save(&mem).unwrap();
    drop(vm);

    let open = || OpenedFile {
        file: std::fs::File::open(&mem).unwrap(),
        path: mem.clone(),
    };
    let rss0 = rss_bytes();
    let mut vm = Vm::restore_opened_as(open(), vec![], &state, MemorySource::Lazy).unwrap();
    let got = run_ok(&mut vm, "checksum a");
    assert_eq!(got[0], before[0]);
    let s = vm.lazy_stats().unwrap();
    let touched = (s.data_pages + s.zero_pages) * 4096;
    eprintln!(
        "lazy restore: {} data + {} zero pages, median service {} ns, p99 {} ns, RSS +{} KiB",
        s.data_pages,
        s.zero_pages,
        s.median_service_ns,
        s.p99_service_ns,
        rss_bytes().saturating_sub(rss0) >> 10
    );
    assert!(s.data_pages >= 4096, "the 16 MiB region came from the file");
    assert!(
        s.faults * 4 < s.data_pages,
        "one fault per page: no block read"
    );
    assert!(
        touched < 64 << 20,
        "{touched} bytes served for a 16 MiB checksum: pages were not served on demand"
    );
    assert!(s.median_service_ns > 0);
    // RSS grows by what was touched, not by the 256 MiB of guest memory.
    assert!(rss_bytes().saturating_sub(rss0) < 96 << 20);

    // The rest comes in when used; a save reads every page and gives the
    // same file as an eager restore's.
    assert_eq!(run_ok(&mut vm, "checksum b")[0], before[1]);
    assert!(vm.pause_reproducibly(T).unwrap());
    let lazy_state = vm.save(&dir.path().join("lazy.raw")).unwrap();
    drop(vm);
    let mut eager =
        Vm::restore_opened_as(open(), vec![], &state, MemorySource::PrivateFileMap).unwrap();
    run_ok(&mut eager, "checksum a");
    run_ok(&mut eager, "checksum b");
    assert!(eager.pause_reproducibly(T).unwrap());
    let eager_state = eager.save(&dir.path().join("eager.raw")).unwrap();
    drop(eager);
    assert!(
        std::fs::read(dir.path().join("lazy.raw")).unwrap()
            == std::fs::read(dir.path().join("eager.raw")).unwrap(),
        "lazily and eagerly restored guests saved different memory"
    );
    assert!(lazy_state == eager_state, "and different state");
}

#[test]
fn a_page_that_cannot_be_served_stops_the_guest() {
    use kimberley_machine::MemorySource;
    use kimberley_vmm::OpenedFile;
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut vm = boot(32, &[]);
    run_ok(&mut vm, "fill a 4M 5 random\nfill b 4K 6 text");
    let mem = dir.path().join("memory.raw");
    let state = vm.save(&mem).unwrap();
    drop(vm);
    let file = std::fs::File::open(&mem).unwrap();
    let mut vm = Vm::restore_opened_as(
        OpenedFile {
            file,
            path: mem.clone(),
        },
        vec![],
        &state,
        MemorySource::Lazy,
    )
    .unwrap();
    // The code and stack `checksum` needs are brought in by a first run
    // over a small region; region `a` is not touched yet.
    run_ok(&mut vm, "checksum b");
    // The memory file loses its data under the running VM: the next first
    // touch cannot be served. The guest must stop, not read zeros.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .unwrap()
        .set_len(0)
        .unwrap();
    let r = vm.run_script("checksum a", &mut |_| {}, Duration::from_secs(3));
    assert!(
        r.is_err(),
        "the guest answered from memory it could not have"
    );
    let e = vm.exit_error().expect("the VM reports why it stopped");
    assert!(e.to_string().contains("reading guest memory"), "{e}");
    // The vCPU itself was stopped: it cannot be resumed on zero pages.
    assert!(vm.resume().is_err(), "the vCPU was left running");
    let t0 = Instant::now();
    drop(vm);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stopping the VM hung"
    );
}
