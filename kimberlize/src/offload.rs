//! `kimberlize offload`: find a cloudlet (an address, or DNS-SD), bind to
//! it over mutual TLS, upload an overlay with its key, wait until the
//! launch VM answers, say how to reach it and how long each step took.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use kimberley_cli::run::{usage, with_code};
use kimberley_cli::schema::{versioned, JsonOutput};
use kimberley_cli::{exit, KeyArgs};
use kimberley_formats::apply::{Input, Opened};
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::digest::from_hex;
use kimberlized::api::{self, Forward, Progress, Reason};
use kimberlized::client::{Client, ClientError};
use kimberlized::discovery::{self, Found};
use kimberlized::tls;
use serde_json::json;

#[derive(Debug, Args)]
pub struct OffloadArgs {
    /// The overlay to run on the cloudlet.
    #[arg(value_name = "OVERLAY", required_unless_present = "from")]
    pub overlay: Option<PathBuf>,
    /// Instead of uploading an overlay, have the cloudlet apply the chain
    /// REF names (HOST[:PORT]/REPO[:TAG] or ...@sha256:HEX) from its
    /// cloudlet cache, fetching what it lacks from the registry (one the
    /// cloudlet allows). Discovery then picks the first cloudlet seen:
    /// the cloudlet checks the base.
    #[arg(long, value_name = "REF", conflicts_with = "overlay")]
    pub from: Option<String>,
    /// The cloudlet's address. Without it, cloudlets are discovered with
    /// DNS-SD (_kimberley._tcp) for up to --discover-timeout, and the
    /// first that holds the overlay's base is used (its TLS certificate is
    /// still checked: the advertisement is only a hint).
    #[arg(long, value_name = "HOST:PORT")]
    pub cloudlet: Option<String>,
    /// The name the cloudlet's certificate must carry (default: HOST of
    /// --cloudlet, or the discovered host name).
    #[arg(long, value_name = "NAME")]
    pub server_name: Option<String>,
    /// PEM: this device's certificate (it identifies the device; the
    /// cloudlet must trust its CA).
    #[arg(long, value_name = "PEM")]
    pub cert: PathBuf,
    /// PEM: this device's private key.
    #[arg(long, value_name = "PEM")]
    pub key: PathBuf,
    /// PEM: the CA the cloudlet's certificate must chain to (naming the
    /// address dialled, or --server-name); any other cloudlet is refused
    /// during the handshake, before the key is sent.
    #[arg(long, value_name = "PEM", required_unless_present = "pin")]
    pub ca: Option<PathBuf>,
    /// Trust the cloudlet whose certificate has this SHA-256 fingerprint
    /// (64 hex digits, ':' allowed; `openssl x509 -noout -fingerprint
    /// -sha256`), whoever issued it and whatever names it carries (repeat
    /// for more). With --ca, either suffices; without it, only pinned
    /// cloudlets are trusted.
    #[arg(long, value_name = "SHA256", value_parser = tls::parse_pin)]
    pub pin: Vec<tls::Pin>,
    #[command(flatten)]
    pub keys: KeyArgs,
    /// A TCP port of the guest to reach from here (repeat for more, at
    /// most 16): the cloudlet forwards a port of its own to it and this
    /// command prints that address once the guest answers. Linux guests
    /// under QEMU with a network card only; a microVM's session is refused.
    #[arg(long = "port", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub ports: Vec<u16>,
    /// How long to browse for cloudlets without --cloudlet.
    #[arg(long, value_name = "SECONDS", default_value_t = 3.0)]
    pub discover_timeout: f64,
    /// Print the result as one JSON object on stdout (schema in
    /// docs/JSON.md) instead of lines for people.
    #[arg(long)]
    pub json: bool,
    /// No progress lines on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

fn ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}

/// The exit code a refusal maps to.
fn code_of(e: &ClientError) -> u8 {
    match e {
        ClientError::Refused { body, .. } => match body.reason {
            Reason::Auth => exit::AUTH,
            Reason::Corrupt => exit::CORRUPT,
            Reason::NoBase => exit::WRONG_BASE,
            Reason::Vm => exit::VM,
            _ => exit::ERROR,
        },
        _ => exit::ERROR,
    }
}

fn client_error(e: ClientError) -> anyhow::Error {
    with_code(code_of(&e), e.to_string())
}

