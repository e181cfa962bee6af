//! `vmigrate`: live pre-copy migration of Kimberley VMs, microVMs and
//! QEMU-backed Linux guests (see
//! docs/MIGRATION.md). `run` and `recv` run a VM behind a control socket;
//! `send` asks that process (the `migrate` request) to move it.

pub mod channel;
pub mod chunks;
pub mod cli;
mod client;
pub mod dest;
mod disk_refs;
pub mod params;
pub mod policy;
mod prehash;
pub mod protocol;
pub mod source;
mod stream_dest;
pub mod stream_pages;
pub mod stream_source;
pub mod sums;
mod writer;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use kimberley_cli::vm::{serve_vmdir, vm_error, Served};
use kimberley_formats::vmdir::VmDir;
use kimberley_machine::{ControlSocket, Machine, RestoreOptions};

/// Parses arguments and runs the command.
pub fn main() -> Result<()> {
    let args = cli::parse();
    match args.command {
        cli::Command::Run(a) => run(a),
        cli::Command::Recv(a) => recv_cmd(a),
        cli::Command::Send(a) => client::send(a),
        cli::Command::Completions(a) => {
            kimberley_cli::help::completions(cli::command(), a.shell, &mut std::io::stdout())?;
            Ok(())
        }
    }
}

/// The control socket (`--control`, or a private default), bound and
/// checked before anything else happens.
fn bind(p: Option<&std::path::Path>) -> Result<ControlSocket> {
    ControlSocket::bind(p, "vmigrate").map_err(vm_error)
}

fn serve(
    vm: Box<dyn Machine>,
    dir: &VmDir,
    sock: ControlSocket,
    stop: Arc<AtomicBool>,
) -> Result<()> {
    eprintln!(
        "VM running; control socket {} (stop or Ctrl-C suspends it into {})",
        sock.path().display(),
        dir.path.display()
    );
    match serve_vmdir(vm, dir, sock, stop, Some(source::handler()))? {
        Served::Suspended => eprintln!("VM suspended into {}", dir.path.display()),
        Served::Migrated(v) => eprintln!(
            "VM migrated to {}{}; {} is stale now",
            v["to"].as_str().unwrap_or("?"),
            v["downtime_ms"]
                .as_f64()
                .map(|d| format!(" (downtime {d} ms)"))
                .unwrap_or_default(),
            dir.path.display()
        ),
        Served::InDoubt(why) => bail!(
            "{why}; the guest is suspended in {d}: if the receiver does not run it, resume it with `vmigrate run {d}`, otherwise delete {d}",
            d = dir.path.display()
        ),
    }
    Ok(())
}

fn run(a: cli::RunArgs) -> Result<()> {
    kimberley_cli::run::threads(None);
    let dir = VmDir::open(&a.vmdir)?;
    let sock = bind(a.control.as_deref())?;
    let stop =
        kimberley_machine::stop_on_signals(Arc::new(AtomicBool::new(false))).map_err(vm_error)?;
    // (SIGINT/SIGTERM meanwhile: `serve` suspends the VM at once.)
    let vm = kimberley_cli::machines::restore(&dir, RestoreOptions::in_place())
        .context("resuming the VM")?;
    serve(vm, &dir, sock, stop)
}

fn recv_cmd(a: cli::RecvArgs) -> Result<()> {
    kimberley_cli::run::threads(None);
    let key = channel::read_key(&a.key_file)?;
    if kimberley_formats::fsutil::occupied(&a.output) {
        return Err(kimberley_formats::Error::Exists(a.output).into());
    }
    if let Some(d) = &a.shared_disk_dir {
        if !d.is_dir() {
            bail!("--shared-disk-dir {} is not a directory", d.display());
        }
    }
    let stop =
        kimberley_machine::stop_on_signals(Arc::new(AtomicBool::new(false))).map_err(vm_error)?;
    // The control socket is bound (and checked) before any migration is
    // accepted: nothing that can fail this way is left for after the
    // hand-over.
    let sock = bind(a.control.as_deref())?;
    let listener = std::net::TcpListener::bind(&a.listen)
        .with_context(|| format!("listening on {}", a.listen))?;
    let listener = dest::Listener::start(listener, key, a.quiet)?;
    if !a.quiet {
        eprintln!(
            "vmigrate: waiting for a migration on {}",
            listener.local_addr()
        );
    }
    let Some(session) = listener.next_session(&stop) else {
        bail!("stopped before a migration arrived");
    };
    if !a.quiet {
        eprintln!("vmigrate: migration from {}", session.peer);
    }
    let opts = dest::Options {
        out: a.output.clone(),
        shared_disk_dir: a.shared_disk_dir.clone(),
        quiet: a.quiet,
    };
    let r = dest::receive(&listener, session, &opts, &stop)?;
    // A sender in doubt may still ask how the hand-over ended.
    listener.close_after(dest::QUERY_WINDOW);
    if let Some(why) = &r.in_doubt {
        eprintln!(
            "vmigrate: warning: the hand-over was not confirmed ({why}); the guest runs here, and the source, which had sent everything, keeps its copy suspended instead of resuming it"
        );
    }
    // From here on the guest must not be lost: a failure to write the
    // statistics is only reported.
    if let Some(p) = &a.stats_json {
        let stats = kimberley_cli::schema::versioned(
            kimberley_cli::schema::JsonOutput::RecvStats,
            &r.stats,
        );
        if let Err(e) = stats.and_then(|s| kimberley_cli::output::write_json(p, &s)) {
            eprintln!("vmigrate: warning: writing {}: {e:#}", p.display());
        }
    }
    serve(r.vm, &r.dir, sock, stop)
}
