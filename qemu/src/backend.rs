//! The QEMU backend behind the machine seam: [`boot`] makes a suspended VM
//! directory (`kimberlize base --qemu`), [`QemuBackend`] restores one and
//! [`QemuMachine`] is the running VM ([`Machine`] and [`GuestAgent`]).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kimberley_formats::fsutil::{copy_sparse, occupied, open_regular, same_file};
use kimberley_formats::vmdir::dir::digest_file;
use kimberley_formats::vmdir::{
    file_name, Component, Kind, MachineSpec, Manifest, VmDir, VmDirWriter,
};
use kimberley_machine::{
    Backend, GuestAgent, Machine, MachineInfo, MemorySource, Placement, Reclaim, Reclaimed,
    RestoreOptions, ScriptOutcome,
};

use crate::accel::{self, AccelChoice};
use crate::config::{Accel, MachineConfig, UserNet, DEFAULT_CMDLINE, DEFAULT_MACHINE_TYPE, QEMU};
use crate::error::{Error, Result};
use crate::vm::{Files, Vm};
use crate::BACKEND;
use rayon::prelude::*;

mod live;

pub use live::IncomingFiles;

type MResult<T> = kimberley_machine::Result<T>;

/// How to boot a new Linux VM.
#[derive(Debug, Clone)]
pub struct BootConfig {
    /// The kernel.
    pub kernel: PathBuf,
    /// Its initial RAM disk.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: String,
    /// Guest RAM in bytes (a multiple of 1 MiB).
    pub memory_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Disk images: raw, or qcow2 (converted to raw with `qemu-img`).
    pub disks: Vec<PathBuf>,
    /// The accelerator.
    pub accel: AccelChoice,
    /// User networking (a virtio-net NIC).
    pub net: bool,
    /// The QEMU program.
    pub program: PathBuf,
}

impl BootConfig {
    /// 256 MiB, one vCPU, no disk, [`DEFAULT_CMDLINE`], accelerator
    /// chosen automatically, no network, `qemu-system-x86_64` from `PATH`.
    pub fn new(kernel: impl Into<PathBuf>, initrd: Option<PathBuf>) -> BootConfig {
        BootConfig {
            kernel: kernel.into(),
            initrd,
            append: DEFAULT_CMDLINE.into(),
            memory_size: 256 << 20,
            vcpus: 1,
            disks: Vec::new(),
            accel: AccelChoice::Auto,
            net: false,
            program: QEMU.into(),
        }
    }
}

/// What [`boot`] made.
#[derive(Debug, Clone)]
pub struct Booted {
    /// The committed VM directory.
    pub dir: PathBuf,
    /// The accelerator used.
    pub accel: Accel,
    /// Why that one.
    pub accel_reason: String,
    /// From QEMU's start to the agent's first answer.
    pub boot_time: Duration,
    /// From the pause to the committed directory.
    pub suspend_time: Duration,
}

/// Boots a new VM in the VM directory `w` named `name` until its guest
/// agent answers (within `timeout`), suspends it and commits: the kernel,
/// initrd and disks are copied into `w` (qcow2 converted to raw), the RAM
/// is `w`'s `memory.raw` from the first instruction (shared), only the
/// device state is written (`state.bin`).
pub fn boot(cfg: &BootConfig, w: VmDirWriter, name: &str, timeout: Duration) -> Result<Booted> {
    let (accel, accel_reason) = accel::choose(cfg.accel)?;
    let dir = w.path().to_path_buf();
    let open_src = |p: &Path, what: &str| {
        open_regular(p, false).map_err(|e| Error::Config(format!("{what} {}: {e}", p.display())))
    };
    let kernel_src = open_src(&cfg.kernel, "kernel")?;
    let initrd_src = cfg
        .initrd
        .as_ref()
        .map(|p| open_src(p, "initrd"))
        .transpose()?;
    let mut disks = Vec::new();
    let mut disk_files = Vec::new();
    for (i, src) in cfg.disks.iter().enumerate() {
        let name = file_name(Kind::Disk, i);
        disk_files.push(import_disk(&cfg.program, src, &w, &name)?);
        disks.push(dir.join(name));
    }
    let (kernel, kernel_file) = copy_into(&kernel_src, &w, &file_name(Kind::Kernel, 0))?;
    let (initrd, initrd_file) = match initrd_src {
        Some(f) => {
            let (p, f) = copy_into(&f, &w, &file_name(Kind::Initrd, 0))?;
            (Some(p), Some(f))
        }
        None => (None, None),
    };
    let mem = dir.join(file_name(Kind::Memory, 0));
    let memory = w.create_file(&file_name(Kind::Memory, 0))?;
    memory
        .set_len(cfg.memory_size)
        .map_err(|e| Error::io(format!("sizing {}", mem.display()), e))?;
    let files = Files {
        memory,
        kernel: kernel_file,
        initrd: initrd_file,
        disks: disk_files,
    };
    let mcfg = MachineConfig {
        kernel,
        initrd,
        cmdline: cfg.append.clone(),
        memory_size: cfg.memory_size,
        vcpus: cfg.vcpus,
        disks,
        accel,
        machine_type: DEFAULT_MACHINE_TYPE.into(),
        cpu: accel.default_cpu().into(),
        net: cfg.net.then(|| UserNet {
            forwards: Vec::new(),
            outside: true,
        }),
    };
    let t0 = Instant::now();
    mcfg.validate()?;
    let vm = Vm::boot_files(&cfg.program, &mcfg, files, &mem, timeout, None)?;
    let boot_time = t0.elapsed();
    let mut m = QemuMachine::new(vm, cfg.program.clone(), Home::Booted);
    let t1 = Instant::now();
    let path = m.suspend_into_inner(w, name)?;
    let suspend_time = t1.elapsed();
    m.quit()?;
    Ok(Booted {
        dir: path,
        accel,
        accel_reason,
        boot_time,
        suspend_time,
    })
}

