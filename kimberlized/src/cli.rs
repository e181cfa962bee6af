//! `kimberlized`'s command line.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// The cloudlet daemon: binds devices over mutual TLS, synthesises their
/// overlays against the base VMs it holds, runs the launch VMs.
///
/// Serves the HTTPS+JSON API of docs/CLOUDLET.md on --listen. Every client
/// must present a certificate from --client-ca; the handshake fails
/// otherwise and no request is read. A device uploads its overlay with the
/// key in a request header (inside the TLS session only); the daemon picks
/// the base the overlay was made from, checks the limits before anything
/// is written, applies it into --state-dir while it arrives, resumes the
/// launch VM and streams the progress back as JSON lines. Control requests
/// (status, pause, resume, exec, stop) go to the VM's agent. Unless
/// --no-mdns, it advertises itself with DNS-SD (_kimberley._tcp, TXT: API
/// version and base identities); trust never comes from that
/// advertisement.
///
/// Logs are JSON lines on stderr. SIGINT/SIGTERM suspend every running
/// session's VM into the state directory, where the next start lists them
/// as suspended.
#[derive(Debug, Parser)]
#[command(name = "kimberlized", version, long_version = kimberley_cli::version::long(&[("cloudlet API", crate::API_VERSION.to_string())]), about, long_about)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub daemon: DaemonArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a shell completion script (bash, zsh, fish, ...) on stdout.
    Completions(kimberley_cli::help::CompletionsArgs),
}

/// The daemon's options (the command without a subcommand).
#[derive(Debug, Args)]
pub struct DaemonArgs {
    /// Address and port to listen on (port 0: any; the `listening` log
    /// line says which).
    #[arg(long, value_name = "ADDR:PORT", default_value = "[::]:7466")]
    pub listen: SocketAddr,
    /// State directory (made 0700): session directories with their launch
    /// VMs and control sockets.
    #[arg(long, value_name = "DIR", default_value = "/var/lib/kimberley")]
    pub state_dir: PathBuf,
    /// A base VM directory the daemon holds (repeat for more); its
    /// identity is computed at start.
    #[arg(long, value_name = "VMDIR", required = true)]
    pub base: Vec<PathBuf>,
    /// PEM: the daemon's certificate (then intermediates); clients check
    /// it against their CA and the name they dial.
    #[arg(long, value_name = "PEM", required = true)]
    pub cert: Option<PathBuf>,
    /// PEM: the daemon's private key.
    #[arg(long, value_name = "PEM", required = true)]
    pub key: Option<PathBuf>,
    /// PEM: the CA whose certificates identify devices (only they, and
    /// pinned ones, are served).
    #[arg(long, value_name = "PEM", required_unless_present = "client_pin")]
    pub client_ca: Option<PathBuf>,
    /// Serve the device whose certificate has this SHA-256 fingerprint (64
    /// hex digits, ':' allowed; `openssl x509 -noout -fingerprint
    /// -sha256`), whoever issued it (repeat for more). With --client-ca,
    /// either suffices; without it, only pinned devices are served.
    #[arg(long, value_name = "SHA256", value_parser = crate::tls::parse_pin)]
    pub client_pin: Vec<crate::tls::Pin>,
    /// Sessions with a running or starting VM at once.
    #[arg(long, value_name = "N", default_value_t = 4)]
    pub max_sessions: usize,
    /// Guest memory of those VMs together (e.g. 8G).
    #[arg(long, value_name = "SIZE", value_parser = kimberley_cli::run::parse_size, default_value = "4G")]
    pub max_memory: u64,
    /// Launch VM sizes of every session in the state directory together,
    /// suspended ones included (e.g. 100G).
    #[arg(long, value_name = "SIZE", value_parser = kimberley_cli::run::parse_size, default_value = "64G")]
    pub max_disk: u64,
    /// The DNS-SD instance name (default: the host name).
    #[arg(long, value_name = "NAME")]
    pub name: Option<String>,
    /// The host name DNS-SD advertises (default: NAME.local.); the
    /// daemon's certificate should carry it.
    #[arg(long, value_name = "HOST")]
    pub mdns_host: Option<String>,
    /// Do not advertise with DNS-SD.
    #[arg(long)]
    pub no_mdns: bool,
    /// A registry (`HOST[:PORT]`) whose references devices may ask for
    /// (repeat for more); chains come from the cloudlet cache (--cache),
    /// what it lacks from the registry. Without it, references are
    /// refused: only uploads are served.
    #[arg(long, value_name = "HOST[:PORT]")]
    pub allow_registry: Vec<String>,
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
    #[command(flatten)]
    pub registry: kimberley_cli::oci::RegistryArgs,
    /// The host address a session's forwarded guest ports listen on
    /// (default: the --listen address; 0.0.0.0 when that is [::]). QEMU
    /// forwards from IPv4 addresses only: a daemon listening on another
    /// IPv6 address refuses ports without this option.
    #[arg(long, value_name = "IPV4")]
    pub forward_address: Option<std::net::Ipv4Addr>,
    /// Worker threads for synthesis (default: all cores).
    #[arg(long, short = 'j', value_name = "N")]
    pub threads: Option<usize>,
}

