//! `base` and `build`: the commands that run a VM (the KVM microVM, or
//! Linux under QEMU).

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kimberley_cli::output::{write_file, write_json, Output};
use kimberley_cli::progress::Reporter;
use kimberley_cli::schema::{versioned, JsonOutput};
use kimberley_cli::vm::{vm_error, vm_failure};
use kimberley_formats::diff::DiffOptions;
use kimberley_formats::fsutil::{occupied, ScratchDir};
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::{file_name, Kind, VmDir, VmDirWriter, MANIFEST};
use kimberley_machine::{Machine, Reclaim, Reclaimed, RestoreOptions};
use kimberley_vmm::{Vm, VmConfig};
use serde_json::json;

use crate::cli::{AccelArg, BaseArgs, BuildArgs};
use crate::depfile;
use crate::diff::{summary, write_overlay, Chain, ChainVm};

/// How long a build waits for the guest to be idle before suspending it.
const IDLE_WAIT: Duration = Duration::from_secs(2);

fn name_of(p: &std::path::Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into())
}

/// `--memory` within the chosen backend's limits (a usage error).
fn check_memory(a: &BaseArgs) -> Result<()> {
    use kimberley_cli::run::check_size;
    let (backend, r) = if a.qemu {
        (
            "QEMU",
            check_size(
                a.memory,
                kimberley_qemu::config::MIN_MEMORY,
                kimberley_qemu::config::MAX_MEMORY,
                1 << 20,
            ),
        )
    } else {
        (
            "the microVM",
            check_size(
                a.memory,
                kimberley_vmm::abi::MIN_MEMORY,
                kimberley_vmm::abi::MAX_MEMORY,
                kimberley_vmm::MEMORY_ALIGN,
            ),
        )
    };
    r.map_err(|e| usage(format!("--memory: {e} for {backend}")))
}

pub fn base(a: BaseArgs) -> Result<()> {
    check_memory(&a)?;
    if a.qemu {
        return base_qemu(a);
    }
    let t0 = Instant::now();
    let disk = match a.disk.as_slice() {
        [] => 1 << 30,
        [one] => kimberley_cli::run::parse_size(one).map_err(|e| {
            usage(format!(
                "--disk {one:?}: the microVM takes one size ({e}); disk images need --qemu"
            ))
        })?,
        _ => return Err(usage("the microVM takes one --disk SIZE")),
    };
    let w = VmDirWriter::create(&a.output)?;
    let mut disks = Vec::new();
    if disk > 0 {
        let name = file_name(Kind::Disk, 0);
        let f = w.create_file(&name)?;
        f.set_len(disk).context("creating the disk")?;
        disks.push(w.path().join(name));
    }
    let cfg = VmConfig {
        memory_size: a.memory,
        vcpus: a.vcpus,
        disks,
    };
    let mut vm = Vm::boot(&cfg).map_err(vm_error)?;
    vm.wait_ready(Duration::from_secs(a.timeout))
        .map_err(vm_error)?;
    let name = a.name.clone().unwrap_or_else(|| name_of(&a.output));
    // Stopped where it waits for commands: registers and memory are those
    // of any other boot (its clocks are not: a boot has no origin).
    vm.pause_reproducibly(IDLE_WAIT).map_err(vm_error)?;
    vm.suspend_into(w, &name).map_err(vm_error)?;
    drop(vm);
    if !a.quiet {
        eprintln!(
            "{}: base VM ready and suspended in {}",
            a.output.display(),
            kimberley_cli::progress::duration(t0.elapsed())
        );
    }
    Ok(())
}

use kimberley_cli::run::usage;