/// Copies `src` (sparse) into `w` as `name`; returns its path and the
/// new file.
fn copy_into(src: &File, w: &VmDirWriter, name: &str) -> Result<(PathBuf, File)> {
    let len = src
        .metadata()
        .map_err(|e| Error::io(format!("stat for {name}"), e))?
        .len();
    let dst = w.create_file(name)?;
    copy_sparse(src, len, &dst, |_, _| Ok(()))?;
    Ok((w.path().join(name), dst))
}

/// Copies a raw disk image into `w` as `name`, or converts one in another
/// format (qcow2, VMDK, …: `kimberlize import`'s rules); returns the new file.
fn import_disk(program: &Path, src: &Path, w: &VmDirWriter, name: &str) -> Result<File> {
    use kimberley_formats::image::ImageFormat;
    use kimberley_formats::vmdir::import::{convert, image_format};
    let f = open_regular(src, false)
        .map_err(|e| Error::Config(format!("disk {}: {e}", src.display())))?;
    let len = f
        .metadata()
        .map_err(|e| Error::io(format!("stat {}", src.display()), e))?
        .len();
    let format =
        image_format(&f, len).map_err(|e| Error::io(format!("reading {}", src.display()), e))?;
    if format == ImageFormat::Raw {
        return Ok(copy_into(&f, w, name)?.1);
    }
    // qemu-img beside the QEMU program, or from PATH.
    let img = program
        .parent()
        .map(|d| d.join("qemu-img"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("qemu-img"));
    let dst = w.create_file(name)?;
    convert(&img, src, format, &dst, &w.path().join(name))?;
    Ok(dst)
}

/// What one QEMU program offers, asked once per program.
#[derive(Debug, Clone)]
struct Offer {
    version: (u64, u64, u64),
    machine_types: Vec<String>,
}

fn offer(program: &Path) -> Result<Offer> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Offer>>> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(o) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(program) {
        return Ok(o.clone());
    }
    // Both questions at once: each is a QEMU start (about 50 ms).
    let spawn = |args: &'static [&'static str]| {
        Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .map(|c| (args, c))
            .map_err(|source| Error::Spawn {
                program: program.display().to_string(),
                source,
            })
    };
    let version_child = spawn(&["--version"])?;
    let machines_child = spawn(&["-machine", "help"])?;
    let run = |(args, child): (&[&str], std::process::Child)| -> Result<String> {
        let o = child
            .wait_with_output()
            .map_err(|e| Error::io(format!("waiting for {}", program.display()), e))?;
        if !o.status.success() {
            return Err(Error::Config(format!(
                "{} {}: {}",
                program.display(),
                args.join(" "),
                String::from_utf8_lossy(&o.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let v = run(version_child)?;
    let version = parse_version(&v).ok_or_else(|| Error::Protocol {
        during: format!("{} --version", program.display()),
        what: v.lines().next().unwrap_or("").to_string(),
    })?;
    let machine_types = run(machines_child)?
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    let o = Offer {
        version,
        machine_types,
    };
    cache
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(program.to_path_buf(), o.clone());
    Ok(o)
}

/// `QEMU emulator version 7.2.19 (Debian ...)` → (7, 2, 19).
fn parse_version(s: &str) -> Option<(u64, u64, u64)> {
    let v = s.split("version ").nth(1)?.split_whitespace().next()?;
    let mut it = v.split('.').map(|x| x.parse::<u64>().ok());
    Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)))
}

/// Restores QEMU VM directories (manifest version 2, backend `qemu`).
///
/// QEMU is killed when the *thread* that started it ends
/// (`PR_SET_PDEATHSIG`): restore on a thread that outlives the machine
/// (the main thread, say), not on a short-lived worker.
#[derive(Debug, Clone)]
pub struct QemuBackend {
    /// The QEMU program (default: `qemu-system-x86_64` from `PATH`).
    pub program: PathBuf,
}

impl Default for QemuBackend {
    fn default() -> Self {
        QemuBackend {
            program: QEMU.into(),
        }
    }
}

impl QemuBackend {
    fn spec<'a>(&self, dir: &'a VmDir) -> Result<&'a MachineSpec> {
        let spec = dir.manifest.machine.as_deref().ok_or_else(|| {
            Error::Unsupported(format!(
                "{} is a microVM directory (no machine description), not a QEMU one",
                dir.path.display()
            ))
        })?;
        if spec.backend != BACKEND {
            return Err(Error::Unsupported(format!(
                "{} is for the {:?} backend, not {BACKEND}",
                dir.path.display(),
                spec.backend
            )));
        }
        Ok(spec)
    }

    fn check_dir(&self, dir: &VmDir) -> Result<()> {
        let spec = self.spec(dir)?;
        let m = &dir.manifest;
        if m.state_index().is_none() {
            return Err(Error::Unsupported(format!(
                "{} has no state: it is a powered-off VM, not a suspended one",
                dir.path.display()
            )));
        }
        if index_of(m, Kind::Kernel).is_none() {
            return Err(Error::Unsupported(format!(
                "{} has no kernel",
                dir.path.display()
            )));
        }
        // The description must be one this backend writes.
        MachineConfig::from_spec(
            spec,
            m.memory_size(),
            m.vcpus,
            PathBuf::from("kernel"),
            index_of(m, Kind::Initrd).map(|_| PathBuf::from("initrd")),
            m.disk_indices()
                .iter()
                .map(|&i| dir.component_path(i))
                .collect(),
            Vec::new(),
            false,
        )?;
        self.check_host(spec, &dir.path)
    }

    /// Refuses a machine this QEMU cannot run here: a machine type it does
    /// not offer, a newer QEMU's state, an unusable accelerator.
    fn check_host(&self, spec: &MachineSpec, what: &Path) -> Result<()> {
        let accel = Accel::parse(&spec.accel)
            .ok_or_else(|| Error::Unsupported(format!("unknown accelerator {:?}", spec.accel)))?;
        let offer = offer(&self.program)?;
        if !offer.machine_types.contains(&spec.machine_type) {
            return Err(Error::Unsupported(format!(
                "{} needs QEMU machine type {}, which {} (QEMU {}.{}.{}) does not offer",
                what.display(),
                spec.machine_type,
                self.program.display(),
                offer.version.0,
                offer.version.1,
                offer.version.2
            )));
        }
        if let Some(made) = parse_version(&format!("version {}", spec.version)) {
            if made > offer.version {
                return Err(Error::Unsupported(format!(
                    "{} was suspended by QEMU {}, newer than this QEMU {}.{}.{}",
                    what.display(),
                    spec.version,
                    offer.version.0,
                    offer.version.1,
                    offer.version.2
                )));
            }
        }
        accel::usable(accel)
    }

    fn restore_vm(&self, dir: &VmDir, opts: RestoreOptions<'_>) -> Result<QemuMachine> {
        if opts.memory != MemorySource::PrivateFileMap {
            // QEMU maps its RAM file itself; serving it lazily would take
            // postcopy or a userfaultfd-served file (docs/QEMU.md).
            return Err(Error::Unsupported(
                "lazily restored memory is for the microVM; QEMU guests' memory is mapped from their file"
                    .into(),
            ));
        }
        self.check_dir(dir)?;
        let m = &dir.manifest;
        let spec = self.spec(dir)?;
        let state_i = m.state_index().expect("checked");
        let state = dir.open_component(state_i)?;
        let kernel_i = index_of(m, Kind::Kernel).expect("checked");
        let initrd_i = index_of(m, Kind::Initrd);
        // QEMU runs on the files opened and checked here (and by
        // `VmDir::open`), handed to it as descriptors.
        let (home, memory, disks, kernel, initrd, files) = match opts.placement {
            Placement::InPlace => {
                let files = Files {
                    memory: dir.open_component_rw(0)?,
                    kernel: dir.open_component(kernel_i)?,
                    initrd: initrd_i.map(|i| dir.open_component(i)).transpose()?,
                    disks: m
                        .disk_indices()
                        .iter()
                        .map(|&i| dir.open_component_rw(i))
                        .collect::<kimberley_formats::Result<Vec<_>>>()?,
                };
                (
                    Home::InPlace(dir.path.clone()),
                    dir.component_path(0),
                    m.disk_indices()
                        .iter()
                        .map(|&i| dir.component_path(i))
                        .collect(),
                    dir.component_path(kernel_i),
                    initrd_i.map(|i| dir.component_path(i)),
                    files,
                )
            }
            Placement::CopyInto(w) => {
                let copy = |i: usize| -> Result<(PathBuf, File)> {
                    copy_into(&dir.open_component(i)?, w, &m.file_name(i))
                };
                let (memory, memory_file) = copy(0)?;
                let (disks, disk_files): (Vec<_>, Vec<_>) = m
                    .disk_indices()
                    .into_iter()
                    .map(copy)
                    .collect::<Result<Vec<_>>>()?
                    .into_iter()
                    .unzip();
                let (kernel, kernel_file) = copy(kernel_i)?;
                let (initrd, initrd_file) = match initrd_i.map(copy).transpose()? {
                    Some((p, f)) => (Some(p), Some(f)),
                    None => (None, None),
                };
                let files = Files {
                    memory: memory_file,
                    kernel: kernel_file,
                    initrd: initrd_file,
                    disks: disk_files,
                };
                (Home::Copy, memory, disks, kernel, initrd, files)
            }
        };
        let cfg = MachineConfig::from_spec(
            spec,
            m.memory_size(),
            m.vcpus,
            kernel,
            initrd,
            disks,
            opts.forwards,
            opts.network,
        )?;
        let vm = Vm::restore_files(&self.program, &cfg, files, &memory, true, &state, None)?;
        Ok(QemuMachine::new(vm, self.program.clone(), home))
    }
}

