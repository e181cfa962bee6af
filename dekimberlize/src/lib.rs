//! `dekimberlize`: apply VM overlays. A thin front end over
//! `kimberley-formats`.

pub mod cli;
mod early;
mod run;

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Result;
use kimberley_cli::output::write_json;
use kimberley_cli::progress::{self as units, Reporter};
use kimberley_cli::run::usage;
use kimberley_cli::schema::{versioned, JsonOutput};
use kimberley_formats::apply::{self, check_chain, ApplyOptions, Input, Opened};
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::VmDir;

/// Parses arguments and runs the command.
pub fn main() -> Result<()> {
    let args = cli::parse();
    match args.command {
        Some(cli::Command::Verify(v)) => verify(v),
        Some(cli::Command::Completions(a)) => {
            kimberley_cli::help::completions(cli::command(), a.shell, &mut std::io::stdout())?;
            Ok(())
        }
        None => run_apply(args.apply),
    }
}

/// Checks that stdin is not asked to carry a secret (`-k -`) and an
/// overlay (`-i -`, or no `-i`) at once.
fn check_stdin(paths: &[PathBuf], keys: &kimberley_cli::KeyArgs) -> Result<()> {
    keys.check_stdin(paths.is_empty() || paths.iter().any(|p| p.as_os_str() == "-"))
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
    kimberley_cli::output::open_overlays(&paths)
}

fn run_apply(a: cli::ApplyArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let threads = kimberley_cli::run::threads(a.threads);
    let out = a.output.expect("required by clap");
    if a.from.is_some() {
        a.keys.check_stdin(false)?;
    } else {
        check_stdin(&a.input, &a.keys)?;
    }
    let secret = a.keys.secret()?;
    // --base wins; without it (only with --from) the cache's base is
    // looked up once the chain's first header is open.
    let given_base = a.base.as_deref().map(VmDir::open).transpose()?;
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
    let opts = ApplyOptions {
        secret,
        policy: a.read.policy(),
        threads,
        sync: !a.no_sync,
    };
    // The stats count from the opening of the first header, as apply_chain's do.
    let t_open = std::time::Instant::now();
    // Overlay bytes read so far (for an early start's statistics).
    let received = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (base, opened) = match (&a.from, given_base) {
        (Some(r), base) => {
            let chain = kimberley_cli::oci::open_chain(r, &a.cache, &a.registry)?;
            let opened = chain
                .inputs
                .into_iter()
                .map(|mut i| {
                    i.reader = Box::new(early::Counted::new(i.reader, received.clone()));
                    i
                })
                .map(|i| Opened::open(i, opts.secret.as_ref(), &opts.policy))
                .collect::<Result<Vec<_>, _>>()?;
            let base = match (base, opened.first()) {
                (Some(b), _) => b,
                (None, Some(first)) => {
                    kimberley_cli::oci::cached_base(&a.cache, first, &chain.manifest)?
                }
                (None, None) => return Err(usage("the chain has no layers")),
            };
            (base, opened)
        }
        (None, Some(base)) => {
            let opened = inputs(&a.input)?
                .into_iter()
                .map(|mut i| {
                    i.reader = Box::new(early::Counted::new(i.reader, received.clone()));
                    i
                })
                .map(|i| Opened::open(i, opts.secret.as_ref(), &opts.policy))
                .collect::<Result<Vec<_>, _>>()?;
            (base, opened)
        }
        (None, None) => return Err(usage("--base VMDIR is needed (or --from REF)")),
    };
    let progress = Arc::new(Progress::default());
    let reporter = Reporter::start(progress.clone(), a.progress, a.quiet);
    if a.early_start {
        if let Some(plan) = early::plan(&base, &opened, &out, a.quiet)? {
            let sock = control.expect("--early-start requires --run");
            let run = early::Run {
                base: &base,
                out: &out,
                opts: &opts,
                progress: &progress,
                t0,
                t_open,
                received: &received,
                stats_json: a.stats_json.as_deref(),
                quiet: a.quiet,
            };
            let r = run.go(plan, opened, sock);
            drop(reporter);
            return r;
        }
    }
    let stats =
        apply::apply_opened(&base, opened, &out, &opts, &progress, t_open).map_err(|e| {
            // A layer streamed from a registry that failed its digest.
            let e = anyhow::Error::new(e);
            if kimberley_cli::oci::tampered_in(&e) {
                kimberley_cli::run::with_code(kimberley_cli::exit::TAMPERED, format!("{e:#}"))
            } else {
                e
            }
        })?;
    drop(reporter);
    if !a.quiet {
        let took = std::time::Duration::from_millis(stats.times.total_ms);
        eprintln!(
            "wrote {}: {} launch VM from {} of overlay in {} ({})",
            out.display(),
            units::bytes(stats.launch_bytes),
            units::bytes(stats.overlay_bytes),
            units::duration(took),
            units::rate(stats.launch_bytes, took)
        );
    }
    let json = versioned(JsonOutput::ApplyStats, &stats)?;
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
    if v.base.is_none() && v.input.len() > 1 {
        return Err(usage(
            "verifying a chain of overlays needs --base VMDIR (the chain is checked from it up)",
        ));
    }
    check_stdin(&v.input, &v.keys)?;
    let secret = v.keys.secret()?;
    let policy = v.read.policy();
    let base = v.base.as_deref().map(VmDir::open).transpose()?;
    let chain = inputs(&v.input)?
        .into_iter()
        .map(|i| Opened::open(i, secret.as_ref(), &policy))
        .collect::<Result<Vec<_>, _>>()?;
    // Every link (base identity, parent ids, depths) before any segment is read.
    if let Some(base) = &base {
        check_chain(base, &chain)?;
    }
    let n = chain.len();
    for o in chain {
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
    }
    if let (Some(base), false) = (&base, v.quiet) {
        eprintln!(
            "{}: the chain of {n} overlay{} applies to it in this order",
            base.path.display(),
            if n == 1 { "" } else { "s" }
        );
    }
    Ok(())
}
