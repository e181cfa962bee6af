//! Command-line definitions (also rendered into `man/`).

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Talk to a running VM's control socket.
///
/// Sends one request to the control socket that `vmigrate run --control
/// SOCK` and `dekimberlize --run --control SOCK` serve (without --control
/// they print where it is), prints the JSON answer as one line on stdout,
/// and exits 0, or for exec with the script's status. The protocol is in
/// docs/VMM.md ("Control protocol"); only the socket's owner (and root) may
/// use it.
#[derive(Debug, Parser)]
#[command(name = "vmctl", version, long_version = kimberley_cli::version::long(&[]), about, long_about)]
#[command(subcommand_negates_reqs = true)]
pub struct Cli {
    /// The control socket.
    #[arg(value_name = "SOCK", required_unless_present = "completions")]
    pub socket: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Print a shell completion script (bash, zsh, fish, ...) on stdout.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    pub completions: Option<clap_complete::Shell>,
}

/// Example blocks of every command, shown verbatim by `--help` and in the
/// man pages.
pub const EXAMPLES: kimberley_cli::help::Examples = &[
    (
        "vmctl",
        "vmctl app.sock status
vmctl app.sock exec examples/check.txt   # a script in the guest's language
echo 'checksum app' | vmctl app.sock exec -
vmctl app.sock snapshot app-snap    # a new VM directory; the VM runs on
vmctl app.sock pause
vmctl app.sock resume
vmctl app.sock stop                 # suspends it into its VM directory
source <(vmctl --completions bash)  # in ~/.bashrc",
    ),
    ("vmctl status", "vmctl app.sock status"),
    ("vmctl pause", "vmctl app.sock pause"),
    ("vmctl resume", "vmctl app.sock resume"),
    ("vmctl snapshot", "vmctl app.sock snapshot app-snap"),
    ("vmctl stop", "vmctl app.sock stop"),
    (
        "vmctl exec",
        "vmctl app.sock exec examples/check.txt
echo 'checksum app' | vmctl app.sock exec - --timeout 30",
    ),
];

/// The command with examples and exit codes in its long help.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    kimberley_cli::help::decorate(Cli::command(), kimberley_cli::exit::Tool::Vmctl, EXAMPLES)
}

/// Parses the process's arguments (exits with usage or help text).
pub fn parse() -> Cli {
    let cli: Cli = kimberley_cli::help::parse(command());
    if cli.completions.is_none() && cli.command.is_none() {
        command()
            .error(
                clap::error::ErrorKind::MissingSubcommand,
                "a command is required: status, pause, resume, snapshot DIR, stop or exec SCRIPT",
            )
            .exit();
    }
    cli
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show whether the VM runs, is paused or crashed, and its size.
    Status,
    /// Pause the guest's vCPUs.
    Pause,
    /// Resume a paused guest.
    Resume,
    /// Write a snapshot of the VM into a new VM directory.
    ///
    /// DIR must not exist; a relative DIR is taken from vmctl's working
    /// directory. The VM is paused while its state is written, then runs on.
    Snapshot {
        /// The VM directory to create.
        #[arg(value_name = "DIR")]
        dir: PathBuf,
    },
    /// Suspend the VM into its VM directory; its process then exits.
    Stop,
    /// Run a script in the guest and exit with its status.
    ///
    /// The script is in the guest's language: the test guest's commands
    /// for the microVM, a /bin/sh script (run by qemu-guest-agent) for
    /// Linux guests. The answer carries its output and status.
    Exec {
        /// The script file ("-": stdin).
        #[arg(value_name = "SCRIPT")]
        script: PathBuf,
        /// Give up after this many seconds (default: the server's, 600).
        #[arg(long, value_name = "SECS")]
        timeout: Option<u64>,
    },
}