fn index_of(m: &Manifest, kind: Kind) -> Option<usize> {
    m.components.iter().position(|c| c.kind == kind)
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn check(&self, dir: &VmDir) -> MResult<()> {
        Ok(self.check_dir(dir)?)
    }

    fn restore(&self, dir: &VmDir, opts: RestoreOptions<'_>) -> MResult<Box<dyn Machine>> {
        Ok(Box::new(self.restore_vm(dir, opts)?))
    }
}

impl QemuBackend {
    /// [`Backend::restore`], returning the concrete machine.
    pub fn restore_machine(&self, dir: &VmDir, opts: RestoreOptions<'_>) -> Result<QemuMachine> {
        self.restore_vm(dir, opts)
    }
}

/// Where a machine's files are.
#[derive(Debug, Clone)]
enum Home {
    /// Booted into a directory being written.
    Booted,
    /// In the VM directory it was restored from.
    InPlace(PathBuf),
    /// Copies in a directory being written.
    Copy,
}

/// A running QEMU VM behind the seam.
pub struct QemuMachine {
    vm: Vm,
    program: PathBuf,
    home: Home,
    /// Its memory file became a committed directory's component: it must
    /// not run again (it would change that directory).
    sealed: bool,
}

impl std::fmt::Debug for QemuMachine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuMachine")
            .field("vm", &self.vm)
            .field("home", &self.home)
            .finish()
    }
}

