//! Suspend cost of a resumed guest that dirtied little of its memory.
//!
//! `cargo run --release -p kimberley-vmm --example suspend [MEMORY_MIB [DIRTY_MIB [DIR]]]`
//! (defaults 1024, 8, the temporary directory). A guest whose memory is
//! almost all data is suspended into a VMDIR, restored from it (memory
//! mapped copy-on-write), writes DIRTY_MIB of fresh data and is suspended
//! again: back into its own directory (`save_in_place`) and into a new one
//! (`save_into`). Each suspended VM is resumed and must checksum its
//! regions exactly as before the stop. Modes `in_place` and `elsewhere`
//! stop once the restored memory file's block hashes are ready (the VM ran
//! long enough), `in_place_early` right after the guest's writes. Prints
//! one JSON line per mode (used by `scripts/bench-suspend.sh`); with
//! `BEFORE=1`, only the modes the code before dirty-only suspends knew.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use kimberley_formats::vmdir::{VmDir, VmDirWriter};
use kimberley_vmm::{vmdir, Vm, VmConfig};

const T: Duration = Duration::from_secs(300);

type R<T> = Result<T, Box<dyn std::error::Error>>;

fn run(vm: &mut Vm, script: &str) -> R<Vec<String>> {
    let o = vm.run_script(script, &mut |_| {}, T)?;
    if o.status != 0 {
        return Err(format!("script failed: {:?}", o.lines).into());
    }
    Ok(o.lines)
}

/// Resumes the VM in `dir` and checks the checksums of `regions`.
fn check(dir: &Path, regions: &str, want: &[String]) -> R<()> {
    let d = VmDir::open(dir)?;
    let mut vm = vmdir::restore(&d)?;
    let got = run(&mut vm, regions)?;
    if got != want {
        return Err(format!("{}: checksums {got:?}, expected {want:?}", dir.display()).into());
    }
    Ok(())
}

// before:skip-begin (scripts/bench-suspend.sh builds the code before
// dirty-only suspends with the `before:use` line below instead)
/// The bytes of memory the VM changed since its restore, and, unless
/// `early`, waits until the memory file's block hashes are ready (when,
/// after the restore at `t`).
fn settle(vm: &mut Vm, wait: bool, t: Instant) -> R<(Option<u64>, Option<f64>)> {
    let changed = vm
        .memory()
        .pages_changed()?
        .map(|c| c.iter().filter(|&&c| c).count() as u64 * 4096);
    while wait && !vm.memory_hashed() && t.elapsed() < T {
        std::thread::sleep(Duration::from_millis(10));
    }
    let hashed = vm.memory_hashed().then(|| t.elapsed().as_secs_f64() * 1e3);
    Ok((changed, hashed))
}
// before:skip-end
// before:use fn settle(_: &mut Vm, _: bool, _: Instant) -> R<(Option<u64>, Option<f64>)> { std::thread::sleep(Duration::from_millis(500)); Ok((None, None)) }

fn main() -> R<()> {
    let mut args = std::env::args().skip(1);
    let mem_mib: u64 = args.next().map_or(Ok(1024), |a| a.parse())?;
    let dirty_mib: u64 = args.next().map_or(Ok(8), |a| a.parse())?;
    let work = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("kimberley-suspend-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let home = work.join("vm");
    let before = std::env::var_os("BEFORE").is_some();

    let mut vm = Vm::boot(&VmConfig {
        memory_size: mem_mib << 20,
        vcpus: 1,
        disks: vec![],
    })?;
    vm.wait_ready(T)?;
    let cold = mem_mib.saturating_sub(dirty_mib + 64);
    run(&mut vm, &format!("fill cold {cold}M 2 random"))?;
    vmdir::save_into(&mut vm, VmDirWriter::create(&home)?, "bench")?;
    drop(vm);

    for mode in ["elsewhere", "in_place", "in_place_early"] {
        if before && mode == "in_place_early" {
            continue;
        }
        // Each suspend starts with nothing left to write back: a whole
        // write of memory costs 1 to 8 s here depending on what the last
        // one left in the page cache.
        std::process::Command::new("sync").status()?;
        let d = VmDir::open(&home)?;
        let t_restore = Instant::now();
        let mut vm = vmdir::restore(&d)?;
        let regions = format!("checksum cold\nchecksum hot-{mode}");
        let want = run(
            &mut vm,
            &format!("fill hot-{mode} {dirty_mib}M 3 random\n{regions}"),
        )?;
        let (changed, hashed_ms) = settle(&mut vm, mode != "in_place_early", t_restore)?;
        let t0 = Instant::now();
        let out = match mode {
            "in_place" | "in_place_early" => vmdir::save_in_place(&mut vm, &d)?,
            _ => vmdir::save_into(&mut vm, VmDirWriter::create(&work.join("copy"))?, "bench")?,
        };
        let suspend_ms = t0.elapsed().as_secs_f64() * 1e3;
        drop(vm);
        check(&out, &regions, &want)?;
        VmDir::open(&out)?.verify()?;
        if mode == "elsewhere" {
            std::fs::remove_dir_all(&out)?;
        }
        println!(
            "{}",
            serde_json::json!({
                "mode": mode,
                "memory_mib": mem_mib,
                "dirty_mib": dirty_mib,
                "suspend_ms": suspend_ms,
                "changed_bytes": changed,
                "hashed_ms": hashed_ms,
            })
        );
    }
    // Disk speed for the target: DIRTY_MIB of data written and fsynced.
    let t0 = Instant::now();
    {
        use std::io::Write;
        let mut f = std::fs::File::create(work.join("disk-speed"))?;
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let data: Vec<u8> = (0..dirty_mib << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        f.write_all(&data)?;
        f.sync_all()?;
    }
    println!(
        "{}",
        serde_json::json!({
            "mode": "disk",
            "dirty_mib": dirty_mib,
            "write_fsync_ms": t0.elapsed().as_secs_f64() * 1e3,
        })
    );
    std::fs::remove_dir_all(&work)?;
    Ok(())
}
