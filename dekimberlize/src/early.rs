//! `--run --early-start`: the launch VM runs while its overlay is still
//! being applied (formats' `apply::early` serves what has arrived).

use std::io::Read;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kimberley_cli::output::write_json;
use kimberley_cli::progress as units;
use kimberley_cli::schema::{versioned, JsonOutput};
use kimberley_cli::vm::vm_error;
use kimberley_formats::apply::early::Early;
use kimberley_formats::apply::{self, ApplyOptions, Opened};
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::{Manifest, VmDir};
use kimberley_machine::{Backend, ControlSocket, Error as MachineError};

/// A reader that counts the bytes read through it.
pub struct Counted<R> {
    inner: R,
    n: Arc<AtomicU64>,
}

impl<R> Counted<R> {
    /// Counts `inner`'s bytes into `n`.
    pub fn new(inner: R, n: Arc<AtomicU64>) -> Self {
        Counted { inner, n }
    }
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let k = self.inner.read(buf)?;
        self.n.fetch_add(k as u64, Ordering::Relaxed);
        Ok(k)
    }
}

/// What an early start needs, once it is known to be possible.
pub struct Plan {
    early: Early,
    launch: Manifest,
    backend: Box<dyn Backend>,
}

/// Whether the chain `opened` can start early on `base`: None (with a
/// note on stderr unless `quiet`) when it must be applied in full first.
pub fn plan(base: &VmDir, opened: &[Opened], out: &Path, quiet: bool) -> Result<Option<Plan>> {
    let note = |why: &str| {
        if !quiet {
            eprintln!("note: {why}; the overlay is applied in full before the VM starts");
        }
    };
    let [o] = opened else {
        note("--early-start takes a single overlay, not a chain");
        return Ok(None);
    };
    let mut launch = o.manifest.launch_manifest();
    launch.machine = base.manifest.machine.clone();
    let backend = kimberley_cli::machines::backend_of(&launch, out)?;
    if !backend.serves_arriving() {
        note(&format!(
            "the {} backend cannot run a VM whose memory is still arriving",
            backend.name()
        ));
        return Ok(None);
    }
    let Some(early) = Early::new(base, o)? else {
        note("the overlay has no coverage map (version 1: make it with `kimberlize diff --overlay-version 2`)");
        return Ok(None);
    };
    Ok(Some(Plan {
        early,
        launch,
        backend,
    }))
}

/// The settings of one early start.
pub struct Run<'a> {
    /// The base.
    pub base: &'a VmDir,
    /// The launch VMDIR to commit.
    pub out: &'a Path,
    /// How to apply.
    pub opts: &'a ApplyOptions,
    /// Progress of the apply.
    pub progress: &'a Progress,
    /// Start of the command.
    pub t0: Instant,
    /// When the first header was opened.
    pub t_open: Instant,
    /// Overlay bytes read so far.
    pub received: &'a AtomicU64,
    /// Where `--stats-json` goes.
    pub stats_json: Option<&'a Path>,
    /// No summary.
    pub quiet: bool,
}

fn ms(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_millis() as u64
}

