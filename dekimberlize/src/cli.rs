//! Command-line definitions (also rendered into `man/`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kimberley_cli::progress::ProgressMode;
use kimberley_cli::{KeyArgs, ReadArgs};

/// Apply VM overlays: synthesise a launch VM from a base VM.
///
/// Reads an overlay (a file, or stdin: a pipe or `ssh`), authenticates its
/// header, refuses it unless it was made from this base, then decrypts,
/// decompresses and checks segments on --threads workers while the rest is
/// still arriving, and builds the launch VM in one pass over the base.
/// Every component is checked against the digest the overlay promised, then
/// fsynced and renamed into place: a failed run leaves nothing behind.
///
/// Given a key or passphrase, it refuses (exit 4) any overlay of the chain
/// that is not encrypted, since an unencrypted overlay authenticates nothing,
/// unless --allow-unencrypted; and it refuses a passphrase overlay whose
/// header asks Argon2id for more than --max-kdf-memory or --max-kdf-passes.
#[derive(Debug, Parser)]
#[command(name = "dekimberlize", version, long_version = kimberley_cli::version::long(&[]), about, long_about)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub apply: ApplyArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Authenticate and parse a whole overlay (or chain) without writing anything.
    ///
    /// With --base and repeated -i, checks a layered chain: the first
    /// overlay must apply to the base and each next one on top of the one
    /// before it (exit 5 otherwise), then authenticates every segment of
    /// each (exit 4 for tampered data). Says "every segment authenticated" for an encrypted overlay, and
    /// "checksums OK (not authenticated)" for an unencrypted one (read without
    /// a key, or with --allow-unencrypted).
    Verify(VerifyArgs),
    /// Print a shell completion script (bash, zsh, fish, ...) on stdout.
    Completions(kimberley_cli::help::CompletionsArgs),
}

/// Example blocks of every command, shown verbatim by `--help` and in the
/// man pages.
pub const EXAMPLES: kimberley_cli::help::Examples = &[
    (
        "dekimberlize",
        "dekimberlize --base base -i app.ovl -k overlay.key -o app-vm
ssh laptop kimberlize diff --base base --launch app -k key \\
    | dekimberlize --base base -k key -o app-vm
dekimberlize --base base -i os-layer.ovl -i app-layer.ovl -k key -o app-vm
dekimberlize --base base -i app.ovl -k overlay.key -o app-vm \\
    --run --control app.sock
dekimberlize --base base --from registry.example.org/apps/office:v1 \\
    -k overlay.key -o office-vm --run
dekimberlize verify -i app.ovl -k overlay.key",
    ),
    (
        "dekimberlize verify",
        "dekimberlize verify -i app.ovl -k overlay.key
dekimberlize verify -i app.ovl -k overlay.key --base base
dekimberlize verify --base base -i os-layer.ovl -i app-layer.ovl -k key
ssh laptop cat app.ovl | dekimberlize verify -k overlay.key",
    ),
    (
        "dekimberlize completions",
        "source <(dekimberlize completions bash)            # in ~/.bashrc
dekimberlize completions zsh > ~/.zfunc/_dekimberlize
dekimberlize completions fish \\
    > ~/.config/fish/completions/dekimberlize.fish",
    ),
];

/// The command line with its examples and exit codes in the long help.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    kimberley_cli::help::decorate(
        Cli::command(),
        kimberley_cli::exit::Tool::Dekimberlize,
        EXAMPLES,
    )
}

