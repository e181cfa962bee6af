//! A real Linux guest under QEMU (TCG here): boot until the agent answers,
//! scripts with streamed output, suspend (device state only, RAM in the
//! memory file), restore from the files, failing and hanging scripts.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use kimberley_qemu::config::{DEFAULT_CMDLINE, DEFAULT_MACHINE_TYPE};
use kimberley_qemu::{qemu_for_tests, Accel, Error, MachineConfig, Vm};

const BOOT: Duration = Duration::from_secs(60);
const SCRIPT: Duration = Duration::from_secs(60);
const QEMU: &str = "qemu-system-x86_64";

fn config(a: &common::Artifacts, memory: u64) -> MachineConfig {
    MachineConfig {
        kernel: a.kernel.clone(),
        initrd: Some(a.initrd.clone()),
        cmdline: DEFAULT_CMDLINE.into(),
        memory_size: memory,
        vcpus: 1,
        disks: Vec::new(),
        accel: Accel::Tcg,
        machine_type: DEFAULT_MACHINE_TYPE.into(),
        cpu: "qemu64".into(),
        net: None,
    }
}

fn run(vm: &mut Vm, script: &str) -> (i32, Vec<String>) {
    let o = vm
        .agent()
        .exec(script, &mut |_| {}, SCRIPT)
        .unwrap_or_else(|e| panic!("{script}: {e}\n{}", vm.log_tail()));
    (o.status, o.lines)
}

fn counter(vm: &mut Vm) -> u64 {
    let (s, l) = run(vm, "cat /tmp/count");
    assert_eq!(s, 0, "{l:?}");
    l[0].trim().parse().unwrap()
}

#[test]
fn boot_run_suspend_and_restore_from_the_files() {
    if !qemu_for_tests() {
        return;
    }
    let a = common::artifacts();
    let _slot = common::qemu_slot();
    let t = tempfile::tempdir().unwrap();
    let mem = t.path().join("memory.raw");
    let cfg = config(&a, 256 << 20);
    let t0 = Instant::now();
    let mut vm = Vm::boot(Path::new(QEMU), &cfg, &mem, BOOT, None).unwrap();
    eprintln!("booted to the agent's first answer in {:?}", t0.elapsed());
    assert!(vm.is_ready());
    assert_eq!(vm.status().unwrap(), "running");

    // Output streams: each line is seen before the script ends.
    let mut seen: Vec<(Instant, String)> = Vec::new();
    let start = Instant::now();
    let o = vm
        .agent()
        .exec(
            "echo hello; uname -r; sleep 1; echo after",
            &mut |l| seen.push((Instant::now(), l.to_string())),
            SCRIPT,
        )
        .unwrap();
    let end = Instant::now();
    assert_eq!(o.status, 0);
    assert_eq!(o.lines.len(), 3, "{:?}", o.lines);
    assert_eq!(o.lines[0], "hello");
    assert!(o.lines[1].contains("cloud-amd64"), "{:?}", o.lines);
    assert_eq!(
        seen.iter().map(|s| s.1.clone()).collect::<Vec<_>>(),
        o.lines
    );
    assert!(
        end - seen[0].0 >= Duration::from_millis(700),
        "the first line came only at the end ({:?} after the start, script took {:?})",
        seen[0].0 - start,
        end - start
    );

    // A file in the guest's RAM, a marker only the guest computes, and a
    // background counter.
    let token = common::token();
    let marker: String = token.chars().rev().collect();
    let (s, l) = run(
        &mut vm,
        &format!(
            "echo {token} | rev > /tmp/marker; echo kept > /tmp/file; \
             (i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.2; done) >/dev/null 2>&1 & \
             sleep 1; cat /tmp/marker"
        ),
    );
    assert_eq!((s, l.clone()), (0, vec![marker.clone()]));
    let c1 = counter(&mut vm);
    assert!(c1 >= 2, "{c1}");

    // Suspend: device state only; the RAM is the memory file.
    let state = t.path().join("state.bin");
    let t1 = Instant::now();
    vm.save_state_to(&state).unwrap();
    let suspend = t1.elapsed();
    assert_eq!(vm.status().unwrap(), "postmigrate");
    vm.quit().unwrap();
    let state_len = std::fs::metadata(&state).unwrap().len();
    eprintln!("suspended (stop + device state) in {suspend:?}, state {state_len} bytes");
    assert!((50_000..16 << 20).contains(&state_len), "{state_len}");
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 256 << 20);
    assert!(
        common::file_contains(&mem, marker.as_bytes()),
        "the marker is not in memory.raw"
    );

    // Restore from the files, memory mapped privately: the file stays as it is.
    let before = std::fs::read(&mem).unwrap();
    let t2 = Instant::now();
    let sf = std::fs::File::open(&state).unwrap();
    let mut vm = Vm::restore(Path::new(QEMU), &cfg, &mem, false, &sf, None).unwrap();
    vm.agent().ping(Duration::from_secs(30)).unwrap();
    eprintln!("restored to the agent's first answer in {:?}", t2.elapsed());
    let (s, l) = run(&mut vm, "cat /tmp/file /tmp/marker");
    assert_eq!((s, l), (0, vec!["kept".to_string(), marker.clone()]));
    let c2 = counter(&mut vm);
    assert!(c2 >= c1, "the counter went back: {c1} -> {c2}");
    assert!(
        c2 < c1 + 50,
        "the counter restarted or jumped: {c1} -> {c2}"
    );
    std::thread::sleep(Duration::from_millis(800));
    let c3 = counter(&mut vm);
    assert!(c3 > c2, "the counter stopped: {c2} -> {c3}");
    // A private mapping cannot be suspended: that would lose the RAM.
    let e = vm.save_state_to(&t.path().join("state2.bin")).unwrap_err();
    assert!(e.to_string().contains("privately"), "{e}");
    vm.quit().unwrap();
    assert!(
        std::fs::read(&mem).unwrap() == before,
        "a private restore changed memory.raw"
    );
}

