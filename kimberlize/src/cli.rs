//! Command-line definitions (also rendered into `man/`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use kimberley_cli::progress::ProgressMode;
use kimberley_cli::{KeyArgs, ReadArgs};

/// Make VM overlays.
///
/// A VM overlay is the difference between a base VM and a launch VM (the
/// base after an install script and a resume script ran in it), chunked,
/// deduplicated, compressed in parallel, encrypted and bound to its base.
/// `dekimberlize` applies it to the same base to get the launch VM back.
/// The examples below use the project's KVM microVM and its test guest
/// (scripts in examples/), then images from elsewhere (a Firecracker
/// memory file, raw disks).
#[derive(Debug, Parser)]
#[command(name = "kimberlize", version, long_version = kimberley_cli::version::long(&[]), about, long_about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Write a new random key: one line, KIMBERLEY-KEY-1… (bech32m).
    ///
    /// The file is created with mode 0600 and must not exist. `-o -`
    /// prints the key on stdout, even on a terminal (to paste it into a
    /// secret store). Every tool also reads a key file of 32 raw bytes.
    Keygen {
        /// Where to write the key (must not exist; "-" for stdout).
        #[arg(short, long, value_name = "KEYFILE")]
        output: PathBuf,
    },
    /// Wrap existing images into a VM directory.
    ///
    /// Copies a raw guest memory file (e.g. a Firecracker or Cloud Hypervisor
    /// memory snapshot), disks and an optional state blob into a new
    /// VMDIR, hashing them in the same pass. Holes stay holes. Disk images
    /// are told by their magic numbers: qcow2, QED, VMDK, VHD, VHDX and VDI
    /// are converted to raw with `qemu-img convert` (sparse; refused with
    /// the command to run when qemu-img is missing or fails, and refused
    /// when they name other files: a backing file, an external data file,
    /// VMDK extents); anything else is raw.
    Import(ImportArgs),
    /// Boot a VM and suspend it once it is ready: a base VM.
    ///
    /// Without --qemu: creates an empty sparse disk, boots the project's
    /// test guest in the KVM microVM, waits until it is ready for commands
    /// and suspends it into a new VMDIR (memory, disk, vCPU and device
    /// state).
    ///
    /// With --qemu: boots a Linux kernel (and initrd) under QEMU with the
    /// guest's RAM in the VMDIR's memory.raw, waits until qemu-guest-agent
    /// in the guest answers, and suspends it (QEMU's device state goes to
    /// state.bin; RAM stays in memory.raw). The kernel, initrd and disks
    /// are copied into the VMDIR, which records the exact machine (QEMU
    /// version, machine type, accelerator). scripts/linux-base.sh makes a
    /// kernel and initramfs from Debian's packages.
    Base(BaseArgs),
    /// Customise a base VM with scripts and write the overlay.
    ///
    /// Resumes the base VM (it is never modified: memory is mapped
    /// copy-on-write and the disks are copied), runs the install script and
    /// then the resume script in the guest, suspends the result (the launch
    /// VM) and diffs it against the base, exactly like `kimberlize diff`.
    /// With --parent, resumes the launch VM of the base plus the parent
    /// overlays instead and writes a layer on top of them (like `diff
    /// --parent`). examples/layers/ has Makefiles that build layers this
    /// way (--depfile, --force).
    /// What the guest prints goes to stderr line by line, since stdout may
    /// carry the overlay.
    ///
    /// Scripts for the microVM's test guest are text, one command a line,
    /// `#` comments: print TEXT, fill NAME SIZE SEED random|text|zero,
    /// checksum NAME, disk-write OFFSET SIZE SEED, disk-checksum OFFSET
    /// SIZE, counter start|stop, counter, dirty NAME RATE, sleep MS.
    /// Scripts for Linux guests (QEMU) are /bin/sh scripts. docs/SCRIPTS.md
    /// documents both: every command, its arguments, units, output and
    /// errors.
    Build(BuildArgs),
    /// Diff a launch VM against its base and write an overlay.
    ///
    /// Reads the base once (checking it against its manifest) and indexes
    /// its chunks, then reads the launch VM and encodes each changed 4 KiB
    /// chunk as zero, a reference to base or earlier overlay content, a
    /// small delta, or literal bytes. Segments are compressed and sealed on
    /// --threads workers. Writes to stdout unless -o FILE is given; never to
    /// a terminal.
    ///
    /// Reproducible: the same base, launch VM, parents, key and options give
    /// a byte-identical overlay whatever --threads (with --key-file or
    /// --no-encrypt). With --passphrase-file the salt is random (Argon2id
    /// needs it before any key exists), so every run writes other bytes.
    Diff(DiffArgs),
    /// Show an overlay (header, chain position, segments) or a VM directory.
    ///
    /// An overlay: without a key, shows what the header says and walks the
    /// frames. With a key (or for an unencrypted overlay), authenticates
    /// and parses every segment and shows the launch VM and chunk
    /// statistics. An unencrypted overlay is only checksummed, and with a
    /// key it is refused unless --allow-unencrypted.
    ///
    /// A VM directory: its identity (the string a wrong-base error names),
    /// name, backend and machine, vCPUs, and each component's kind, file,
    /// size, allocated size and BLAKE3 digest (as its manifest records
    /// them; every file is checked to exist with its recorded size).
    ///
    ///   kimberlize inspect base
    ///   kimberlize inspect app.ovl -k overlay.key --json
    Inspect(InspectArgs),
    /// Upload an overlay chain to an OCI registry as one artifact.
    ///
    /// REF is HOST[:PORT]/REPO[:TAG] (or ...@sha256:HEX, which must be the
    /// digest of the manifest written). The overlays are given in chain
    /// order: each one's parent must be the one before it (checked from
    /// their headers, without the key; exit 5 otherwise). Each overlay is
    /// one layer, byte for byte, addressed by its sha256, with annotations
    /// read from its header (base, parent and result identities, sizes:
    /// docs/FORMAT.md section 17), so chains that share a parent share its
    /// blob. Blobs the registry has are skipped; with --mount-from they are
    /// mounted from another repository of the same registry; others are
    /// uploaded in one request, or in --chunk-size chunks (a cut chunk is
    /// resumed from where the registry says it stands, or the blob starts
    /// again if the registry refuses the session; a rerun skips the blobs
    /// that arrived). The manifest is written last. Prints REF@sha256:... of the manifest on stdout.
    Push(PushArgs),
    /// Bring overlay chains from registries into the cloudlet cache.
    ///
    /// For cron jobs and timers (docs/CLOUDLET.md). For each REF: gets the
    /// manifest (a digest REF the cache has needs no network), then every
    /// blob the cache lacks. A cut download resumes with an HTTP Range from
    /// where it stopped; every blob is checked against its digest and size
    /// before it becomes visible, and one that does not match is deleted
    /// and reported (exit 11). Two fetches of the same blob at once
    /// download it once. Exits 0 if anything new arrived (a blob, or a tag
    /// that moved), 10 if the cache already had everything. With --quota,
    /// the least recently used chains that are not pinned are then evicted
    /// until the cache fits.
    Fetch(FetchArgs),
    /// Clean the cloudlet cache: drop what no chain names, or fit a quota.
    ///
    /// Waits for the cache's other users (fetches, applies) to finish.
    /// Removes blobs and partial downloads that no cached manifest names;
    /// with --quota, first evicts the least recently used chains that are
    /// not pinned until the cache's blobs take at most SIZE. Base VMs are
    /// left alone (`kimberlize cache remove-base` removes one).
    Gc(GcArgs),
    /// Run an overlay on a cloudlet: bind to its kimberlized, upload, resume.
    ///
    /// Binds over mutual TLS (this device's --cert, the cloudlet's
    /// certificate checked against --ca before anything is sent), uploads
    /// the overlay with its key (-k, inside the TLS session only), and
    /// waits while the cloudlet synthesises the launch VM and resumes it,
    /// until the guest answers. Prints the session's address and the
    /// timings (discovery, bind, transfer, synthesis, first answer).
    /// Without --cloudlet, discovers cloudlets with DNS-SD and picks one
    /// holding the overlay's base. docs/CLOUDLET.md has the API.
    Offload(crate::offload::OffloadArgs),
    /// Base VMs in the cloudlet cache, and what the cache holds.
    ///
    /// A cloudlet keeps its base VMs in the cache by identity, so that
    /// `dekimberlize --from REF` finds the one a chain needs without --base
    /// (docs/CLOUDLET.md). Bases are never evicted by a quota.
    Cache(CacheArgs),
    /// Print a shell completion script (bash, zsh, fish, ...) on stdout.
    Completions(kimberley_cli::help::CompletionsArgs),
}

