//! `kimberlized`: see `kimberlized --help`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use kimberlized::{api, cli, discovery, log, server, session, tls};
use serde_json::json;

fn main() -> std::process::ExitCode {
    kimberley_cli::main_with(run)
}

fn run() -> anyhow::Result<()> {
    let args = cli::parse();
    match args.command {
        Some(cli::Command::Completions(c)) => {
            kimberley_cli::help::completions(cli::command(), c.shell, &mut std::io::stdout())?;
            Ok(())
        }
        None => daemon(args.daemon),
    }
}

/// Runs the daemon until SIGINT/SIGTERM.
fn daemon(a: cli::DaemonArgs) -> anyhow::Result<()> {
    // clap requires them without a subcommand.
    let (Some(cert), Some(key)) = (a.cert.clone(), a.key.clone()) else {
        return Err(kimberley_cli::run::usage("--cert and --key are required"));
    };
    let threads = kimberley_cli::run::threads(a.threads);
    let stop = kimberley_machine::stop_on_signals(Arc::new(AtomicBool::new(false)))
        .map_err(kimberley_cli::vm::vm_error)?;
    let config = tls::server_config(&tls::Identity {
        cert,
        key,
        ca: a.client_ca.clone(),
        pins: a.client_pin.clone(),
    })?;
    let name = a.name.clone().unwrap_or_else(discovery::host_name);
    let limits = api::Limits {
        max_sessions: a.max_sessions,
        max_memory: a.max_memory,
        max_disk: a.max_disk,
    };
    let references = session::References {
        allowed: a.allow_registry.clone(),
        cache: a.cache.clone(),
        registry: a.registry.clone(),
    };
    let mgr = session::Manager::open(
        &a.state_dir,
        &a.base,
        limits,
        threads,
        name.clone(),
        references,
        a.forward_addr(),
    )?;
    let listener = std::net::TcpListener::bind(a.listen)
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr().context("the listening address")?;
    let info = mgr.info();
    log::info(
        "listening",
        json!({"addr": addr, "port": addr.port(), "name": name, "bases": info.bases, "limits": info.limits}),
    );
    let _advert = if a.no_mdns {
        None
    } else {
        let host = a
            .mdns_host
            .clone()
            .unwrap_or_else(|| format!("{name}.local."));
        let advert = discovery::advertise(&name, &host, addr.port(), &info)?;
        log::info(
            "advertised",
            json!({"name": name, "host": host, "service": kimberlized::SERVICE_TYPE}),
        );
        Some(advert)
    };
    server::serve(listener, config, mgr.clone(), stop);
    log::info("stopping", json!({}));
    mgr.suspend_all();
    log::info("stopped", json!({}));
    Ok(())
}