fn stat(f: &File, p: &Path) -> Result<std::fs::Metadata> {
    f.metadata()
        .map_err(|e| Error::io(format!("stat {}", p.display()), e))
}

fn open_checked(p: &Path) -> Result<File> {
    open_regular(p, false).map_err(|e| Error::io(format!("opening {}", p.display()), e))
}

impl QemuMachine {
    fn new(vm: Vm, program: PathBuf, home: Home) -> QemuMachine {
        QemuMachine {
            vm,
            program,
            home,
            sealed: false,
        }
    }

    /// The VM underneath.
    pub fn vm(&mut self) -> &mut Vm {
        &mut self.vm
    }

    /// The QEMU program it runs.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Ends QEMU.
    pub fn quit(self) -> Result<()> {
        self.vm.quit()
    }

    /// Suspends into `w`: device state into `state.bin`; memory, disks,
    /// kernel and initrd are the files already in `w` (the machine runs on
    /// them) or copied there while the VM is paused; digests; commit. The
    /// machine stays paused.
    pub(crate) fn suspend_into_inner(&mut self, w: VmDirWriter, name: &str) -> Result<PathBuf> {
        let dir = w.path().to_path_buf();
        let state_name = file_name(Kind::State, 0);
        let state = w.create_file(&state_name)?;
        self.vm.save_state(&state)?;
        drop(state);
        let cfg = self.vm.config().clone();
        let (mem, _) = self.vm.memory_file();
        let mut sources: Vec<(Kind, usize, PathBuf)> = vec![(Kind::Memory, 0, mem.to_path_buf())];
        sources.extend(
            cfg.disks
                .iter()
                .enumerate()
                .map(|(i, d)| (Kind::Disk, i, d.clone())),
        );
        sources.push((Kind::Kernel, 0, cfg.kernel.clone()));
        if let Some(i) = &cfg.initrd {
            sources.push((Kind::Initrd, 0, i.clone()));
        }
        let mut components = Vec::new();
        let mut own_memory = false;
        for (kind, i, src) in sources {
            let name = file_name(kind, i);
            let dst = dir.join(&name);
            let s = open_checked(&src)?;
            let s_meta = stat(&s, &src)?;
            let in_place = occupied(&dst) && same_file(&stat(&open_checked(&dst)?, &dst)?, &s_meta);
            if !in_place {
                let d = w.create_file(&name)?;
                copy_sparse(&s, s_meta.len(), &d, |_, _| Ok(()))?;
            } else if kind == Kind::Memory {
                own_memory = true;
            }
            components.push(Component {
                kind,
                size: s_meta.len(),
                digest: [0; 32],
                trimmed: false,
            });
        }
        let state_len = stat(
            &open_checked(&dir.join(&state_name))?,
            &dir.join(&state_name),
        )?
        .len();
        components.push(Component {
            kind: Kind::State,
            size: state_len,
            digest: [0; 32],
            trimmed: false,
        });
        let mut manifest = Manifest {
            name: name.to_string(),
            vcpus: cfg.vcpus,
            components,
            machine: Some(Box::new(cfg.spec(&self.vm.version().to_string()))),
        };
        // Written pages start going to disk now, while they are digested
        // (from the page cache): the commit's fsync then waits for less.
        let files = (0..manifest.components.len())
            .map(|i| {
                let p = dir.join(manifest.file_name(i));
                let f = open_checked(&p)?;
                kimberley_formats::sys::file::start_writeback(f.as_raw_fd());
                Ok((p, f))
            })
            .collect::<Result<Vec<_>>>()?;
        // Every component at once (each also hashes its blocks in
        // parallel): a large memory file does not wait for the disks.
        let digests = files
            .par_iter()
            .zip(manifest.components.par_iter())
            .map(|((p, f), c)| {
                digest_file(f, c.size).map_err(|e| Error::io(format!("reading {}", p.display()), e))
            })
            .collect::<Result<Vec<_>>>()?;
        for (c, d) in manifest.components.iter_mut().zip(digests) {
            c.digest = d;
        }
        let path = w.commit(&manifest)?;
        if own_memory {
            self.sealed = true;
        }
        Ok(path)
    }