/// Example blocks of every command, shown verbatim by `--help` and in the
/// man pages.
pub const EXAMPLES: kimberley_cli::help::Examples = &[
    (
        "kimberlize",
        "# the project's KVM microVM and its test guest (a 64 MiB base)
kimberlize keygen -o overlay.key
kimberlize base -o base --memory 64M --disk 256M
kimberlize build --base base --install examples/install.txt \\
    --resume examples/resume.txt -k overlay.key -o app.ovl
dekimberlize --base base -i app.ovl -k overlay.key -o app-vm --run

# images from elsewhere (a Firecracker memory file, raw disks)
kimberlize import -o base --memory base-mem.raw --disk base-disk.raw
kimberlize import -o launch --memory mem.raw --disk disk.raw
kimberlize diff --base base --launch launch -k overlay.key -o app.ovl
kimberlize diff --base base --launch launch -k overlay.key \\
    | ssh cloudlet dekimberlize --base base -k overlay.key -o app",
    ),
    ("kimberlize keygen", "kimberlize keygen -o overlay.key"),
    (
        "kimberlize import",
        "kimberlize import -o vm --memory mem.raw --disk disk.raw
kimberlize import -o vm --memory mem.raw --disk root.raw --disk data.raw \\
    --state state.bin --vcpus 2",
    ),
    (
        "kimberlize base",
        "kimberlize base -o base --memory 64M --disk 256M
scripts/linux-base.sh -o linux-base --memory 1G
kimberlize base --qemu -o linux-base --kernel vmlinuz \\
    --initrd initrd.cpio.gz --memory 1G --net user",
    ),
    (
        "kimberlize build",
        "kimberlize build --base base --install examples/install.txt \\
    --resume examples/resume.txt -k overlay.key -o app.ovl
kimberlize build --base base --install examples/install.txt \\
    --resume examples/resume.txt -k overlay.key \\
    | ssh cloudlet dekimberlize --base base -k overlay.key -o app-vm
kimberlize build --base linux-base --install install.sh --resume resume.sh \\
    --net user -k overlay.key -o abiword.ovl
kimberlize build --base base --parent os.ovl --install app.txt \\
    --resume resume.txt -k overlay.key -o app.ovl --depfile app.ovl.d
kimberlize build --base base --install examples/install.txt \\
    --resume examples/resume.txt --launch-out app-vm --force",
    ),
    (
        "kimberlize diff",
        "kimberlize diff --base base --launch launch -k overlay.key -o app.ovl
kimberlize diff --base base --parent os.ovl --launch app -k overlay.key \\
    -o app-layer.ovl
kimberlize diff --base base --parent-from registry.example.org/os:v1 \\
    --launch app -k overlay.key -o app-layer.ovl
kimberlize diff --base base --launch launch --no-encrypt \\
    --stats-json stats.json -o app.ovl",
    ),
    (
        "kimberlize inspect",
        "kimberlize inspect app.ovl
kimberlize inspect app.ovl -k overlay.key --json",
    ),
    (
        "kimberlize push",
        "kimberlize push 127.0.0.1:5000/apps/office:v1 os.ovl app.ovl
kimberlize push registry.example.org/apps/office:v2 os.ovl app2.ovl \\
    --mount-from apps/base",
    ),
    (
        "kimberlize fetch",
        "kimberlize fetch registry.example.org/apps/office:v1
kimberlize fetch --quiet --quota 20G --cache /var/cache/kimberley \\
    registry.example.org/apps/office:v1 registry.example.org/apps/cad:v3
kimberlize fetch --pin registry.example.org/apps/office@sha256:4f1c...",
    ),
    (
        "kimberlize gc",
        "kimberlize gc
kimberlize gc --quota 10G --cache /var/cache/kimberley",
    ),
    (
        "kimberlize offload",
        "kimberlize offload app.ovl -k overlay.key \\
    --cloudlet cloudlet1.example.org:7466 \\
    --cert device.pem --key device.key --ca operator-ca.pem
kimberlize offload app.ovl -k overlay.key --json \\
    --cert device.pem --key device.key --ca operator-ca.pem
kimberlize offload --from registry.example.org/apps/office:v1 \\
    -k overlay.key --cert device.pem --key device.key --ca operator-ca.pem
# Trust one cloudlet by its certificate's SHA-256 fingerprint, not a CA
# (openssl x509 -in cloudlet.pem -noout -fingerprint -sha256 prints it):
kimberlize offload app.ovl -k overlay.key --cloudlet 10.0.0.7:7466 \\
    --cert device.pem --key device.key --pin \"$CLOUDLET_FINGERPRINT\"
# A Linux guest's ssh and web server, reached through the cloudlet
# (each forwarded address is printed once the guest answers):
kimberlize offload abiword.ovl -k overlay.key \\
    --cloudlet cloudlet1.example.org:7466 \\
    --cert device.pem --key device.key --ca operator-ca.pem \\
    --port 22 --port 8080",
    ),
    (
        "kimberlize cache",
        "kimberlize cache add-base base
kimberlize cache list --cache /var/cache/kimberley",
    ),
    (
        "kimberlize cache add-base",
        "kimberlize cache add-base base
dekimberlize --from registry.example.org/apps/office:v1 -k overlay.key -o office-vm",
    ),
    (
        "kimberlize cache list",
        "kimberlize cache list
kimberlize cache list --cache /var/cache/kimberley",
    ),
    (
        "kimberlize cache remove-base",
        "kimberlize cache remove-base 3f9a...e1 --cache /var/cache/kimberley",
    ),
    (
        "kimberlize completions",
        "source <(kimberlize completions bash)            # in ~/.bashrc
kimberlize completions zsh > ~/.zfunc/_kimberlize
kimberlize completions fish > ~/.config/fish/completions/kimberlize.fish",
    ),
];