impl DaemonArgs {
    /// Where forwarded ports listen: --forward-address, else the --listen
    /// address if it is IPv4, 0.0.0.0 for an unspecified IPv6 one, none
    /// for another IPv6 one (QEMU forwards from IPv4 only).
    pub fn forward_addr(&self) -> Option<std::net::IpAddr> {
        use std::net::{IpAddr, Ipv4Addr};
        match (self.forward_address, self.listen.ip()) {
            (Some(a), _) => Some(IpAddr::V4(a)),
            (None, IpAddr::V4(a)) => Some(IpAddr::V4(a)),
            (None, IpAddr::V6(a)) if a.is_unspecified() => Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)),
            (None, IpAddr::V6(a)) => a.to_ipv4_mapped().map(IpAddr::V4),
        }
    }
}

/// Example blocks of every command, shown verbatim by `--help` and in the
/// man pages.
pub const EXAMPLES: kimberley_cli::help::Examples = &[
    (
        "kimberlized",
        "kimberlized --listen [::]:7466 --state-dir /var/lib/kimberley \\
    --base /srv/kimberley/bases/debian12 \\
    --base /srv/kimberley/bases/microvm \\
    --cert /etc/kimberley/cloudlet.pem --key /etc/kimberley/cloudlet.key \\
    --client-ca /etc/kimberley/devices-ca.pem \\
    --max-sessions 8 --max-memory 16G --max-disk 200G

# Serve chains from the cloudlet cache too (kimberlize offload --from REF):
kimberlized --base /srv/kimberley/bases/debian12 \\
    --cert cloudlet.pem --key cloudlet.key --client-ca devices-ca.pem \\
    --cache /var/cache/kimberley --allow-registry registry.example.org

# Serve one device by its certificate's fingerprint instead of a CA:
fp=$(openssl x509 -in device.pem -noout -fingerprint -sha256 | cut -d= -f2)
kimberlized --base base --cert cloudlet.pem --key cloudlet.key \\
    --client-pin \"$fp\"

# A trial on one machine: any port, no DNS-SD, a scratch state directory:
kimberlized --listen 127.0.0.1:0 --no-mdns --state-dir /tmp/kd-state \\
    --base base --cert cloudlet.pem --key cloudlet.key --client-ca ca.pem

# From a device: what the cloudlet holds, then its sessions:
curl --cert device.pem --key device.key --cacert operator-ca.pem \\
    https://cloudlet1.example.org:7466/v1/info
curl --cert device.pem --key device.key --cacert operator-ca.pem \\
    https://cloudlet1.example.org:7466/v1/sessions

# Stop: every running session's VM is suspended into --state-dir:
systemctl stop kimberlized        # or: kill -TERM PID",
    ),
    (
        "kimberlized completions",
        "source <(kimberlized completions bash)             # in ~/.bashrc
kimberlized completions zsh > ~/.zfunc/_kimberlized
kimberlized completions fish \\
    > ~/.config/fish/completions/kimberlized.fish",
    ),
];

/// The command line with its examples and exit codes in the long help.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    kimberley_cli::help::decorate(
        Cli::command(),
        kimberley_cli::exit::Tool::Kimberlized,
        EXAMPLES,
    )
}

/// Parses the process's arguments.
pub fn parse() -> Cli {
    kimberley_cli::help::parse(command())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn forward_addr(extra: &[&str]) -> Option<String> {
        let mut argv = vec![
            "kimberlized",
            "--base",
            "b",
            "--cert",
            "c",
            "--key",
            "k",
            "--client-ca",
            "ca",
        ];
        argv.extend(extra);
        Cli::try_parse_from(argv)
            .unwrap()
            .daemon
            .forward_addr()
            .map(|a| a.to_string())
    }

    #[test]
    fn forwarded_ports_listen_on_an_ipv4_address() {
        assert_eq!(forward_addr(&[]).as_deref(), Some("0.0.0.0"));
        assert_eq!(
            forward_addr(&["--listen", "192.0.2.7:7466"]).as_deref(),
            Some("192.0.2.7")
        );
        assert_eq!(
            forward_addr(&["--listen", "[::ffff:192.0.2.7]:7466"]).as_deref(),
            Some("192.0.2.7")
        );
        assert_eq!(forward_addr(&["--listen", "[::1]:7466"]), None);
        assert_eq!(
            forward_addr(&["--listen", "[::1]:7466", "--forward-address", "10.1.2.3"]).as_deref(),
            Some("10.1.2.3")
        );
        assert!(Cli::try_parse_from([
            "kimberlized",
            "--base",
            "b",
            "--cert",
            "c",
            "--key",
            "k",
            "--client-ca",
            "ca",
            "--forward-address",
            "::1"
        ])
        .is_err());
    }
}
