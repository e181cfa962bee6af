//! `dekimberlize`: apply VM overlays. A thin front end over
//! `kimberley-formats`.

pub mod cli;
mod run;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use clap::Parser;
use kimberley_cli::output::{open_input, write_json};
use kimberley_cli::progress::Bar;
use kimberley_cli::run::usage;
use kimberley_formats::apply::{self, check_chain, ApplyOptions, Input, Opened};
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::VmDir;

/// Parses arguments and runs the command.
pub fn main() -> Result<()> {
    let args = cli::Cli::parse();
    match args.command {
        Some(cli::Command::Verify(v)) => verify(v),
        None => run_apply(args.apply),
    }
}

fn inputs(paths: &[PathBuf]) -> Result<Vec<Input>> {
    let paths: Vec<PathBuf> = if paths.is_empty() {
        vec![PathBuf::from("-")]
    } else {
        paths.to_vec()
    };
    if paths.iter().filter(|p| p.as_os_str() == "-").count() > 1 {
        return Err(usage("stdin (-) can be given only once"));
    }
    if paths.iter().any(|p| p.as_os_str() == "-") && std::io::stdin().is_terminal() {
        return Err(usage(
            "no overlay given: use -i FILE or pipe an overlay into stdin",
        ));
    }
    paths
        .iter()
        .map(|p| {
            let (name, reader) = open_input(p)?;
            Ok(Input { name, reader })
        })
        .collect()
}

fn run_apply(a: cli::ApplyArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let threads = kimberley_cli::run::threads(a.threads);
    let base_path = a.base.expect("required by clap");
    let out = a.output.expect("required by clap");
    let secret = a.keys.secret()?;
    let base = VmDir::open(&base_path)?;
    // Anything at `out`, a dangling symbolic link included, is refused
    // (and the output is committed without replacing anything).
    if kimberley_formats::fsutil::occupied(&out) {
        return Err(kimberley_formats::Error::Exists(out).into());
    }
    // The control socket is checked and bound before any work: a path
    // that another VM serves is refused before the overlay is read.
    let control = if a.run {
        Some(
            kimberley_machine::ControlSocket::bind(a.control.as_deref(), "dekimberlize")
                .map_err(kimberley_cli::vm::vm_error)?,
        )
    } else {
        None
    };
    let inputs = inputs(&a.input)?;
    let progress = Arc::new(Progress::default());
    let bar = Bar::start(progress.clone(), a.quiet);
    let stats = apply::apply_chain(
        &base,
        inputs,
        &out,
        &ApplyOptions {
            secret,
            policy: a.read.policy(),
            threads,
            sync: !a.no_sync,
        },
        &progress,
    )?;
    drop(bar);
    if !a.quiet && std::io::stderr().is_terminal() {
        let secs = stats.times.total_ms as f64 / 1000.0;
        eprintln!(
            "{}: {:.1} MiB launch VM from {:.1} MiB of overlay in {:.2} s ({:.2} GiB/s)",
            out.display(),
            stats.launch_bytes as f64 / 1048576.0,
            stats.overlay_bytes as f64 / 1048576.0,
            secs,
            stats.launch_bytes as f64 / 1073741824.0 / secs.max(1e-9)
        );
    }
    let json = serde_json::to_value(&stats)?;
    if let Some(sock) = control {
        return run::run(
            &out,
            sock,
            kimberley_machine::RestoreOptions {
                forwards: a.forward.clone(),
                network: a.net.is_some(),
                ..kimberley_machine::RestoreOptions::in_place()
            },
            t0,
            json,
            a.stats_json.as_deref(),
        );
    }
    if let Some(p) = &a.stats_json {
        write_json(p, &json)?;
    }
    Ok(())
}

fn verify(v: cli::VerifyArgs) -> Result<()> {
    let threads = kimberley_cli::run::threads(v.threads);
    let secret = v.keys.secret()?;
    let mut ins = inputs(v.input.as_slice())?;
    let o = Opened::open(ins.remove(0), secret.as_ref(), &v.read.policy())?;
    if let Some(b) = &v.base {
        let base = VmDir::open(b)?;
        check_chain(&base, std::slice::from_ref(&o))?;
    }
    let name = o.name.clone();
    // An unencrypted overlay (read without a key, or with
    // --allow-unencrypted) has integrity checks only.
    let checked = if o.keys.is_some() {
        "every segment authenticated"
    } else {
        "checksums OK (not authenticated)"
    };
    let r = apply::verify(o, threads, &Progress::default())?;
    if !v.quiet {
        eprintln!(
            "{name}: OK ({} bytes, {} segments, {} records, {checked})",
            r.bytes, r.segments, r.records
        );
    }
    Ok(())
}
