//! A running QEMU VM: boot or restore one on a memory file, pause, resume,
//! save its device state (RAM stays in the shared memory file), quit; the
//! building block of the backend.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kimberley_formats::fsutil::open_regular;

mod live;

pub use live::LiveState;

use crate::config::{Launch, MachineConfig};
use crate::error::{Error, Result};
use crate::process::{QemuProcess, WorkDir};
use crate::qga::Qga;
use crate::qmp::{Qmp, Version};

/// How long QEMU may take to open its QMP socket.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// How long saving or loading the device state may take.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(120);

/// A QEMU process running a [`MachineConfig`] (dropped: killed).
pub struct Vm {
    cfg: MachineConfig,
    files: Files,
    memory_file: PathBuf,
    share: bool,
    version: Version,
    qga: Qga,
    qmp: Qmp,
    started: Instant,
    first_run: Option<Instant>,
    paused: bool,
    /// A live migration copies the disks in its stream (block migration
    /// is on until [`Vm::live_end`]).
    copying_disks: bool,
    /// QEMU keeps the disks' page cache at the end of an incoming stream
    /// (`file.drop-cache=off`).
    keeps_disk_cache: bool,
    ready: bool,
    exited: Option<String>,
    interrupt: Arc<AtomicBool>,
    // Last: the process (and its socket directory) goes after the
    // connections.
    process: QemuProcess,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("process", &self.process)
            .field("memory_file", &self.memory_file)
            .finish()
    }
}

/// The files a VM runs on, opened by us: QEMU gets them as inherited
/// descriptors (`/proc/self/fd/N`), so it uses exactly these files,
/// whatever happens to their paths.
#[derive(Debug)]
pub struct Files {
    /// The memory file (read-write if shared).
    pub memory: File,
    /// The kernel.
    pub kernel: File,
    /// The initrd.
    pub initrd: Option<File>,
    /// The disks (read-write), in order.
    pub disks: Vec<File>,
}

impl Files {
    /// Opens `cfg`'s files and `memory_file` (never following a symbolic
    /// link; regular files only).
    pub fn open(cfg: &MachineConfig, memory_file: &Path, share: bool) -> Result<Files> {
        let open = |p: &Path, write: bool, what: &str| {
            open_regular(p, write)
                .map_err(|e| Error::Config(format!("{what} {}: {e}", p.display())))
        };
        Ok(Files {
            memory: open(memory_file, share, "memory file")?,
            kernel: open(&cfg.kernel, false, "kernel")?,
            initrd: cfg
                .initrd
                .as_deref()
                .map(|p| open(p, false, "initrd"))
                .transpose()?,
            disks: cfg
                .disks
                .iter()
                .map(|d| open(d, true, "disk"))
                .collect::<Result<Vec<_>>>()?,
        })
    }

    fn all(&self) -> impl Iterator<Item = &File> {
        std::iter::once(&self.memory)
            .chain(std::iter::once(&self.kernel))
            .chain(self.initrd.iter())
            .chain(self.disks.iter())
    }
}

