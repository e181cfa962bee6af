//! Command-line definitions (also rendered into `man/`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Live-migrate a running VM between hosts (pre-copy).
///
/// A VM runs under `vmigrate run` (or arrives through `vmigrate recv`) and
/// is controlled through its control socket. `vmigrate send` asks that
/// process to migrate it: memory (and disks) are copied in rounds while the
/// guest runs, the pages it dirties are sent again until the rest fits the
/// downtime target, then the guest is paused, the last pages and its vCPU
/// and device state are sent, and it resumes on the receiver. Everything
/// on the wire is encrypted and authenticated with a key both hosts hold.
/// Until the receiver confirms that the guest runs there, a failure (lost
/// connection, dead receiver, wrong key, Ctrl-C) leaves the guest running
/// on the source, unharmed; the receiver discards what it received.
#[derive(Debug, Parser)]
#[command(name = "vmigrate", version, long_version = kimberley_cli::version::long(&[("migration protocol", crate::protocol::VERSION.to_string())]), about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a suspended VM directory, controllable and migratable.
    ///
    /// Resumes VMDIR with its backend, the KVM microVM or QEMU for a Linux
    /// guest (its console goes to stdout), and
    /// serves the control socket (status, pause, resume, exec, snapshot,
    /// stop, migrate). Stopped through the socket or by SIGINT/SIGTERM, it
    /// suspends back into VMDIR. Migrated away, it exits 0 and leaves VMDIR
    /// as it was (stale: its disks were used in place; delete it).
    Run(RunArgs),
    /// Receive one migrating VM and keep running it here.
    ///
    /// Listens on ADDR for a sender holding the same key (connections that
    /// fail the handshake are refused and logged; it keeps waiting), writes
    /// the received memory (sparse), disks and state into a new VM
    /// directory OUT, resumes the guest, and once the source has confirmed
    /// the hand-over serves the control socket like `vmigrate run`. If the
    /// migration fails, OUT is not created and it exits non-zero.
    Recv(RecvArgs),
    /// Migrate the VM behind a control socket to a receiver.
    ///
    /// Exits 0 once the receiver confirmed that the guest runs there (the
    /// source process then exits too). Prints a progress bar per round on a
    /// terminal, a line per round otherwise. Ctrl-C cancels: the guest keeps
    /// running on the source.
    Send(SendArgs),
    /// Print a shell completion script (bash, zsh, fish, ...) on stdout.
    Completions(kimberley_cli::help::CompletionsArgs),
}

/// Example blocks of every command, shown verbatim by `--help` and in the
/// man pages.
pub const EXAMPLES: kimberley_cli::help::Examples = &[
    (
        "vmigrate",
        "# two terminals (or two hosts)
kimberlize keygen -o mig.key          # copy it to both hosts
vmigrate run vm --control vm.sock
vmigrate recv --listen 0.0.0.0:7070 --key-file mig.key -o vm-here \\
    --control here.sock
vmigrate send --control vm.sock --to desthost:7070 --key-file mig.key \\
    --stats-json mig.json",
    ),
    ("vmigrate run", "vmigrate run app-vm --control app.sock"),
    (
        "vmigrate recv",
        "vmigrate recv --listen 0.0.0.0:7070 -k mig.key -o vm-here \\
    --control here.sock
vmigrate recv --listen 0.0.0.0:7070 -k mig.key -o vm-here \\
    --shared-disk-dir /srv/shared",
    ),
    (
        "vmigrate send",
        "vmigrate send --control vm.sock --to desthost:7070 -k mig.key
vmigrate send --control vm.sock --to desthost:7070 -k mig.key \\
    --max-bandwidth 100mbit --downtime-ms 100 --stats-json mig.json
vmigrate send --control vm.sock --to desthost:7070 -k mig.key --shared-disk",
    ),
    (
        "vmigrate completions",
        "source <(vmigrate completions bash)            # in ~/.bashrc
vmigrate completions zsh > ~/.zfunc/_vmigrate
vmigrate completions fish > ~/.config/fish/completions/vmigrate.fish",
    ),
];

/// The command line with its examples and exit codes in the long help.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    kimberley_cli::help::decorate(
        Cli::command(),
        kimberley_cli::exit::Tool::Vmigrate,
        EXAMPLES,
    )
}

