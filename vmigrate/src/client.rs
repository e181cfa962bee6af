//! `vmigrate send`: a control-socket client that asks the VM's process to
//! migrate, shows its progress, and writes the statistics.

use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use kimberley_cli::progress as units;
use kimberley_cli::run::with_code;
use kimberley_formats::sys::poll;
use serde_json::{json, Value};

use crate::cli::SendArgs;
use crate::params::Params;

pub fn send(a: SendArgs) -> Result<()> {
    // Refuse a bad key file here, before bothering the VM's process.
    if a.key_file.as_os_str() == "-" {
        return Err(kimberley_cli::run::usage(
            "vmigrate send needs the key in a file: the VM's process reads it by its path",
        ));
    }
    crate::channel::read_key(&a.key_file)?;
    let key_file = std::fs::canonicalize(&a.key_file)
        .with_context(|| format!("resolving {}", a.key_file.display()))?;
    let p = Params {
        to: a.to.clone(),
        key_file,
        downtime_ms: a.downtime_ms,
        max_bandwidth: a.max_bandwidth,
        max_rounds: a.max_rounds,
        timeout_ms: a.timeout.saturating_mul(1000),
        shared_disk: a.shared_disk,
    };
    let stop = kimberley_machine::stop_on_signals(Arc::new(AtomicBool::new(false)))
        .map_err(|e| anyhow!("{e}"))?;
    let mut s = UnixStream::connect(&a.control)
        .with_context(|| format!("connecting to the control socket {}", a.control.display()))?;
    let req = json!({"cmd": "migrate", "params": p.to_json()});
    writeln!(s, "{req}").context("sending the request")?;
    let mut r = BufReader::new(s.try_clone().context("duplicating the socket")?);
    let tty = !a.quiet && std::io::stderr().is_terminal();
    let mut bar: Option<ProgressBar> = None;
    let mut cancelled = false;
    let mut line = String::new();
    loop {
        if stop.load(Ordering::SeqCst) && !cancelled {
            cancelled = true;
            if !a.quiet {
                eprintln!("vmigrate: cancelling; the guest stays on the source");
            }
            let _ = s.write_all(b"cancel\n");
        }
        if r.buffer().is_empty()
            && !poll::readable_one(s.as_raw_fd(), Some(Duration::from_millis(100)))
                .context("waiting on the control socket")?
        {
            continue;
        }
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => bail!("the VM's process closed the control connection during the migration"),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("reading from the control socket"),
        }
        let v: Value =
            serde_json::from_str(line.trim()).context("a bad answer on the control socket")?;
        if let Some(pr) = v.get("progress") {
            show(pr, tty, a.quiet, &mut bar);
            continue;
        }
        if let Some(b) = bar.take() {
            b.finish_and_clear();
        }
        if v["ok"] == true {
            let res = &v["result"];
            if let Some(p) = &a.stats_json {
                kimberley_cli::output::write_json(
                    p,
                    &kimberley_cli::schema::versioned(
                        kimberley_cli::schema::JsonOutput::SendStats,
                        res,
                    )?,
                )?;
            }
            if !a.quiet && res.get("hand_over").is_some() {
                eprintln!(
                    "vmigrate: the guest runs on {}: the connection was lost after the hand-over, which the receiver then confirmed",
                    a.to
                );
            } else if !a.quiet {
                eprintln!(
                    "vmigrate: the guest runs on {}: {} rounds, {} on the wire, downtime {} ms, total {}{}",
                    a.to,
                    res["rounds"],
                    units::bytes(res["bytes_on_wire"].as_u64().unwrap_or(0)),
                    res["downtime_ms"],
                    units::duration(Duration::from_secs_f64(
                        res["total_ms"].as_f64().unwrap_or(0.0).max(0.0) / 1000.0
                    )),
                    if res["throttled"] == true {
                        format!(", guest throttled up to {}%", res["max_throttle_pct"])
                    } else {
                        String::new()
                    }
                );
            }
            return Ok(());
        }
        let err = v["error"].as_str().unwrap_or("unknown error").to_string();
        if v["in_doubt"] == true {
            bail!("migration in doubt, the guest is suspended on the source (not resumed): {err}");
        }
        let msg = format!("migration failed, the guest keeps running on the source: {err}");
        if err.contains("authentication failed") {
            return Err(with_code(kimberley_cli::exit::AUTH, msg));
        }
        bail!(msg);
    }
}

fn show(p: &Value, tty: bool, quiet: bool, bar: &mut Option<ProgressBar>) {
    if quiet {
        return;
    }
    if let (Some(done), Some(total)) = (p["done"].as_u64(), p["total"].as_u64()) {
        if tty {
            let round = p["round"].as_u64().unwrap_or(0);
            let b = bar.get_or_insert_with(|| {
                let b = ProgressBar::with_draw_target(
                    Some(total),
                    ProgressDrawTarget::stderr_with_hz(10),
                );
                b.set_style(
                    ProgressStyle::with_template(
                        "{msg:>9} [{bar:30}] {pos}/{len} chunks {per_sec}",
                    )
                    .expect("valid template")
                    .progress_chars("=> "),
                );
                b
            });
            let msg = format!("round {round}");
            if b.message() != msg {
                b.reset();
                b.set_message(msg);
            }
            b.set_length(total.max(done));
            b.set_position(done);
        }
        return;
    }
    if let Some(r) = p.get("round_done") {
        if let Some(b) = bar.take() {
            b.finish_and_clear();
        }
        eprintln!(
            "vmigrate: round {}: {} pages ({} zero), {} disk blocks, {} sent in {}, dirty rate {}{}",
            r["round"],
            r["pages"],
            r["zero_pages"],
            r["disk_blocks"],
            units::bytes(r["bytes"].as_u64().unwrap_or(0)),
            units::duration(Duration::from_secs_f64(
                r["ms"].as_f64().unwrap_or(0.0).max(0.0) / 1000.0
            )),
            units::per_sec(r["dirty_rate"].as_f64().unwrap_or(0.0)),
            match r["throttle"].as_u64() {
                Some(t) if t > 0 => format!(", guest throttled {t}%"),
                _ => String::new(),
            }
        );
    } else if let Some(t) = p.get("throttle") {
        eprintln!("vmigrate: the guest dirties memory faster than the link carries it: throttling its vCPU to {t}%");
    } else if let Some(r) = p.get("in_doubt") {
        eprintln!(
            "vmigrate: lost the receiver after the hand-over started ({}); asking it how it ended",
            r.as_str().unwrap_or("")
        );
    } else if let Some(r) = p.get("stop_and_copy") {
        eprintln!("vmigrate: stop and copy ({})", r.as_str().unwrap_or(""));
    }
}