/// The path under which QEMU opens our descriptor of `f`.
fn fd_path(f: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

impl Vm {
    #[allow(clippy::too_many_arguments)]
    fn start(
        program: &Path,
        cfg: &MachineConfig,
        files: Files,
        memory_file: &Path,
        share: bool,
        incoming: bool,
        interrupt: Option<Arc<AtomicBool>>,
        lock_disks: bool,
    ) -> Result<Vm> {
        cfg.validate()?;
        if files.disks.len() != cfg.disks.len() || files.initrd.is_some() != cfg.initrd.is_some() {
            return Err(Error::Config(
                "the opened files do not match the configuration".into(),
            ));
        }
        let size = files
            .memory
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", memory_file.display()), e))?
            .len();
        if size != cfg.memory_size {
            return Err(Error::Config(format!(
                "{} is {size} bytes, the VM has {} bytes of RAM",
                memory_file.display(),
                cfg.memory_size
            )));
        }
        // QEMU sees our descriptors, not the paths.
        let mut seen = cfg.clone();
        seen.kernel = fd_path(&files.kernel);
        seen.initrd = files.initrd.as_ref().map(fd_path);
        seen.disks = files.disks.iter().map(fd_path).collect();
        let work = WorkDir::new()?;
        let qmp_path = work.path().join("qmp.sock");
        let qga_path = work.path().join("qga.sock");
        let (console, console_w) =
            std::io::pipe().map_err(|e| Error::io("creating the console pipe", e))?;
        // At the end of an incoming migration QEMU drops the page cache of
        // each disk it activates, in case it holds pages from before the
        // source's last writes to shared storage; on a file system of this
        // host alone it cannot, and dropping it made the receiver read the
        // disks back from storage in the pause.
        let keeps_disk_cache = incoming
            && files
                .disks
                .iter()
                .all(|d| kimberley_formats::sys::file::on_local_fs(d.as_raw_fd()));
        let args = seen.argv(&Launch {
            memory_file: &fd_path(&files.memory),
            share,
            qmp: &qmp_path,
            qga: &qga_path,
            console: &fd_path(&console_w),
            incoming,
            lock_disks,
            keep_disk_cache: keeps_disk_cache,
        });
        let started = Instant::now();
        let mut keep: Vec<_> = files.all().map(|f| f.as_raw_fd()).collect();
        keep.push(console_w.as_raw_fd());
        let mut process = QemuProcess::spawn(program, &args, &keep, console, work)?;
        // QEMU holds the console's write end now: the reader sees its end
        // when QEMU exits.
        drop(console_w);
        let interrupt = interrupt.unwrap_or_default();
        // QEMU listens on the QMP socket once it has parsed its options.
        let mut qmp = loop {
            if let Some(e) = process.exit_error("starting") {
                return Err(e);
            }
            if qmp_path.exists() {
                match Qmp::connect(&qmp_path, START_TIMEOUT) {
                    Ok(q) => break q,
                    Err(e) if started.elapsed() > START_TIMEOUT => return Err(e),
                    Err(_) => {}
                }
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(Error::Timeout {
                    during: "starting QEMU (no QMP socket)".into(),
                    timeout: START_TIMEOUT,
                });
            }
            if interrupt.load(Ordering::SeqCst) {
                return Err(Error::Interrupted);
            }
            std::thread::sleep(Duration::from_millis(2));
        };
        let version = qmp.version()?;
        qmp.ignore_shared()?;
        let mut qga = Qga::new(&qga_path);
        qga.set_interrupt(interrupt.clone());
        Ok(Vm {
            cfg: cfg.clone(),
            files,
            memory_file: memory_file.to_path_buf(),
            share,
            version,
            qga,
            qmp,
            started,
            first_run: None,
            paused: incoming,
            copying_disks: false,
            keeps_disk_cache,
            ready: false,
            exited: None,
            interrupt,
            process,
        })
    }

    /// Boots `cfg` with its RAM in `memory_file` (created sparse, 0600, if
    /// missing; shared: the file *is* the RAM), and waits until the guest
    /// agent answers or `timeout` passes (the error then carries the
    /// serial console's last lines).
    pub fn boot(
        program: &Path,
        cfg: &MachineConfig,
        memory_file: &Path,
        timeout: Duration,
        interrupt: Option<Arc<AtomicBool>>,
    ) -> Result<Vm> {
        cfg.validate()?;
        size_memory_file(memory_file, cfg.memory_size)?;
        let files = Files::open(cfg, memory_file, true)?;
        Vm::boot_files(program, cfg, files, memory_file, timeout, interrupt)
    }

    /// [`Vm::boot`] on files already opened (`memory_file` names the
    /// memory file in messages).
    pub fn boot_files(
        program: &Path,
        cfg: &MachineConfig,
        files: Files,
        memory_file: &Path,
        timeout: Duration,
        interrupt: Option<Arc<AtomicBool>>,
    ) -> Result<Vm> {
        let mut vm = Vm::start(
            program,
            cfg,
            files,
            memory_file,
            true,
            false,
            interrupt,
            true,
        )?;
        vm.first_run = Some(vm.started);
        vm.wait_agent(timeout)?;
        Ok(vm)
    }

    /// Restores the VM whose device state is `state` (positioned anywhere:
    /// it is read from its start) on `memory_file`: mapped privately
    /// (`share` false: the file is left as it is) or shared (the file is
    /// the RAM from now on). Returns once the guest runs again.
    pub fn restore(
        program: &Path,
        cfg: &MachineConfig,
        memory_file: &Path,
        share: bool,
        state: &File,
        interrupt: Option<Arc<AtomicBool>>,
    ) -> Result<Vm> {
        let files = Files::open(cfg, memory_file, share)?;
        Vm::restore_files(program, cfg, files, memory_file, share, state, interrupt)
    }

    /// [`Vm::restore`] on files already opened.
    pub fn restore_files(
        program: &Path,
        cfg: &MachineConfig,
        files: Files,
        memory_file: &Path,
        share: bool,
        state: &File,
        interrupt: Option<Arc<AtomicBool>>,
    ) -> Result<Vm> {
        let mut vm = Vm::start(
            program,
            cfg,
            files,
            memory_file,
            share,
            true,
            interrupt,
            true,
        )?;
        let mut state = state
            .try_clone()
            .map_err(|e| Error::io("duplicating the state file", e))?;
        state
            .seek(SeekFrom::Start(0))
            .map_err(|e| Error::io("rewinding the state file", e))?;
        vm.qmp.pass_fd("state", &state)?;
        drop(state);
        vm.qmp.migrate_incoming("fd:state")?;
        let r = vm
            .qmp
            .wait_migration("restoring the device state", MIGRATION_TIMEOUT);
        if let Err(e) = r {
            return Err(vm
                .process
                .exit_error("restoring the device state")
                .unwrap_or(e));
        }
        vm.qmp.cont()?;
        vm.first_run = Some(Instant::now());
        vm.paused = false;
        Ok(vm)
    }

    /// Waits until the guest agent answers (pinging), the guest stops, or
    /// `timeout` passes.
    pub fn wait_agent(&mut self, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.qga.ping(left.min(Duration::from_secs(1))) {
                Ok(()) => {
                    self.ready = true;
                    return Ok(());
                }
                Err(Error::Interrupted) => return Err(Error::Interrupted),
                Err(e) => {
                    if let Some(e) = self.process.exit_error("waiting for the guest agent") {
                        self.exited = Some(e.to_string());
                        return Err(e);
                    }
                    if Instant::now() >= end {
                        return Err(match e {
                            Error::Timeout { .. } => Error::Boot {
                                timeout,
                                log: self.process.log_tail(),
                            },
                            e => e,
                        });
                    }
                    // A refused connection fails at once: do not spin.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }

    /// QEMU's version.
    pub fn version(&self) -> Version {
        self.version
    }

    /// What it runs.
    pub fn config(&self) -> &MachineConfig {
        &self.cfg
    }

    /// The files it runs on.
    pub fn files(&self) -> &Files {
        &self.files
    }

    /// The memory file, and whether it is shared (the RAM itself).
    pub fn memory_file(&self) -> (&Path, bool) {
        (&self.memory_file, self.share)
    }

    /// Since QEMU was started.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// When the guest first ran (boot: QEMU's start; restore: `cont`).
    pub fn first_run(&self) -> Option<Instant> {
        self.first_run
    }

    /// True once the agent answered.
    pub fn is_ready(&self) -> bool {
        self.ready
    }

    /// True if paused.
    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Why the guest stopped, as last seen (without looking again).
    pub fn exited_as_seen(&self) -> Option<String> {
        self.exited.clone()
    }

    /// Why the guest stopped, if QEMU exits within `wait` (a closed agent
    /// connection: QEMU may be ending).
    pub fn exited_within(&mut self, wait: Duration) -> Option<String> {
        self.process.wait_exit(wait);
        self.exited()
    }

    /// Why the guest stopped, if it did.
    pub fn exited(&mut self) -> Option<String> {
        if self.exited.is_none() {
            if let Some(e) = self.process.exit_error("running") {
                self.exited = Some(e.to_string());
            }
        }
        self.exited.clone()
    }

    /// The interrupt flag every wait watches.
    pub fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        self.qga.set_interrupt(flag.clone());
        self.interrupt = flag;
    }

    fn check_running(&mut self, during: &str) -> Result<()> {
        match self.process.exit_error(during) {
            Some(e) => {
                self.exited = Some(e.to_string());
                Err(e)
            }
            None => Ok(()),
        }
    }

    /// Stops the vCPUs.
    pub fn pause(&mut self) -> Result<()> {
        self.check_running("pausing")?;
        if !self.paused {
            self.qmp.stop()?;
            self.paused = true;
        }
        Ok(())
    }

    /// Lets the vCPUs run.
    pub fn resume(&mut self) -> Result<()> {
        self.check_running("resuming")?;
        if self.paused {
            self.qmp.cont()?;
            self.paused = false;
        }
        Ok(())
    }

    /// QEMU's run state (`running`, `paused`, `postmigrate`...).
    pub fn status(&mut self) -> Result<String> {
        self.check_running("querying the status")?;
        self.qmp.status()
    }

    /// Pauses and writes the device state (no RAM: it is in the shared
    /// memory file) into `to`, a file created by the caller (private);
    /// the VM stays paused. QEMU writes it through a descriptor we pass it,
    /// so everything is in `to` when this returns.
    pub fn save_state(&mut self, to: &File) -> Result<()> {
        if !self.share {
            return Err(Error::Config(
                "the memory file is mapped privately: a suspend would lose the RAM".into(),
            ));
        }
        self.pause()?;
        let f = to
            .try_clone()
            .map_err(|e| Error::io("duplicating the state file", e))?;
        self.qmp.pass_fd("state", &f)?;
        drop(f);
        self.qmp.migrate("fd:state")?;
        let r = self.qmp.wait_migration("suspending", MIGRATION_TIMEOUT);
        if let Err(e) = r {
            return Err(self.process.exit_error("suspending").unwrap_or(e));
        }
        Ok(())
    }

    /// [`Vm::save_state`] into a new private file at `path`.
    pub fn save_state_to(&mut self, path: &Path) -> Result<()> {
        let f = kimberley_formats::fsutil::create_private(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        self.save_state(&f)
    }

    /// Ends QEMU (QMP `quit`; killed if it does not exit at once).
    pub fn quit(mut self) -> Result<()> {
        let r = self.qmp.quit();
        if self.process.wait_exit(Duration::from_secs(5)).is_none() {
            self.process.kill();
        }
        r
    }

    /// The guest agent.
    pub fn agent(&mut self) -> &mut Qga {
        &mut self.qga
    }

    /// The serial console lines printed since the last call.
    pub fn serial_lines(&mut self) -> Vec<String> {
        self.process.take_console_lines()
    }

    /// QEMU's stderr and the console's last lines.
    pub fn log_tail(&self) -> String {
        self.process.log_tail()
    }
}

/// Creates `path` (0600, sparse) of `size` bytes, or checks it has them.
fn size_memory_file(path: &Path, size: u64) -> Result<()> {
    let what = || format!("sizing {}", path.display());
    let f = match open_regular(path, true) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            kimberley_formats::fsutil::create_private(path).map_err(|e| Error::io(what(), e))?
        }
        Err(e) => return Err(Error::io(what(), e)),
    };
    f.set_len(size).map_err(|e| Error::io(what(), e))
}
