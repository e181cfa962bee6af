//! Measures boot+save of a 256 MiB guest and restore of a 1 GiB guest.
//!
//! `cargo run --release -p kimberley-vmm --example perf [DIR]`

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kimberley_vmm::{Vm, VmConfig};

const T: Duration = Duration::from_secs(120);

fn rss_kib() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = dir.join(format!("kimberley-perf-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    // 1. Fresh 256 MiB guest: boot to ready, then save.
    let t0 = Instant::now();
    let mut vm = Vm::boot(&VmConfig {
        memory_size: 256 << 20,
        vcpus: 1,
        disks: vec![],
    })?;
    vm.wait_ready(T)?;
    let ready = t0.elapsed();
    let state = vm.save(&dir.join("small.raw"))?;
    let total = t0.elapsed();
    println!(
        "boot 256 MiB to ready: {ready:?}; boot + save: {total:?} (state blob {} bytes)",
        state.len()
    );
    drop(vm);

    // 2. 1 GiB guest with 512 MiB of random data, saved, then restored.
    let mut vm = Vm::boot(&VmConfig {
        memory_size: 1 << 30,
        vcpus: 1,
        disks: vec![],
    })?;
    vm.wait_ready(T)?;
    let t0 = Instant::now();
    vm.run_script("fill a 512M 1 random", &mut |_| {}, T)?;
    let t1 = Instant::now();
    vm.run_script("checksum a", &mut |_| {}, T)?;
    println!(
        "guest: fill 512 MiB random {:?}, checksum 512 MiB {:?}",
        t1 - t0,
        t1.elapsed()
    );
    let o = vm.run_script("counter start\nsleep 10\ncounter", &mut |_| {}, T)?;
    let t0 = Instant::now();
    let mem = dir.join("big.raw");
    let state = vm.save(&mem)?;
    println!(
        "save 1 GiB guest (512 MiB data): {:?}; before: {:?}",
        t0.elapsed(),
        o.lines
    );
    drop(vm);

    let rss0 = rss_kib();
    let t0 = Instant::now();
    let mut vm = Vm::restore(&mem, vec![], &state)?;
    let restored = t0.elapsed();
    let entry = vm.wait_first_exit(T)?;
    let first_entry = vm.first_entry().map(|e| e - t0);
    let rss1 = rss_kib();
    println!(
        "restore 1 GiB: Vm::restore returned after {restored:?}; first KVM_RUN at {first_entry:?}; \
         first guest exit at {:?}; RSS grew by {} KiB",
        entry - t0,
        rss1.saturating_sub(rss0)
    );
    let o = vm.run_script("sleep 5\ncounter", &mut |_| {}, T)?;
    println!("after restore: {:?}", o.lines);
    drop(vm);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