/// Where the cloudlet is: addresses, the name its certificate must carry,
/// a label for messages.
fn resolve(
    a: &OffloadArgs,
    opened: Option<&Opened>,
    t0: Instant,
) -> Result<(Vec<SocketAddr>, String, String)> {
    if let Some(c) = &a.cloudlet {
        let addrs: Vec<SocketAddr> = c
            .to_socket_addrs()
            .map_err(|e| usage(format!("--cloudlet {c:?}: {e} (give HOST:PORT)")))?
            .collect();
        let host = c.rsplit_once(':').map_or(c.as_str(), |(h, _)| h);
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        return Ok((addrs, a.server_name.clone().unwrap_or(host), c.clone()));
    }
    if !(a.discover_timeout > 0.0 && a.discover_timeout <= 600.0) {
        return Err(usage(
            "--discover-timeout must be between 0 and 600 seconds",
        ));
    }
    let holds = |f: &Found| {
        f.api == kimberlized::API_VERSION
            && opened.is_none_or(|o| {
                f.bases
                    .iter()
                    .filter_map(|b| from_hex(b))
                    .any(|id| o.applies_to(&id))
            })
    };
    let seen = discovery::browse(Duration::from_secs_f64(a.discover_timeout), holds)?;
    let Some(f) = seen.iter().find(|f| holds(f)) else {
        return Err(with_code(
            exit::WRONG_BASE,
            format!(
                "no cloudlet holding the overlay's base answered within {} s ({} cloudlet(s) seen{})",
                a.discover_timeout,
                seen.len(),
                if seen.is_empty() { "" } else { ", none with that base" }
            ),
        ));
    };
    if !a.quiet {
        eprintln!(
            "discovered cloudlet {} ({}:{}) in {} ms",
            f.name,
            f.host,
            f.port,
            ms(t0)
        );
    }
    let addrs = f.addresses.clone();
    let name = a.server_name.clone().unwrap_or_else(|| f.host.clone());
    Ok((addrs, name, format!("{} ({}:{})", f.name, f.host, f.port)))
}

/// `kimberlize offload`.
pub fn offload(a: OffloadArgs) -> Result<()> {
    let t0 = Instant::now();
    a.keys.check_stdin(false)?;
    if !a.ports.is_empty() {
        api::check_ports(&a.ports).map_err(|e| usage(format!("--port: {e}")))?;
    }
    let key = match a.keys.secret()? {
        Some(Secret::Key(k)) => k,
        Some(Secret::Passphrase(_)) => {
            return Err(usage(
                "offload sends a key, not a passphrase: give -k KEYFILE",
            ))
        }
        None => return Err(usage("offload needs the overlay's key: give -k KEYFILE")),
    };
    let cfg = tls::client_config(&tls::Identity {
        cert: a.cert.clone(),
        key: a.key.clone(),
        ca: a.ca.clone(),
        pins: a.pin.clone(),
    })?;
    let show = |ev: &Progress| {
        if !a.quiet {
            eprintln!("{}", describe(ev));
        }
    };
    let (started, client, len) = match (&a.overlay, &a.from) {
        (Some(path), _) => {
            let open =
                || std::fs::File::open(path).with_context(|| format!("opening {}", path.display()));
            let file = open()?;
            let len = file.metadata().context("the overlay's size")?.len();
            // The header authenticates with the key here first: a wrong
            // key or another file never reaches a cloudlet.
            let opened = Opened::open(
                Input {
                    name: path.display().to_string(),
                    reader: Box::new(file),
                },
                Some(&Secret::Key(key)),
                &ReadPolicy::default(),
            )?;
            let (addrs, name, label) = resolve(&a, Some(&opened), t0)?;
            drop(opened);
            let discovery_ms = ms(t0);
            let client = Client::new(cfg, addrs, tls::server_name(&name)?);
            let started = client
                .start(&key, &mut open()?, len, &a.ports, show)
                .map_err(client_error)?;
            (started, (client, label, discovery_ms), Some(len))
        }
        (None, Some(r)) => {
            let (addrs, name, label) = resolve(&a, None, t0)?;
            let discovery_ms = ms(t0);
            let client = Client::new(cfg, addrs, tls::server_name(&name)?);
            let started = client
                .start_from(&key, r, &a.ports, show)
                .map_err(client_error)?;
            (started, (client, label, discovery_ms), None)
        }
        (None, None) => return Err(usage("give an OVERLAY or --from REF")),
    };
    let (client, label, discovery_ms) = client;
    let server_ms = |f: fn(&Progress) -> Option<u64>| started.events.iter().find_map(f);
    let times = json!({
        "discovery_ms": discovery_ms,
        "bind_ms": discovery_ms + started.bind_ms,
        "transfer_ms": discovery_ms + started.upload_ms,
        // The daemon's times count from its accepting the request, just
        // after the bind.
        "synthesis_ms": server_ms(|e| match e { Progress::Synthesised { ms, .. } => Some(*ms), _ => None })
            .map(|m| discovery_ms + started.bind_ms + m),
        "first_answer_ms": discovery_ms + started.ready_ms,
    });
    let url = format!("https://{}/v1/sessions/{}", client.host(), started.session);
    let mut got: Vec<u16> = started.forwards.iter().map(|f| f.guest).collect();
    let mut want = a.ports.clone();
    got.sort_unstable();
    want.sort_unstable();
    if got != want {
        // A daemon that does not know the header (older than forwarded
        // ports) starts the VM without them: not what was asked for.
        let _ = client.delete(&started.session, false);
        return Err(anyhow::anyhow!(
            "the cloudlet forwarded guest ports {got:?}, not the {want:?} asked for (a kimberlized without forwarded ports?); session {} was discarded",
            started.session
        ));
    }
    let forwards: Vec<Forward> = started
        .forwards
        .iter()
        .map(|f| reachable(f, started.peer))
        .collect();
    if a.json {
        let out = versioned(
            JsonOutput::Offload,
            &json!({
                "cloudlet": label,
                "address": client.host(),
                "session": started.session,
                "url": url,
                "overlay_bytes": len,
                "from": a.from,
                "forwards": forwards,
                "times": times,
            }),
        )?;
        println!("{out}");
    } else {
        println!("session {} running on cloudlet {label}", started.session);
        for f in &forwards {
            println!("  guest port {}: {}", f.guest, f.host);
        }
        println!("  control: POST {url}/{{status,exec,pause,resume,stop}}; DELETE {url} ends it");
        println!(
            "  times (ms from start): discovery {}, bind {}, transfer {}, synthesis {}, first answer {}",
            times["discovery_ms"], times["bind_ms"], times["transfer_ms"], times["synthesis_ms"], times["first_answer_ms"]
        );
    }
    Ok(())
}