/// Parses the process's arguments (exits with usage or help text).
pub fn parse() -> Cli {
    kimberley_cli::help::parse(command())
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    /// The base VM directory the overlay was made from. With --from it may
    /// be left out: the base is then the one in the cache (`kimberlize
    /// cache add-base`) that the chain's first overlay names, checked
    /// against every digest before it is used.
    #[arg(long, value_name = "VMDIR", required_unless_present = "from")]
    pub base: Option<PathBuf>,
    /// Overlay to apply ("-" for stdin, the default). Repeat for a layered
    /// chain, in order from the base up.
    #[arg(short, long, value_name = "FILE", conflicts_with = "from")]
    pub input: Vec<PathBuf>,
    /// Apply the chain REF names (HOST[:PORT]/REPO[:TAG] or
    /// ...@sha256:HEX) from the cloudlet cache (--cache). A chain the cache
    /// has (a cached tag, as `kimberlize fetch` left it) needs no network.
    /// Otherwise the manifest comes from the registry, and layers the cache
    /// lacks stream from it while they are applied, teed into the cache
    /// (resuming a partial download); each is checked against its digest
    /// when it ends, and one that does not match fails the run (exit 11)
    /// with no output left and nothing kept in the cache.
    #[arg(long, value_name = "REF")]
    pub from: Option<String>,
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
    #[command(flatten)]
    pub registry: kimberley_cli::oci::RegistryArgs,
    /// The launch VM directory to create (must not exist).
    #[arg(short, long, value_name = "VMDIR", required = true)]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Worker threads (default: all cores).
    #[arg(long, short = 'j', value_name = "N")]
    pub threads: Option<usize>,
    /// Write statistics (bytes, chunks by kind, stage times) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// After synthesis, resume the launch VM with the backend it was made
    /// for (the KVM microVM, or QEMU for Linux guests): its console goes to
    /// stdout; it runs until stopped through the control socket or by
    /// SIGINT/SIGTERM, then suspends cleanly back into the VMDIR.
    #[arg(long)]
    pub run: bool,
    /// With --run, start the launch VM before the overlay has arrived: as
    /// soon as its coverage map and working set are in (an overlay made
    /// with `kimberlize diff --overlay-version 2 --working-set FILE`), the
    /// guest runs while the rest is applied. A page it touches that has not
    /// arrived waits for its segment; a disk waits until it is whole. If the
    /// overlay is cut, forged or does not match the base, the VM is killed,
    /// nothing is kept and the exit code is the one a full apply gives. A
    /// version-1 overlay, a chain of several, or a backend that cannot serve
    /// memory still arriving (QEMU) is applied in full first, with a note.
    #[arg(long, requires = "run")]
    pub early_start: bool,
    /// With --run, forward a host TCP port to a guest port:
    /// `[ADDR:]HOSTPORT:GUESTPORT` (ADDR defaults to 127.0.0.1; repeat for
    /// more). Linux guests (QEMU backend) only, from IPv4 addresses (QEMU's
    /// user networking forwards from no other).
    #[arg(long, value_name = "[ADDR:]HOSTPORT:GUESTPORT", requires = "run")]
    pub forward: Vec<kimberley_machine::PortForward>,
    /// With --run, let the guest reach the network through QEMU's user
    /// networking (Linux guests whose base has a network card). Without it
    /// the guest's network reaches only the forwarded ports.
    #[arg(long, value_enum, requires = "run")]
    pub net: Option<NetArg>,
    /// Control socket for --run (one JSON request per line: status, pause,
    /// resume, snapshot, stop, exec; docs/VMM.md), bound before the
    /// overlay is read. Created 0600, usable only by this uid and root; a
    /// live socket there is refused, a stale one replaced. Default:
    /// $XDG_RUNTIME_DIR/kimberley/dekimberlize-PID.sock (/run/kimberley/
    /// for root), printed on stderr.
    #[arg(long, value_name = "SOCK", requires = "run")]
    pub control: Option<PathBuf>,
    /// Do not fsync the result: it is still complete, checked and renamed
    /// into place atomically, but a crash may lose it. For transient launch
    /// VMs (a cloudlet's soft state).
    #[arg(long)]
    pub no_sync: bool,
    /// No progress bar or summary on stderr.
    #[arg(short, long)]
    pub quiet: bool,
    /// How to report progress on stderr: auto (a bar on a terminal,
    /// nothing off one), bar, plain (log lines with time, stage and
    /// throughput, for cron and CI), none. A one-line summary ends every
    /// run unless -q.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
}

#[derive(Debug, Args)]
pub struct VerifyArgs {
    /// Overlay to check ("-" for stdin, the default). With --base, repeat
    /// for a layered chain, in order from the base up.
    #[arg(short, long, value_name = "FILE")]
    pub input: Vec<PathBuf>,
    /// Also check that the overlay (or the chain given with repeated -i)
    /// applies to this base VM: the base identity and every parent link,
    /// before any segment is read. Nothing is written.
    #[arg(long, value_name = "VMDIR")]
    pub base: Option<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Worker threads (default: all cores).
    #[arg(long, short = 'j', value_name = "N")]
    pub threads: Option<usize>,
    /// No summary on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// `--net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetArg {
    /// QEMU user networking (NAT, no privileges).
    User,
}