impl Run<'_> {
    /// Applies `opened` (one overlay) while its launch VM runs from what has
    /// arrived; serves `sock` until stopped, then suspends the VM into the
    /// committed VMDIR. If the apply fails the VM is killed and the apply's
    /// error returned (nothing is committed).
    pub fn go(self, plan: Plan, mut opened: Vec<Opened>, sock: ControlSocket) -> Result<()> {
        let o = opened.pop().expect("plan checked one overlay");
        let Plan {
            early,
            launch,
            backend,
        } = plan;
        let stop = Arc::new(AtomicBool::new(false));
        let stop = kimberley_machine::stop_on_signals(stop).map_err(vm_error)?;
        let failed = AtomicBool::new(false);
        let (stop_a, stop_s) = (stop.clone(), stop.clone());
        std::thread::scope(|sc| {
            let (early, failed) = (&early, &failed);
            let applying = sc.spawn(move || {
                let r = apply::apply_early(
                    self.base,
                    o,
                    self.out,
                    self.opts,
                    self.progress,
                    self.t_open,
                    early,
                );
                if r.is_err() {
                    // Ends serving: the VM that ran on it is discarded.
                    failed.store(true, Ordering::SeqCst);
                    stop_a.store(true, Ordering::SeqCst);
                }
                r
            });
            let started = early
                .wait_working_set()
                .map_err(anyhow::Error::from)
                .and_then(|()| {
                    let t_restore = Instant::now();
                    let vm = backend
                        .restore_arriving(early, &launch, self.out)
                        .map_err(vm_error)?;
                    Ok((t_restore, vm))
                });
            let (t_restore, mut vm) = match started {
                Ok(v) => v,
                Err(e) => {
                    // The apply's own error says why (and gives the exit
                    // code); if it succeeded, the VM alone could not start
                    // early: it starts from the committed VMDIR instead.
                    let stats = join(applying)?;
                    eprintln!("note: the launch VM could not start early ({e:#}); it starts now that the overlay is applied");
                    let json = versioned(JsonOutput::ApplyStats, &stats)?;
                    return crate::run::run(
                        self.out,
                        sock,
                        kimberley_machine::RestoreOptions::in_place(),
                        self.t0,
                        json,
                        self.stats_json,
                    );
                }
            };
            vm.set_interrupt(stop.clone());
            let first_run = vm.first_run().unwrap_or_else(Instant::now);
            let received_at_first = self.received.load(Ordering::Relaxed);
            let answered = match vm.agent().ping(Duration::from_secs(30)) {
                Ok(()) => Some(Instant::now()),
                // Stopped, or the apply failed (its error is what counts).
                Err(MachineError::Interrupted) => None,
                Err(_) if failed.load(Ordering::SeqCst) => None,
                Err(e) => return Err(vm_error(e)),
            };
            if answered.is_some() {
                println!("kimberley: launch VM resumed (early start)");
                eprintln!(
                    "launch VM running before its overlay has arrived ({} of it read); control socket {} (`vmctl {} stop` or Ctrl-C suspends it once it is applied)",
                    units::bytes(received_at_first),
                    sock.path().display(),
                    sock.path().display()
                );
            }
            // Faults, and pages brought in with them, up to the first answer.
            let faults = vm.memory_faults();
            let name = launch.name.clone();
            let serving = sc.spawn(move || kimberley_cli::vm::serve(vm, name, sock, stop_s, None));
            let stats = match join(applying) {
                Ok(s) => s,
                Err(e) => {
                    // The apply failed and stopped the serving: kill the VM
                    // (no suspend), nothing it computed is kept.
                    drop(serving.join());
                    return Err(e);
                }
            };
            let counts = early.counts();
            let mut json = versioned(JsonOutput::ApplyStats, &stats)?;
            let t = &mut json["times"];
            t["restore_start_ms"] = ms(self.t0, t_restore).into();
            t["resume_ms"] = ms(self.t0, first_run).into();
            t["first_instruction_ms"] = ms(self.t0, first_run).into();
            if let Some(a) = answered {
                t["first_answer_ms"] = ms(self.t0, a).into();
            }
            json["early_start"] = serde_json::json!({
                "overlay_bytes": stats.overlay_bytes,
                "received_bytes_at_first_instruction": received_at_first,
                "first_instruction_ms": ms(self.t0, first_run),
                "first_answer_ms": answered.map(|a| ms(self.t0, a)),
                "pages_from_base": counts.from_base,
                "pages_from_overlay": counts.from_overlay,
                "pages_waited": counts.waited,
                "faults": faults.map(|f| f.0),
                "prefetched_bytes": faults.map(|f| f.1.saturating_sub(f.0) * 4096),
            });
            if let Some(p) = self.stats_json {
                write_json(p, &json)?;
            }
            if !self.quiet {
                eprintln!(
                    "wrote {}: {} launch VM from {} of overlay in {}; the VM started after {} of it",
                    self.out.display(),
                    units::bytes(stats.launch_bytes),
                    units::bytes(stats.overlay_bytes),
                    units::duration(Duration::from_millis(stats.times.total_ms)),
                    units::bytes(received_at_first),
                );
            }
            let (mut vm, _ending) = serving
                .join()
                .map_err(|_| anyhow::anyhow!("the control thread panicked"))??;
            let dir = VmDir::open(self.out)?;
            vm.suspend_in_place(&dir)
                .map_err(vm_error)
                .context("suspending the VM")?;
            eprintln!("launch VM suspended into {}", self.out.display());
            Ok(())
        })
    }
}

fn join<T>(h: std::thread::ScopedJoinHandle<'_, Result<T, kimberley_formats::Error>>) -> Result<T> {
    match h.join() {
        Ok(r) => Ok(r?),
        Err(_) => Err(anyhow::anyhow!("the apply thread panicked")),
    }
}