/// The command line with its examples and exit codes in the long help.
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    kimberley_cli::help::decorate(
        Cli::command(),
        kimberley_cli::exit::Tool::Kimberlize,
        EXAMPLES,
    )
}

/// Parses the process's arguments (exits with usage or help text).
pub fn parse() -> Cli {
    kimberley_cli::help::parse(command())
}

#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The VM directory to create (must not exist).
    #[arg(short, long, value_name = "VMDIR")]
    pub output: PathBuf,
    /// Raw guest memory image.
    #[arg(long, value_name = "FILE")]
    pub memory: PathBuf,
    /// Raw disk image (repeat for more disks, in order).
    #[arg(long, value_name = "FILE")]
    pub disk: Vec<PathBuf>,
    /// Opaque vCPU and device state blob.
    #[arg(long, value_name = "FILE")]
    pub state: Option<PathBuf>,
    /// VM name (default: the directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// vCPU count recorded in the manifest.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Copy raw images by sharing their extents where the file system can
    /// (FICLONE: instant, no space used until either copy changes), else
    /// in the kernel (copy_file_range), else by a sparse copy. The digests
    /// are still computed.
    #[arg(long)]
    pub reflink: bool,
    /// Make the blocks an ext4 file system on a disk leaves free holes
    /// (bare, or in GPT or MBR partitions; read from its block bitmaps,
    /// without mounting it), so they cost nothing in overlays. The
    /// manifest records the disk as trimmed; its digest is of the trimmed
    /// disk. A disk whose file system is not understood, not clean, or
    /// inconsistent is left as it is, with a note.
    #[arg(long)]
    pub trim: bool,
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
pub struct DiffArgs {
    /// The base VM directory.
    #[arg(long, value_name = "VMDIR")]
    pub base: PathBuf,
    /// The launch VM directory.
    #[arg(long, value_name = "VMDIR")]
    pub launch: PathBuf,
    /// Output file ("-" or absent: stdout). Written atomically.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Replace an existing output file.
    #[arg(long)]
    pub force: bool,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Make a layered overlay on top of this parent overlay (repeat for a
    /// chain, in order). The new overlay is relative to base + parents, and
    /// dekimberlize must be given the same chain before it. Parents are read
    /// with the key or passphrase given, like dekimberlize reads them.
    #[arg(long, value_name = "OVL")]
    pub parent: Vec<PathBuf>,
    /// Make the layer on top of the chain REF names (HOST[:PORT]/REPO[:TAG]
    /// or ...@sha256:HEX), read from the cloudlet cache (--cache), or
    /// streamed from the registry into it, like `dekimberlize --from`,
    /// instead of --parent files. Push the new layer after the chain's
    /// overlays (`kimberlize push REF2 ... NEW.ovl`).
    #[arg(long, value_name = "REF", conflicts_with = "parent")]
    pub parent_from: Option<String>,
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
    #[command(flatten)]
    pub registry: kimberley_cli::oci::RegistryArgs,
    /// Worker threads (default: all cores).
    #[arg(long, short = 'j', value_name = "N")]
    pub threads: Option<usize>,
    /// zstd level (1 fast … 19 small).
    #[arg(long, default_value_t = kimberley_formats::diff::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    /// Write the launch chunks FILE lists first, in its order, and mark
    /// where they end, so that a reader can resume the guest early
    /// (implies --overlay-version 2; the file format is FORMAT.md
    /// section 12.5).
    #[arg(long, value_name = "FILE")]
    pub working_set: Option<PathBuf>,
    /// Overlay format version to write: 1 (the default; no coverage map)
    /// or 2 (with a coverage map, for a reader that starts early; the
    /// default with --working-set). Version 2's map comes before the
    /// segments it describes, so the compressed segments wait in a private
    /// nameless file (as large as the overlay; in the output's directory,
    /// or $TMPDIR when writing to a pipe) until the last one is made, and
    /// nothing is written before (no overlap with a pipe's reader).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=2))]
    pub overlay_version: Option<u16>,
    /// Write statistics (bytes, chunks by kind, stage times) as JSON here.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
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

/// Parses `--memory`: a size within what either backend takes (the
/// backend's own limits are checked once `--qemu` is known).
fn memory(s: &str) -> Result<u64, String> {
    kimberley_cli::run::parse_size_in(
        s,
        kimberley_vmm::abi::MIN_MEMORY.min(kimberley_qemu::config::MIN_MEMORY),
        kimberley_vmm::abi::MAX_MEMORY.max(kimberley_qemu::config::MAX_MEMORY),
        1 << 20,
    )
}

/// `--accel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelArg {
    /// KVM where it can run Linux, else TCG.
    Auto,
    /// Hardware virtualisation (refused where it cannot run Linux).
    Kvm,
    /// QEMU's emulator (works everywhere, slower).
    Tcg,
}

/// `--net`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum NetArg {
    /// QEMU user networking (NAT, no privileges).
    User,
}

