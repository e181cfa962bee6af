//! `--run`: resume the synthesised launch VM and keep it running.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kimberley_cli::output::write_json;
use kimberley_cli::vm::vm_error;
use kimberley_formats::vmdir::VmDir;
use kimberley_machine::{ControlSocket, Error as MachineError, Machine, RestoreOptions};

fn ms(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_millis() as u64
}

/// Resumes the VM in `out` in place (`opts`: its network), serves the
/// control socket `sock` until stopped, then suspends it back into `out`.
pub fn run(
    out: &Path,
    sock: ControlSocket,
    opts: RestoreOptions<'static>,
    t0: Instant,
    mut stats: serde_json::Value,
    stats_json: Option<&Path>,
) -> Result<()> {
    let dir = VmDir::open(out)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop = kimberley_machine::stop_on_signals(stop).map_err(vm_error)?;
    let t_restore = Instant::now();
    let mut vm = kimberley_cli::machines::restore(&dir, opts).context("resuming the launch VM")?;
    vm.set_interrupt(stop.clone());
    let first_run = vm.first_run().unwrap_or_else(Instant::now);
    // The guest's first answer: the end of the timeline.
    match vm.agent().ping(Duration::from_secs(30)) {
        Err(MachineError::Interrupted) => return suspend(vm, &dir, sock, stop, out),
        r => r.map_err(vm_error)?,
    }
    let answered = Instant::now();
    println!("kimberley: launch VM resumed");
    let t = &mut stats["times"];
    t["restore_start_ms"] = ms(t0, t_restore).into();
    t["resume_ms"] = ms(t0, first_run).into();
    t["first_answer_ms"] = ms(t0, answered).into();
    t["restore_to_first_instruction_ms"] = ms(t_restore, first_run).into();
    if let Some(p) = stats_json {
        write_json(p, &stats)?;
    }
    eprintln!(
        "launch VM running; control socket {} (`vmctl {} stop` or Ctrl-C suspends it)",
        sock.path().display(),
        sock.path().display()
    );
    suspend(vm, &dir, sock, stop, out)
}

/// Serves the control socket until a stop (at once if SIGINT/SIGTERM came
/// already), then suspends the VM into `out`.
fn suspend(
    vm: Box<dyn Machine>,
    dir: &VmDir,
    sock: ControlSocket,
    stop: Arc<AtomicBool>,
    out: &Path,
) -> Result<()> {
    kimberley_cli::vm::serve_vmdir(vm, dir, sock, stop, None)?;
    eprintln!("launch VM suspended into {}", out.display());
    Ok(())
}