/// `base --qemu`: Linux under QEMU, suspended once its guest agent answers.
fn base_qemu(a: BaseArgs) -> Result<()> {
    use kimberley_qemu::{AccelChoice, BootConfig};

    let t0 = Instant::now();
    let kernel = a
        .kernel
        .clone()
        .ok_or_else(|| usage("--qemu needs --kernel FILE"))?;
    let mut cfg = BootConfig::new(kernel, a.initrd.clone());
    if let Some(append) = &a.append {
        cfg.append = append.clone();
    }
    cfg.memory_size = a.memory;
    cfg.vcpus = a.vcpus.into();
    cfg.disks = a.disk.iter().map(Into::into).collect();
    cfg.accel = match a.accel {
        AccelArg::Auto => AccelChoice::Auto,
        AccelArg::Kvm => AccelChoice::Kvm,
        AccelArg::Tcg => AccelChoice::Tcg,
    };
    cfg.net = a.net.is_some();
    let name = a.name.clone().unwrap_or_else(|| name_of(&a.output));
    let w = VmDirWriter::create(&a.output)?;
    let booted =
        kimberley_qemu::boot(&cfg, w, &name, Duration::from_secs(a.timeout)).map_err(vm_error)?;
    if a.quiet {
        return Ok(());
    }
    eprintln!(
        "{}: Linux base VM ready and suspended ({}: {}); boot {:.1} s, suspend {} ms, total {:.1} s",
        a.output.display(),
        booted.accel.as_str(),
        booted.accel_reason,
        booted.boot_time.as_secs_f64(),
        booted.suspend_time.as_millis(),
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}

fn read_script(p: &std::path::Path) -> Result<String> {
    std::fs::read_to_string(p).with_context(|| format!("reading script {}", p.display()))
}

/// Where `build` writes the overlay: nowhere with `--launch-out` alone,
/// else -o FILE or stdout.
fn overlay_dest(a: &BuildArgs) -> Option<Option<&Path>> {
    match (&a.output, &a.launch_out) {
        (None, Some(_)) => None,
        (o, _) => Some(o.as_deref()),
    }
}

pub fn build(a: BuildArgs) -> Result<()> {
    let t0 = Instant::now();
    let threads = kimberley_cli::run::threads(a.threads);
    // Everything that can be refused is refused before the VM runs.
    a.keys
        .check_stdin(a.parent.iter().any(|p| p.as_os_str() == "-"))?;
    let dest = overlay_dest(&a);
    let (protection, secret) = match dest {
        Some(_) => {
            let p = a.keys.protection()?;
            let s = kimberley_cli::keys::secret_of(&p);
            (Some(p), s)
        }
        // No overlay to seal: a key only reads the parents.
        None => (None, a.keys.secret()?),
    };
    let install = read_script(&a.install)?;
    let resume = read_script(&a.resume)?;
    let depfile = match &a.depfile {
        Some(p) => Some((p, depfile_text(&a)?)),
        None => None,
    };
    let base = VmDir::open(&a.base)?;
    if a.early_start && !kimberley_cli::machines::backend_for(&base)?.serves_arriving() {
        return Err(usage(
            "--early-start records the working set page by page, which only the microVM can do (QEMU maps guest memory itself)",
        ));
    }
    let out = match dest {
        Some(o) => Some(Output::binary(o, a.force)?),
        None => None,
    };
    let (launch_path, w, _scratch) = match &a.launch_out {
        Some(p) => (p.clone(), launch_writer(p, a.force)?, None),
        None => {
            let s = ScratchDir::next_to(
                &a.base
                    .with_file_name(format!("{}-launch", name_of(&a.base))),
            );
            let mut w = VmDirWriter::create(s.path())?;
            // Removed at the end: not worth an fsync.
            w.set_sync(false);
            (s.path().to_path_buf(), w, Some(s))
        }
    };
    let mut guest_log = match &a.guest_log {
        Some(p) => Some(open_log(p)?),
        None => None,
    };
    // One reporter for the whole run: a spinner with the stage's name
    // while the guest works, then the diff's bar.
    let progress = Arc::new(Progress::default());
    let reporter = Reporter::start(progress.clone(), a.progress, a.quiet);
    // The chain's launch VM, applied next to the launch VM (nothing kept).
    let launch_name = format!("{}-launch", base.manifest.name);
    let base_size = kimberley_formats::vmdir::total_size(&base.manifest.components);
    let t_parents = Instant::now();
    let chain = Chain::apply(
        base,
        match &a.parent_from {
            Some(r) => kimberley_cli::oci::chain_inputs(r, &a.cache, &a.registry)?,
            None => kimberley_cli::output::open_overlays(&a.parent)?,
        },
        secret,
        a.read.policy(),
        threads,
        &launch_path,
        &progress,
        base_size,
    )?;
    let parents_ms = t_parents.elapsed().as_millis() as u64;
    let effective = chain.vm.base();
    progress.stage("resuming the base");
    // The launch VM runs on copies in `w` (the base is only read) and is
    // suspended into `w`.
    let t_restore = Instant::now();
    let opts = RestoreOptions {
        network: a.net.is_some(),
        ..RestoreOptions::copy_into(&w)
    };
    // For a backend that restores only directories, a patched chain is
    // written out here first.
    let written_out = ScratchDir::next_to(&launch_path);
    let mut vm = match &chain.vm {
        ChainVm::Dir(d) => kimberley_cli::machines::restore(d, opts),
        ChainVm::Patched(p) => {
            kimberley_cli::machines::restore_patched(p, opts, written_out.path())
        }
    }
    .context("resuming the base VM")?;
    let restore_ms = t_restore.elapsed().as_millis() as u64;
    let timeout = Duration::from_secs(a.timeout);
    let mut times = Vec::new();
    let mut log_error = None;
    for (what, script) in [("install", &install), ("resume", &resume)] {
        let t = Instant::now();
        progress.stage(&format!("{what} script"));
        let mut on_line = |line: &str| match &mut guest_log {
            Some((f, _)) => {
                if let Err(e) = writeln!(f, "{line}") {
                    log_error.get_or_insert(e);
                }
            }
            None => reporter.println(line),
        };
        let o = vm
            .agent()
            .run_script(script, &mut on_line, timeout)
            .map_err(|e| match e {
                kimberley_machine::Error::Timeout(t) => vm_failure(format!(
                    "the {what} script timed out after {} s (--timeout) and was stopped",
                    t.as_secs()
                )),
                e => vm_error(e).context(format!("running the {what} script")),
            })?;
        if o.status != 0 {
            return Err(vm_failure(format!(
                "the {what} script failed with status {}",
                o.status
            )));
        }
        times.push((what, t.elapsed().as_millis() as u64));
    }
    let reclaimed = reclaim(
        vm.as_mut(),
        Reclaim {
            trim: !a.no_trim,
            drop_caches: a.drop_caches,
        },
        timeout,
        &progress,
        &|line| reporter.println(line),
        if a.quiet {
            0
        } else if a.verbose {
            2
        } else {
            1
        },
    )?;
    if let (Some(e), Some((_, p))) = (log_error, &guest_log) {
        return Err(
            anyhow::Error::new(e).context(format!("writing the guest's output to {}", p.display()))
        );
    }
    // The depfile first: a target never exists without the list of what
    // it was made from.
    if let Some((p, text)) = &depfile {
        write_file(p, text.as_bytes(), true)
            .with_context(|| format!("writing the depfile {}", p.display()))?;
    }
    let t_save = Instant::now();
    progress.stage("suspending");
    // Stopped where it waits for commands and with canonical clocks, where
    // the backend can: the same scripts on the same VM then save the same
    // launch VM, so its overlay is reproducible too (docs/SCRIPTS.md).
    vm.pause_reproducibly(IDLE_WAIT).map_err(vm_error)?;
    vm.suspend_into(w, &launch_name).map_err(vm_error)?;
    drop(vm);
    let suspend_ms = t_save.elapsed().as_millis() as u64;
    let scripts = t0.elapsed();
    let Some(out) = out else {
        drop(reporter);
        if !a.quiet {
            eprintln!(
                "{}: launch VM ready and suspended in {}",
                launch_path.display(),
                kimberley_cli::progress::duration(scripts)
            );
        }
        return Ok(());
    };
    let launch = VmDir::open(&launch_path)?;
    let (version, working_set, record_ms) = if a.early_start {
        let t = Instant::now();
        progress.stage("recording the working set");
        let ws = record_working_set(&launch, &resume, &a, timeout)?;
        if let Some(p) = &a.working_set_out {
            write_file(p, &kimberley_formats::working_set::encode(&ws), true)
                .with_context(|| format!("writing the working set {}", p.display()))?;
        }
        (
            kimberley_formats::overlay::header::VERSION_MAP,
            crate::diff::state_first(&launch.manifest, ws),
            Some(t.elapsed().as_millis() as u64),
        )
    } else {
        (
            kimberley_formats::overlay::header::DEFAULT_VERSION,
            Vec::new(),
            None,
        )
    };
    let opts = DiffOptions {
        level: a.level,
        threads,
        parent: chain.parent,
        version,
        working_set,
        spool_dir: crate::diff::spool_dir(dest.flatten()),
        ..DiffOptions::new(protection.expect("an overlay has its protection"))
    };
    let stats = write_overlay(effective, &launch, out, &opts, &progress)?;
    drop(reporter);
    if let Some(p) = &a.stats_json {
        let v = json!({
            "parents_ms": parents_ms,
            "restore_ms": restore_ms,
            "install_ms": times[0].1,
            "resume_ms": times[1].1,
            "suspend_ms": suspend_ms,
            "working_set_ms": record_ms,
            "reclaim": reclaimed.as_ref().map(reclaim_json),
            "diff": stats,
            "total_ms": t0.elapsed().as_millis() as u64,
        });
        write_json(p, &versioned(JsonOutput::BuildStats, &v)?)?;
    }
    if !a.quiet {
        eprintln!("{}", summary(&stats, a.output.as_deref(), Some(scripts)));
    }
    Ok(())
}

/// The working set of the launch VM in `launch`: the memory pages it
/// touches, in first-touch order, when resumed (on scratch copies next to
/// it, discarded after) it runs `resume` again and then `a.settle_ms` on.
fn record_working_set(
    launch: &VmDir,
    resume: &str,
    a: &BuildArgs,
    timeout: Duration,
) -> Result<Vec<kimberley_formats::overlay::Pos>> {
    let scratch = ScratchDir::next_to(
        &launch
            .path
            .with_file_name(format!("{}-record", name_of(&launch.path))),
    );
    let mut w = VmDirWriter::create(scratch.path())?;
    w.set_sync(false);
    let opts = RestoreOptions {
        memory: kimberley_machine::MemorySource::LazyRecording,
        ..RestoreOptions::copy_into(&w)
    };
    let mut vm = kimberley_cli::machines::restore(launch, opts).context(
        "resuming the launch VM to record its working set (--early-start; the microVM only)",
    )?;
    let o = vm
        .agent()
        .run_script(resume, &mut |_| {}, timeout)
        .map_err(|e| vm_error(e).context("running the resume script to record the working set"))?;
    if o.status != 0 {
        return Err(vm_failure(format!(
            "the resume script failed with status {} while the working set was recorded",
            o.status
        )));
    }
    std::thread::sleep(Duration::from_millis(a.settle_ms));
    vm.pause().map_err(vm_error)?;
    let pages = vm
        .touched_pages()
        .ok_or_else(|| anyhow::anyhow!("the backend did not record the pages the VM touched"))?;
    drop(vm);
    drop(w);
    Ok(pages.into_iter().map(|p| (0u8, p)).collect())
}

/// Before the suspend: asks the guest to give back what it freed (`what`;
/// nothing if nothing is asked). Notes are printed unless `say` is 0, what
/// was trimmed with `say` 2 (`-v`).
fn reclaim(
    vm: &mut dyn Machine,
    what: Reclaim,
    timeout: Duration,
    progress: &Progress,
    println: &dyn Fn(&str),
    say: u8,
) -> Result<Option<(Reclaimed, u64)>> {
    if !what.any() {
        return Ok(None);
    }
    let t = Instant::now();
    let doing = match (what.trim, what.drop_caches) {
        (true, false) => "trimming the guest's file systems",
        (false, _) => "dropping the guest's page cache",
        (true, true) => "trimming the guest's file systems and dropping its page cache",
    };
    progress.stage(doing);
    let r = vm.agent().reclaim(what, timeout).map_err(|e| match e {
        kimberley_machine::Error::Timeout(t) => vm_failure(format!(
            "{doing} timed out after {} s (--timeout) and was stopped",
            t.as_secs()
        )),
        e => vm_error(e).context(doing),
    })?;
    let ms = t.elapsed().as_millis() as u64;
    match &r {
        Reclaimed::NotApplicable(why) if say >= 2 => println(&format!("note: not {doing}: {why}")),
        Reclaimed::NotApplicable(_) => {}
        Reclaimed::Done {
            trimmed,
            caches_dropped,
            notes,
        } => {
            if say >= 1 {
                for n in notes {
                    println(&format!("note: {n}"));
                }
            }
            if say >= 2 {
                for t in trimmed.iter().filter(|t| t.error.is_none()) {
                    println(&match t.bytes {
                        Some(b) => format!(
                            "trimmed {}: {} ({b} bytes)",
                            t.mount,
                            kimberley_cli::progress::bytes(b)
                        ),
                        None => format!("trimmed {} (the guest did not say how much)", t.mount),
                    });
                }
                if what.trim && trimmed.is_empty() && notes.is_empty() {
                    println("trimmed nothing: the guest has no mounted file system on a disk");
                }
                if *caches_dropped {
                    println("dropped the guest's page cache");
                }
            }
        }
    }
    Ok(Some((r, ms)))
}

/// `build --stats-json`'s `reclaim` member (docs/JSON.md).
fn reclaim_json((r, ms): &(Reclaimed, u64)) -> serde_json::Value {
    match r {
        Reclaimed::NotApplicable(why) => json!({
            "applicable": false,
            "trimmed_bytes": null,
            "file_systems": [],
            "caches_dropped": false,
            "notes": [why],
            "ms": ms,
        }),
        Reclaimed::Done {
            trimmed,
            caches_dropped,
            notes,
        } => json!({
            "applicable": true,
            "trimmed_bytes": r.trimmed_bytes(),
            "file_systems": trimmed.iter().map(|t| json!({
                "mount": t.mount,
                "trimmed_bytes": t.bytes,
                "error": t.error,
            })).collect::<Vec<_>>(),
            "caches_dropped": caches_dropped,
            "notes": notes,
            "ms": ms,
        }),
    }
}

/// The writer of `--launch-out DIR`: a new directory, or with `--force` a
/// new version of an existing VM directory that replaces it as a whole
/// (swapped in by one rename, so an interrupted run leaves the old or the
/// new one, never half). Anything else at DIR is refused.
fn launch_writer(p: &Path, force: bool) -> Result<VmDirWriter> {
    if !occupied(p) {
        return Ok(VmDirWriter::create(p)?);
    }
    let exists = |msg: String| kimberley_cli::run::with_code(kimberley_cli::exit::EXISTS, msg);
    if !force {
        return Err(exists(format!(
            "--launch-out {}: exists (give --force to replace a VM directory)",
            p.display()
        )));
    }
    let is_vmdir = std::fs::symlink_metadata(p).is_ok_and(|m| m.is_dir())
        && std::fs::symlink_metadata(p.join(MANIFEST)).is_ok_and(|m| m.is_file());
    if !is_vmdir {
        return Err(exists(format!(
            "--launch-out {}: exists and is not a VM directory (no {MANIFEST}), not replaced even with --force",
            p.display()
        )));
    }
    Ok(VmDirWriter::replacing(p)?)
}

/// The `--depfile` text: the target (-o FILE, else --launch-out DIR),
/// then what the build reads.
fn depfile_text(a: &BuildArgs) -> Result<String> {
    // The overlay when there is one, else the launch VM.
    let target = match (&a.output, &a.launch_out) {
        (Some(o), _) if o.as_os_str() != "-" => Some(o.clone()),
        (None, Some(l)) => Some(l.clone()),
        _ => None,
    };
    let Some(target) = target else {
        return Err(usage(
            "--depfile needs a target to name: -o FILE, or --launch-out DIR alone",
        ));
    };
    let mut deps = vec![a.base.join(MANIFEST)];
    deps.extend(a.parent.iter().cloned());
    if let Some(r) = &a.parent_from {
        deps.extend(kimberley_cli::oci::tag_file(r, &a.cache)?);
    }
    deps.push(a.install.clone());
    deps.push(a.resume.clone());
    // A key changes the overlay's bytes (section 7.7), so it is an input;
    // its path is not a secret.
    deps.extend(a.keys.key_file.clone());
    deps.extend(a.keys.passphrase_file.clone());
    deps.retain(|d| d.as_os_str() != "-");
    depfile::render(&[target], &deps).map_err(|e| usage(format!("--depfile: {e}")))
}

/// Opens `--guest-log FILE` for appending, creating it 0600: a log, so it
/// is written in place rather than atomically.
fn open_log(
    p: &std::path::Path,
) -> Result<(std::io::LineWriter<std::fs::File>, std::path::PathBuf)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(p)
        .with_context(|| format!("opening the guest log {}", p.display()))?;
    Ok((std::io::LineWriter::new(f), p.to_path_buf()))
}