#[derive(Debug, Args)]
pub struct BaseArgs {
    /// The VM directory to create (must not exist).
    #[arg(short, long, value_name = "VMDIR")]
    pub output: PathBuf,
    /// Guest memory, e.g. 256M, 256MiB, 1G (the microVM: a multiple of
    /// 2 MiB from 16 MiB to 3 GiB; QEMU: a multiple of 1 MiB from 64 MiB to
    /// 1 TiB).
    #[arg(long, default_value = "256M", value_parser = memory)]
    pub memory: u64,
    /// The microVM: size of the empty disk to attach (default 1G; 0: no
    /// disk). With --qemu: a raw or qcow2 disk image to copy into the VM
    /// (repeatable; qcow2 is converted to raw; `truncate -s 1G disk.raw`
    /// makes an empty one).
    #[arg(long, value_name = "SIZE|FILE")]
    pub disk: Vec<String>,
    /// Run Linux under QEMU instead of the test guest in the microVM.
    #[arg(long)]
    pub qemu: bool,
    /// With --qemu: the Linux kernel (bzImage) to boot.
    #[arg(long, value_name = "FILE", requires = "qemu")]
    pub kernel: Option<PathBuf>,
    /// With --qemu: its initial RAM disk.
    #[arg(long, value_name = "FILE", requires = "qemu")]
    pub initrd: Option<PathBuf>,
    /// With --qemu: the kernel command line, instead of the default
    /// `console=ttyS0 quiet panic=-1` (keep `console=ttyS0` to see the
    /// guest's console in errors; `panic=-1` makes a panicking guest stop
    /// at once).
    #[arg(long, value_name = "TEXT", requires = "qemu")]
    pub append: Option<String>,
    /// With --qemu: the accelerator. `auto` picks KVM only where it can run
    /// a Linux kernel (hardware virtualisation, not nested under PVM) and
    /// says which it picked.
    #[arg(long, value_enum, default_value_t = AccelArg::Auto, requires = "qemu")]
    pub accel: AccelArg,
    /// With --qemu: give the VM a network card on QEMU's user network
    /// (needed for `build --net user` and `dekimberlize --run --forward`).
    #[arg(long, value_enum, requires = "qemu")]
    pub net: Option<NetArg>,
    /// vCPUs.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=255))]
    pub vcpus: u8,
    /// VM name (default: the directory's name).
    #[arg(long)]
    pub name: Option<String>,
    /// Give up if the guest is not ready within this many seconds.
    #[arg(long, default_value_t = 30)]
    pub timeout: u64,
    /// No summary line on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The base VM directory (a suspended VM, e.g. from `kimberlize base`).
    #[arg(long, value_name = "VMDIR")]
    pub base: PathBuf,
    /// Script run first (installs the application).
    #[arg(long, value_name = "SCRIPT")]
    pub install: PathBuf,
    /// Script run next (brings the application to where it waits for the user).
    #[arg(long, value_name = "SCRIPT")]
    pub resume: PathBuf,
    /// Resume the launch VM of BASE plus this parent overlay instead of
    /// BASE (repeat for a chain, in order), and write the layer that
    /// applies on top of the chain: `dekimberlize --base BASE -i P1 -i P2
    /// -i OVL` gives the launch VM. The last parent is applied in memory
    /// over the base's files (the ones before it, and one whose changes
    /// exceed 512 MiB, in a scratch directory that is removed); nothing is
    /// kept. Parents are read with the key or passphrase given (the same
    /// one seals the new layer).
    #[arg(long, value_name = "OVL")]
    pub parent: Vec<PathBuf>,
    /// Build on top of the chain REF names (HOST[:PORT]/REPO[:TAG] or
    /// ...@sha256:HEX), read from the cloudlet cache (--cache), or
    /// streamed from the registry into it, instead of --parent files.
    /// Push the new layer after the chain's overlays (`kimberlize push
    /// REF2 ... NEW.ovl`).
    #[arg(long, value_name = "REF", conflicts_with = "parent")]
    pub parent_from: Option<String>,
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
    #[command(flatten)]
    pub registry: kimberley_cli::oci::RegistryArgs,
    /// Overlay output ("-" for stdout; absent: stdout, or no overlay at
    /// all with --launch-out). Written atomically.
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Replace an existing output file, and an existing VM directory at
    /// --launch-out (as a whole, by one rename; anything else there is
    /// refused).
    #[arg(long)]
    pub force: bool,
    /// Keep the launch VM as a VMDIR here (must not exist unless --force).
    /// Without -o, only the launch VM is kept and no overlay is written.
    #[arg(long, value_name = "VMDIR")]
    pub launch_out: Option<PathBuf>,
    /// Write what the build read, as a Make rule (`TARGET: DEP...`, paths
    /// escaped for Make), for `-include` in a Makefile: the base's
    /// manifest, the parents, the scripts and the key or passphrase file.
    /// TARGET is -o FILE, or --launch-out DIR without -o. Written
    /// atomically, before the targets.
    #[arg(long, value_name = "FILE")]
    pub depfile: Option<PathBuf>,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Worker threads (default: all cores).
    #[arg(long, short = 'j', value_name = "N")]
    pub threads: Option<usize>,
    /// zstd level (1 fast … 19 small).
    #[arg(long, default_value_t = kimberley_formats::diff::DEFAULT_LEVEL, value_parser = clap::value_parser!(i32).range(1..=19))]
    pub level: i32,
    /// Give up if a script runs longer than this many seconds.
    #[arg(long, default_value_t = 600)]
    pub timeout: u64,
    /// Write an overlay a cloudlet can start before it has arrived
    /// (`dekimberlize --run --early-start`): version 2, its working set
    /// recorded. After the launch VM is suspended, it is resumed once more
    /// (on scratch copies, then discarded) with its memory served page by
    /// page on first touch; it runs the resume script again and settles
    /// for --settle-ms; the pages it touched, in first-touch order, go
    /// first in the overlay, after the VM's state. Costs one more resume
    /// and resume-script run. MicroVM only (QEMU cannot serve memory page
    /// by page); --working-set-out keeps the file.
    #[arg(long)]
    pub early_start: bool,
    /// With --early-start: how long the resumed VM runs on after the
    /// resume script while its touches are recorded.
    #[arg(
        long,
        value_name = "MS",
        default_value_t = 500,
        requires = "early_start"
    )]
    pub settle_ms: u64,
    /// With --early-start: also write the recorded working set here (the
    /// file `kimberlize diff --working-set` reads; FORMAT.md section 12.5).
    #[arg(long, value_name = "FILE", requires = "early_start")]
    pub working_set_out: Option<PathBuf>,
    /// Let the guest reach the network while the scripts run (QEMU bases
    /// made with `base --net user`), e.g. for `apt-get install`. Without
    /// it the guest's network stays cut off from the host's.
    #[arg(long, value_enum)]
    pub net: Option<NetArg>,
    /// Do not trim the guest's file systems before suspending the launch
    /// VM. By default, after the resume script, `sync` and `fstrim` run on
    /// every mounted file system of a Linux guest (QEMU), through its
    /// agent, so the blocks it freed (downloaded packages, deleted files)
    /// become holes in the disk and cost nothing in the overlay; a guest
    /// without `fstrim`, or a file system that refuses it, is a note, not
    /// a failure. The microVM's test guest has no file system: nothing is
    /// trimmed there (its scripts discard with `disk-discard`).
    #[arg(long)]
    pub no_trim: bool,
    /// Drop the guest's clean page cache before suspending the launch VM
    /// (Linux guests: `sync; echo 3 > /proc/sys/vm/drop_caches`). Freed
    /// pages diff as zero where the guest zeroes them (`init_on_free=1`,
    /// the default of `scripts/linux-base.sh`): a smaller overlay, paid
    /// for with page faults (file reads) after resume. Not applicable to
    /// the microVM.
    #[arg(long)]
    pub drop_caches: bool,
    /// Write statistics (script times, what was trimmed, then the diff's)
    /// as JSON here.
    #[arg(long, value_name = "FILE")]
    pub stats_json: Option<PathBuf>,
    /// No progress bar or summary on stderr (the guest's output still goes
    /// there, unless --guest-log).
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
    /// Say what was trimmed, per file system, and whether the page cache
    /// was dropped.
    #[arg(short, long)]
    pub verbose: bool,
    /// How to report progress on stderr: auto (a bar on a terminal,
    /// nothing off one), bar, plain (log lines with time, stage and
    /// throughput, for cron and CI), none. A one-line summary ends every
    /// run unless -q.
    #[arg(long, value_enum, value_name = "WHEN", default_value_t = ProgressMode::Auto)]
    pub progress: ProgressMode,
    /// Append what the guest prints to FILE instead of stderr (created
    /// 0600 if it does not exist; a log, so appended in place, not written
    /// atomically).
    #[arg(long, value_name = "FILE")]
    pub guest_log: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct PushArgs {
    /// Where to push: HOST[:PORT]/REPO[:TAG] or ...@sha256:HEX.
    #[arg(value_name = "REF")]
    pub reference: String,
    /// The overlays, in chain order (the first applies to a base VM, each
    /// next one to the result of the one before).
    #[arg(value_name = "OVERLAY", required = true)]
    pub overlays: Vec<PathBuf>,
    #[command(flatten)]
    pub registry: kimberley_cli::oci::RegistryArgs,
    /// Before uploading a blob the registry lacks, ask it to mount the blob
    /// from this repository of the same registry (repeatable).
    #[arg(long, value_name = "REPO")]
    pub mount_from: Vec<String>,
    /// Upload blobs larger than this in chunks of this size.
    #[arg(long, value_name = "SIZE", default_value = "16M", value_parser = chunk_size)]
    pub chunk_size: u64,
    /// No progress or summary on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct FetchArgs {
    /// What to fetch: HOST[:PORT]/REPO[:TAG] or ...@sha256:HEX (repeatable).
    #[arg(value_name = "REF", required = true)]
    pub references: Vec<String>,
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
    #[command(flatten)]
    pub registry: kimberley_cli::oci::RegistryArgs,
    /// Afterwards, evict the least recently used chains that are not
    /// pinned (never the ones just fetched) until the cache's blobs take at
    /// most SIZE.
    #[arg(long, value_name = "SIZE", value_parser = kimberley_cli::run::parse_size)]
    pub quota: Option<u64>,
    /// Pin the fetched chains: eviction keeps them.
    #[arg(long)]
    pub pin: bool,
    /// Nothing on stderr but errors (for cron: the exit code says what
    /// happened).
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub command: CacheCommand,
}