#[test]
fn failing_and_hanging_scripts() {
    if !qemu_for_tests() {
        return;
    }
    let a = common::artifacts();
    let _slot = common::qemu_slot();
    let t = tempfile::tempdir().unwrap();
    let mut vm = Vm::boot(
        Path::new(QEMU),
        &config(&a, 256 << 20),
        &t.path().join("m"),
        BOOT,
        None,
    )
    .unwrap();
    let o = vm
        .agent()
        .exec("echo out; echo err >&2; exit 3", &mut |_| {}, SCRIPT)
        .unwrap();
    assert_eq!(o.status, 3);
    assert_eq!(o.lines, ["out", "err"]);
    // A long script travels as a file.
    let long = format!("# {}\necho long $0", "x".repeat(100 << 10));
    let o = vm.agent().exec(&long, &mut |_| {}, SCRIPT).unwrap();
    assert_eq!(
        (o.status, o.lines[0].starts_with("long /tmp/.kimberley-")),
        (0, true),
        "{:?}",
        o.lines
    );
    let o = vm.agent().exec("kill -9 $$", &mut |_| {}, SCRIPT).unwrap();
    assert_eq!(o.status, 128 + 9);

    // Past its timeout the script and its children are killed.
    let start = Instant::now();
    let e = vm
        .agent()
        .exec(
            "echo started; sleep 1234 & sleep 4321",
            &mut |_| {},
            Duration::from_secs(2),
        )
        .unwrap_err();
    assert!(matches!(e, Error::ScriptTimeout(_)), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    let (s, l) = run(&mut vm, "ps -o args | grep -c '^sleep [14]' || true");
    assert_eq!((s, l), (0, vec!["0".to_string()]));
    let m = kimberley_machine::Error::from(e);
    assert!(matches!(m, kimberley_machine::Error::Timeout(_)), "{m}");

    // A script that writes faster than the host reads its output still
    // ends at its timeout (the output is read in bounded rounds).
    let start = Instant::now();
    let e = vm
        .agent()
        .exec("yes kimberley-flood", &mut |_| {}, Duration::from_secs(3))
        .unwrap_err();
    assert!(matches!(e, Error::ScriptTimeout(_)), "{e}");
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "a flooding script held the caller {:?} past a 3 s timeout",
        start.elapsed()
    );
    // (The one file left is this script's own output.)
    let (s, l) = run(
        &mut vm,
        "pgrep -x yes; ls /tmp/.kimberley-*; [ $(ls /tmp/.kimberley-* | wc -l) = 1 ] && ! pgrep -x yes",
    );
    assert_eq!(s, 0, "the flood was left behind: {l:?}");
    vm.quit().unwrap();
}