    fn suspend_in_place_inner(&mut self, dir: &VmDir) -> Result<PathBuf> {
        match &self.home {
            Home::InPlace(p) if p == &dir.path => {}
            _ => {
                return Err(Error::Unsupported(format!(
                    "the machine does not run in place in {}",
                    dir.path.display()
                )))
            }
        }
        let w = VmDirWriter::replacing(&dir.path)?;
        for (i, c) in dir.manifest.components.iter().enumerate() {
            if c.kind == Kind::State {
                continue;
            }
            let src = dir.component_path(i);
            let dst = w.path().join(dir.manifest.file_name(i));
            // link(2) does not follow a symbolic link: one planted in place
            // of a component is linked as a link and refused below.
            std::fs::hard_link(&src, &dst)
                .map_err(|e| Error::io(format!("linking {}", src.display()), e))?;
        }
        let name = dir.manifest.name.clone();
        self.suspend_into_inner(w, &name)
    }

    fn agent_ready(&mut self) -> Result<()> {
        if self.vm.is_paused() {
            return Err(Error::Unsupported("the VM is paused".into()));
        }
        if let Some(why) = self.vm.exited() {
            return Err(Error::GuestStopped(why));
        }
        Ok(())
    }

    fn guest_error(&mut self, e: Error) -> Error {
        match e {
            // The connection closed: QEMU may be on its way out.
            e @ Error::AgentIo { .. } => match self.vm.exited_within(Duration::from_secs(3)) {
                Some(why) => Error::GuestStopped(why),
                None => e,
            },
            e @ Error::Timeout { .. } => match self.vm.exited() {
                Some(why) => Error::GuestStopped(why),
                None => e,
            },
            e => e,
        }
    }
}