/// `f` as this device reaches it: an unspecified host address (the
/// cloudlet forwards on all of its IPv4 addresses) becomes the IPv4
/// address the daemon was reached at.
fn reachable(f: &Forward, peer: Option<SocketAddr>) -> Forward {
    let peer_v4 = peer.and_then(|p| match p.ip() {
        std::net::IpAddr::V4(a) => Some(a),
        std::net::IpAddr::V6(a) => a.to_ipv4_mapped(),
    });
    match peer_v4 {
        Some(ip) if f.host.ip().is_unspecified() => Forward {
            guest: f.guest,
            host: SocketAddr::new(ip.into(), f.host.port()),
        },
        _ => *f,
    }
}

/// A progress line for people.
fn describe(ev: &Progress) -> String {
    match ev {
        Progress::Accepted {
            session,
            memory,
            disk,
            ..
        } => format!(
            "accepted: session {session} ({} of memory, {} launch VM)",
            kimberley_cli::progress::bytes(*memory),
            kimberley_cli::progress::bytes(*disk)
        ),
        Progress::Received { bytes, ms } => format!(
            "received {} at {ms} ms",
            kimberley_cli::progress::bytes(*bytes)
        ),
        Progress::Synthesised { ms, .. } => format!("synthesised at {ms} ms"),
        Progress::Resumed { ms, .. } => format!("resumed at {ms} ms"),
        Progress::Ready { ms, .. } => format!("the guest answered at {ms} ms"),
        Progress::Failed { error, .. } => format!("failed: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_forward_is_reached_at_the_cloudlets_address() {
        let f = |host: &str| Forward {
            guest: 22,
            host: host.parse().unwrap(),
        };
        let at = |peer: &str| Some(peer.parse::<SocketAddr>().unwrap());
        assert_eq!(
            reachable(&f("0.0.0.0:4000"), at("192.0.2.5:7466")),
            f("192.0.2.5:4000")
        );
        assert_eq!(
            reachable(&f("0.0.0.0:4000"), at("[::ffff:192.0.2.5]:7466")),
            f("192.0.2.5:4000")
        );
        // QEMU forwards IPv4 only: an IPv6 peer address would not lead there.
        assert_eq!(
            reachable(&f("0.0.0.0:4000"), at("[2001:db8::1]:7466")),
            f("0.0.0.0:4000")
        );
        assert_eq!(
            reachable(&f("10.0.0.1:4000"), at("192.0.2.5:7466")),
            f("10.0.0.1:4000")
        );
        assert_eq!(reachable(&f("0.0.0.0:4000"), None), f("0.0.0.0:4000"));
    }
}