#[derive(Debug, Subcommand)]
pub enum CacheCommand {
    /// Keep a base VM in the cache, under its identity.
    ///
    /// Copies VMDIR into DIR/bases/IDENTITY/ (sharing extents where the
    /// file system can, holes kept; files read-only), checks every
    /// component of the copy against its digest, and renames it into
    /// place: a VMDIR that does not verify is refused (exit 7), and of two
    /// adds of the same base at once one copies and the other finds it.
    /// Prints the identity. The cache re-checks every digest of a base each
    /// time it is used, and removes one that fails (exit 11).
    AddBase(AddBaseArgs),
    /// List the cache: chains (manifests) with their tags, layers, sizes,
    /// last use and pins; base VMs with their identities and sizes; blobs.
    List(ListArgs),
    /// Remove base VMs from the cache, by identity (64 hex digits).
    RemoveBase(RemoveBaseArgs),
}

#[derive(Debug, Args)]
pub struct AddBaseArgs {
    /// The base VM directory to keep.
    #[arg(value_name = "VMDIR", required = true)]
    pub vmdirs: Vec<PathBuf>,
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
    /// Print nothing but the identities.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
}

#[derive(Debug, Args)]
pub struct RemoveBaseArgs {
    /// The identity of a base to remove (as `cache list` prints it).
    #[arg(value_name = "IDENTITY", required = true)]
    pub identities: Vec<String>,
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
    /// No summary on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct GcArgs {
    #[command(flatten)]
    pub cache: kimberley_cli::oci::CacheArgs,
    /// Evict the least recently used chains that are not pinned until the
    /// cache's blobs take at most SIZE.
    #[arg(long, value_name = "SIZE", value_parser = kimberley_cli::run::parse_size)]
    pub quota: Option<u64>,
    /// No summary on stderr.
    #[arg(short, long)]
    pub quiet: bool,
}

/// Parses `--chunk-size`: 64 KiB to 1 GiB.
fn chunk_size(s: &str) -> Result<u64, String> {
    kimberley_cli::run::parse_size_in(s, 64 << 10, 1 << 30, 1)
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The overlay file ("-" for stdin), or a VM directory.
    #[arg(value_name = "OVL|VMDIR")]
    pub overlay: PathBuf,
    #[command(flatten)]
    pub keys: KeyArgs,
    #[command(flatten)]
    pub read: ReadArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