/// Parses the process's arguments (exits with usage or help text).
pub fn parse() -> Cli {
    kimberley_cli::help::parse(command())
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The suspended VM directory to run.
    #[arg(value_name = "VMDIR")]
    pub vmdir: PathBuf,
    /// Control socket (one JSON request per line; docs/VMM.md). Created
    /// 0600, usable only by this uid and root; a live socket there is
    /// refused, a stale one replaced. Default:
    /// $XDG_RUNTIME_DIR/kimberley/vmigrate-PID.sock (/run/kimberley/ for
    /// root), printed on stderr.
    #[arg(long, value_name = "SOCK")]
    pub control: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct RecvArgs {
    /// Address to listen on (host:port).
    #[arg(long, value_name = "ADDR")]
    pub listen: String,
    /// Key file the sender holds too (`kimberlize keygen -o FILE`; the text
    /// form or 32 raw bytes; "-" for stdin).
    #[arg(long, short = 'k', value_name = "FILE")]
    pub key_file: PathBuf,
    /// The VM directory to create (must not exist).
    #[arg(short, long, value_name = "VMDIR")]
    pub output: PathBuf,
    /// Control socket of the received VM, bound (and checked) before
    /// waiting: like `vmigrate run --control`. Default:
    /// $XDG_RUNTIME_DIR/kimberley/vmigrate-PID.sock (/run/kimberley/ for
    /// root), printed on stderr.
    #[arg(long, value_name = "SOCK")]
    pub control: Option<PathBuf>,
    /// Write receiver statistics as JSON here.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// Accept a sender's `--shared-disk` only for disk files beneath DIR
    /// (storage both hosts see, at the same path). Without it, a sender
    /// with shared disks is refused. The file must be a regular file of
    /// the size the sender names, reached without symlinks, on the same
    /// file system as OUT (it is hard-linked into OUT). The same holds
    /// for a QEMU guest's kernel and initrd, which come shared with its
    /// disks.
    #[arg(long, value_name = "DIR")]
    pub shared_disk_dir: Option<PathBuf>,
    /// No messages on stderr besides errors.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct SendArgs {
    /// Control socket of the process running the VM.
    #[arg(long, value_name = "SOCK")]
    pub control: PathBuf,
    /// Receiver address (host:port).
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    /// Key file the receiver holds too (the text form or 32 raw bytes). The
    /// VM's process reads it by its path, so it must be a file.
    #[arg(long, short = 'k', value_name = "FILE")]
    pub key_file: PathBuf,
    /// Downtime target in milliseconds: pre-copy stops when the remaining
    /// dirty data can be sent in this time at the last round's bandwidth.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub downtime_ms: u64,
    /// Cap on bandwidth, bytes per second with an optional K, M, G suffix
    /// (binary multiples; e.g. 12M), or with a `bit` suffix bits per second
    /// (e.g. 100mbit).
    #[arg(long, value_name = "RATE", value_parser = parse_rate)]
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds after round 0 before stopping the guest anyway.
    #[arg(long, value_name = "N", default_value_t = 30)]
    pub max_rounds: u32,
    /// Give up (and keep the guest on the source) after S seconds.
    #[arg(long, value_name = "S", default_value_t = 600)]
    pub timeout: u64,
    /// Write statistics (total_ms, downtime_ms and its parts,
    /// bytes_on_wire, rounds, throttled, per_round) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// The disks are on storage both hosts share (same path): do not copy
    /// them. The receiver links them into its VM directory; it must be run
    /// with `--shared-disk-dir` naming a directory that holds them. For a
    /// QEMU guest the kernel and initrd are shared too (not sent): they
    /// must be beneath that directory as well, and pages of its memory
    /// that are copies of the disks' blocks (its page cache) travel as
    /// references to those blocks, read by the receiver from its view of
    /// the disks. Without it the disks are
    /// copied while the guest runs (pre-copy): in vmigrate's rounds for a
    /// microVM, in QEMU's own stream (its block migration) for a QEMU
    /// guest.
    #[arg(long)]
    pub shared_disk: bool,
    /// No progress on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Parses a bandwidth: `12M` (bytes/s, binary suffixes) or `100mbit`,
/// `1gbit`, `500kbit` (bits/s, decimal).
pub fn parse_rate(s: &str) -> Result<u64, String> {
    let l = s.trim().to_ascii_lowercase();
    if let Some(n) = l.strip_suffix("bit") {
        let (num, mult) = match n.chars().last() {
            Some('k') => (&n[..n.len() - 1], 1e3),
            Some('m') => (&n[..n.len() - 1], 1e6),
            Some('g') => (&n[..n.len() - 1], 1e9),
            _ => (n, 1.0),
        };
        let v: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a rate (e.g. 100mbit, 12M)"))?;
        let b = (v * mult / 8.0) as u64;
        return if b == 0 {
            Err(format!("{s:?} is too small"))
        } else {
            Ok(b)
        };
    }
    match kimberley_cli::run::parse_size(s)? {
        0 => Err(format!("{s:?} is too small")),
        b => Ok(b),
    }
}
