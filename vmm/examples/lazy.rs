//! Lazy restore (userfaultfd) against the copy-on-write file mapping: a
//! guest whose memory is mostly data resumes and touches a tenth of it.
//!
//! `cargo run --release -p kimberley-vmm --example lazy [MEMORY_MIB [TOUCH_MIB [DIR]]]`
//! (defaults 1024, 100, the temporary directory). Prints one JSON line per
//! memory source (used by `scripts/bench-lazy.sh`).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use kimberley_machine::MemorySource;
use kimberley_vmm::{OpenedFile, Vm, VmConfig};

const T: Duration = Duration::from_secs(300);

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        << 10
}

fn run(vm: &mut Vm, script: &str) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let o = vm.run_script(script, &mut |_| {}, T)?;
    if o.status != 0 {
        return Err(format!("script failed: {:?}", o.lines).into());
    }
    Ok(o.lines)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let mem_mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let touch_mib: u64 = args.next().map_or(Ok(100), |a| a.parse())?;
    let dir = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("kimberley-lazy-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let mem = dir.join("memory.raw");

    // Most of memory holds data: the region the resumed guest uses and, for
    // the rest, others it does not touch.
    let mut vm = Vm::boot(&VmConfig {
        memory_size: mem_mib << 20,
        vcpus: 1,
        disks: vec![],
    })?;
    vm.wait_ready(T)?;
    let rest = mem_mib.saturating_sub(touch_mib + 64);
    let want = run(
        &mut vm,
        &format!("fill hot {touch_mib}M 1 random\nfill cold {rest}M 2 random\nchecksum hot"),
    )?;
    let state = vm.save(&mem)?;
    drop(vm);

    for (name, source) in [
        ("lazy", MemorySource::Lazy),
        ("mapped", MemorySource::PrivateFileMap),
    ] {
        let rss0 = rss_bytes();
        let t0 = Instant::now();
        let file = std::fs::File::open(&mem)?;
        let mut vm = Vm::restore_opened_as(
            OpenedFile {
                file,
                path: mem.clone(),
            },
            vec![],
            &state,
            source,
        )?;
        let got = run(&mut vm, "checksum hot")?;
        let answer_ms = t0.elapsed().as_secs_f64() * 1e3;
        if got.first() != want.last() {
            return Err(format!("{name}: checksum {got:?}, expected {:?}", want.last()).into());
        }
        let rss = rss_bytes().saturating_sub(rss0);
        let s = vm.lazy_stats().unwrap_or_default();
        // First touches seen by the toucher: the VMM's thread reads 2000
        // pages of the region the guest did not use, far apart (no
        // read-ahead), each brought in on its own.
        let cold = (touch_mib + 64) << 20;
        let span = (rest << 20).max(1 << 20);
        let mut trips: Vec<u64> = (0..2000u64)
            .map(|i| {
                let page = (i.wrapping_mul(2_654_435_761) % (span >> 12)) << 12;
                let mut b = [0u8; 8];
                let t = Instant::now();
                vm.memory()
                    .read(cold + page, &mut b)
                    .map(|()| t.elapsed().as_nanos() as u64)
            })
            .collect::<Result<_, _>>()?;
        trips.sort_unstable();
        let (trip_med, trip_p99) = (trips[trips.len() / 2], trips[trips.len() * 99 / 100]);
        println!(
            "{{\"source\":\"{name}\",\"memory_mib\":{mem_mib},\"touched_mib\":{touch_mib},\"answer_ms\":{answer_ms:.1},\"rss_bytes\":{rss},\"faults\":{},\"data_pages\":{},\"zero_pages\":{},\"median_service_ns\":{},\"p99_service_ns\":{},\"median_touch_ns\":{trip_med},\"p99_touch_ns\":{trip_p99}}}",
            s.faults, s.data_pages, s.zero_pages, s.median_service_ns, s.p99_service_ns
        );
        drop(vm);
    }
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}