impl GuestAgent for QemuMachine {
    fn ping(&mut self, timeout: Duration) -> MResult<()> {
        if self.vm.is_paused() {
            return Err(kimberley_machine::Error::Paused);
        }
        self.agent_ready()?;
        let r = self.vm.wait_agent(timeout).map_err(|e| self.guest_error(e));
        Ok(r?)
    }

    fn run_script(
        &mut self,
        script: &str,
        on_line: &mut dyn FnMut(&str),
        timeout: Duration,
    ) -> MResult<ScriptOutcome> {
        if self.vm.is_paused() {
            return Err(kimberley_machine::Error::Paused);
        }
        self.agent_ready()?;
        match self.vm.agent().exec(script, on_line, timeout) {
            Ok(o) => Ok(ScriptOutcome {
                status: o.status,
                lines: o.lines,
            }),
            Err(e) => Err(self.guest_error(e).into()),
        }
    }

    fn reclaim(&mut self, what: Reclaim, timeout: Duration) -> MResult<Reclaimed> {
        if self.vm.is_paused() {
            return Err(kimberley_machine::Error::Paused);
        }
        self.agent_ready()?;
        match self
            .vm
            .agent()
            .exec(&crate::reclaim::script(what), &mut |_| {}, timeout)
        {
            Ok(o) => Ok(crate::reclaim::parse(&o.lines, o.status)),
            Err(e) => Err(self.guest_error(e).into()),
        }
    }
}

impl Machine for QemuMachine {
    fn info(&self) -> MachineInfo {
        let cfg = self.vm.config();
        MachineInfo {
            backend: BACKEND,
            memory_size: cfg.memory_size,
            vcpus: cfg.vcpus,
            disks: cfg.disks.clone(),
            uptime: self.vm.uptime(),
            ready: self.vm.is_ready(),
            exited: self.vm.exited_as_seen(),
        }
    }

    fn pause(&mut self) -> MResult<()> {
        Ok(self.vm.pause()?)
    }

    fn resume(&mut self) -> MResult<()> {
        if self.sealed {
            return Err(kimberley_machine::Error::Unsupported(
                "the machine was suspended into the directory it runs on: it cannot run again"
                    .into(),
            ));
        }
        Ok(self.vm.resume()?)
    }

    fn is_paused(&self) -> bool {
        self.vm.is_paused()
    }

    fn agent(&mut self) -> &mut dyn GuestAgent {
        self
    }

    fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        self.vm.set_interrupt(flag)
    }

    fn take_console_lines(&mut self) -> Vec<String> {
        self.vm.serial_lines()
    }

    fn first_run(&self) -> Option<Instant> {
        self.vm.first_run()
    }

    fn suspend_into(&mut self, w: VmDirWriter, name: &str) -> MResult<PathBuf> {
        Ok(self.suspend_into_inner(w, name)?)
    }

    fn suspend_in_place(&mut self, dir: &VmDir) -> MResult<PathBuf> {
        Ok(self.suspend_in_place_inner(dir)?)
    }

    fn stream_migratable(&mut self) -> Option<&mut dyn kimberley_machine::StreamMigratable> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_parse() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)\nCopyright"),
            Some((7, 2, 19))
        );
        assert_eq!(
            parse_version("QEMU emulator version 10.0"),
            Some((10, 0, 0))
        );
        assert_eq!(parse_version("version 7.2.19"), Some((7, 2, 19)));
        assert_eq!(parse_version("nothing"), None);
    }
}
