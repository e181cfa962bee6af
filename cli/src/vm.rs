//! Front-end helpers for commands that run a VM.

use kimberley_machine::Error as MachineError;

use crate::exit;
use crate::run::with_code;

/// Turns a VMM error into an error with the documented exit code: a VM
/// directory problem keeps its own code, everything else is a VM failure.
pub fn vm_error(e: impl Into<MachineError>) -> anyhow::Error {
    match e.into() {
        MachineError::VmDir(f) => f.into(),
        other => with_code(exit::VM, other.to_string()),
    }
}

/// A VM failure with a message (script errors and the like).
pub fn vm_failure(msg: impl Into<String>) -> anyhow::Error {
    with_code(exit::VM, msg)
}

/// How [`serve_vmdir`] ended.
#[derive(Debug)]
pub enum Served {
    /// Stopped (request or signal) and suspended back into its VMDIR.
    Suspended,
    /// Migrated away (the migrate hook's result); the VMDIR was left as it
    /// was and the local copy was discarded.
    Migrated(serde_json::Value),
    /// A migration's hand-over is in doubt (why): the guest, which the
    /// receiver may be running, was suspended into its VMDIR, not resumed.
    InDoubt(String),
}

/// Serves `vm`'s control socket `sock` until a stop request or `stop`
/// (see [`serve_vmdir`], which also suspends); returns the machine and how
/// serving ended. `snapshot` requests name VM directories `name`.
pub fn serve(
    vm: Box<dyn kimberley_machine::Machine>,
    name: String,
    sock: kimberley_machine::ControlSocket,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    migrate: Option<kimberley_machine::MigrateFn>,
) -> anyhow::Result<(
    Box<dyn kimberley_machine::Machine>,
    kimberley_machine::control::Ending,
)> {
    use std::io::Write;

    use kimberley_formats::vmdir::VmDirWriter;
    use kimberley_machine::control;

    let snapshot: control::SnapshotFn = Box::new(move |vm, to| {
        let w = VmDirWriter::create(to).map_err(|e| e.to_string())?;
        vm.suspend_into(w, &name)
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let console = Box::new(|line: &str| {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{line}");
        let _ = o.flush();
    });
    let hooks = control::Hooks { snapshot, migrate };
    control::serve_with(vm, sock, hooks, stop, console).map_err(vm_error)
}

/// Runs `vm`, which was resumed from `dir`, behind the control socket
/// `sock` (guest console to stdout) until it is stopped through the socket
/// or by SIGINT/SIGTERM (`stop`, from [`kimberley_machine::stop_on_signals`];
/// it also interrupts a running `exec`), then suspends it back into `dir`.
/// `snapshot` requests write VM directories (atomically, at absolute paths
/// that do not exist); `migrate` requests go to `migrate` when given. The
/// socket file is gone when this returns.
pub fn serve_vmdir(
    vm: Box<dyn kimberley_machine::Machine>,
    dir: &kimberley_formats::vmdir::VmDir,
    sock: kimberley_machine::ControlSocket,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    migrate: Option<kimberley_machine::MigrateFn>,
) -> anyhow::Result<Served> {
    use anyhow::Context;
    use kimberley_machine::control;

    let (mut vm, ending) = serve(vm, dir.manifest.name.clone(), sock, stop, migrate)?;
    match ending {
        control::Ending::Migrated(v) => Ok(Served::Migrated(v)),
        control::Ending::InDoubt(why) => {
            vm.suspend_in_place(dir)
                .map_err(vm_error)
                .context("suspending the VM whose hand-over is in doubt")?;
            Ok(Served::InDoubt(why))
        }
        control::Ending::Stopped => {
            vm.suspend_in_place(dir)
                .map_err(vm_error)
                .context("suspending the VM")?;
            Ok(Served::Suspended)
        }
    }
}
