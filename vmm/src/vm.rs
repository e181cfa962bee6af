//! `Vm`: boot, restore, scripts, pause/resume, save, dirty tracking.

use std::os::unix::thread::JoinHandleExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::abi::{self, BootInfo};
use crate::devices::serial::{SerialDevice, SerialDeviceState};
use crate::devices::virtio_blk::DiskGate;
use crate::devices::virtio_blk::{BlockState, VirtioBlk};
use crate::error::{Error, Result};
use crate::persist::{self, Codec, Persist, Reader, Writer};
use crate::runner::{self, lock, Inner, Request, RunState, Shared};
use crate::vstate::canonical::{self, ClockOrigin, Clocks};
use crate::vstate::lazy::{ArrivingSource, FileSource};
use crate::vstate::memory::{self, Memory};
use crate::vstate::vcpu::{self, Vcpu, VcpuState};
use crate::vstate::vm::{KvmVm, VmKvmState};
use crate::{arch, loader, ScriptOutcome, VmConfig};
use kimberley_formats::apply::early::Early;
use kimberley_formats::sys::lock::{self, Mode};
use kimberley_formats::vmdir::patched::{Patches, Piece};
use kimberley_machine::{Bitmap, MemorySource};
use std::fs::File;

const TAG_VM: u32 = 1;
const TAG_VCPU: u32 = 2;
const TAG_SERIAL: u32 = 3;
const TAG_BLOCK: u32 = 4;
/// Most script output (bytes of lines) [`Vm::run_script`] keeps.
pub const MAX_SCRIPT_OUTPUT: usize = 16 << 20;
/// Largest partial output line kept in a state blob.
const MAX_PARTIAL_LINE: usize = 64 * 1024;
/// Guest memory is a whole number of 2 MiB pages (docs/VMM.md).
pub const MEMORY_ALIGN: u64 = 2 << 20;

/// A file for [`Vm::restore_opened`]: opened by the caller, with the path
/// that names it (in messages and [`Vm::disk_paths`]).
#[derive(Debug)]
pub struct OpenedFile {
    /// The open file: readable (memory) or readable and writable (a disk).
    pub file: std::fs::File,
    /// Where it was opened.
    pub path: PathBuf,
}

/// The embedded test guest (built by build.rs).
pub static GUEST_ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/kimberley-guest"));

/// A line no script prints by accident: `kimberley-sync PID-NANOS-N`.
fn sync_marker() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "kimberley-sync {}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// A running (or paused) microVM.
pub struct Vm {
    kvm: KvmVm,
    memory: Memory,
    shared: Arc<Shared>,
    vcpus: Vec<Arc<Mutex<Vcpu>>>,
    thread: Option<JoinHandle<()>>,
    disks: Vec<PathBuf>,
    tsc_khz: u32,
    started: Instant,
    ticker: Option<JoinHandle<()>>,
    /// The clocks it was restored with (None for a booted VM).
    clock_origin: Option<ClockOrigin>,
    /// The next save writes canonical state ([`Vm::pause_reproducibly`]).
    canonical_save: bool,
    /// The memory file mapped copy-on-write and its block hashes, when the
    /// VM was restored from a VMDIR that way (`vmdir::restore`).
    origin: Option<crate::vstate::origin::Origin>,
    /// The memory file restored from, opened anew and holding a shared
    /// lock while the VM lives (None for a booted VM).
    memory_lock: Option<std::fs::File>,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("memory_size", &self.memory.size())
            .field("vcpus", &self.vcpus.len())
            .field("disks", &self.disks)
            .finish()
    }
}

/// Everything in a state blob, decoded.
struct Snapshot {
    memory_size: u64,
    tsc_khz: u32,
    ready: bool,
    needs_sync: bool,
    partial_line: Vec<u8>,
    kvm: VmKvmState,
    vcpus: Vec<VcpuState>,
    serial: SerialDeviceState,
    blocks: Vec<BlockState>,
}

fn check_vcpus(kvm: &KvmVm, n: u8) -> Result<()> {
    let max = kvm.kvm.get_nr_vcpus().max(1);
    if n == 0 || n as usize > max {
        return Err(Error::Config(format!(
            "{n} vCPUs requested, this host allows 1 to {max}"
        )));
    }
    Ok(())
}

fn msr_list(kvm: &KvmVm) -> Result<Vec<u32>> {
    Ok(kvm
        .kvm
        .get_msr_index_list()
        .map_err(|e| Error::Kvm("GET_MSR_INDEX_LIST", e))?
        .as_slice()
        .to_vec())
}

impl Vm {
    /// Boots a fresh test guest in anonymous memory. vCPU 0 runs the guest;
    /// further vCPUs are created but stay in the wait-for-SIPI state.
    pub fn boot(cfg: &VmConfig) -> Result<Vm> {
        if cfg.disks.len() > abi::MAX_DISKS {
            return Err(Error::Config(format!("at most {} disks", abi::MAX_DISKS)));
        }
        runner::install_kick_handler();
        let mut kvm = KvmVm::new()?;
        check_vcpus(&kvm, cfg.vcpus)?;
        let memory = Memory::anonymous(cfg.memory_size)?;
        kvm.set_memory(&memory)?;

        let image = loader::load(GUEST_ELF, &memory)?;
        arch::write_page_tables(&memory)?;
        arch::write_gdt(&memory)?;

        let supported = kvm
            .kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("GET_SUPPORTED_CPUID", e))?;
        let msrs = msr_list(&kvm)?;
        let mut vcpus = Vec::new();
        for i in 0..cfg.vcpus {
            let fd = kvm
                .fd
                .create_vcpu(i as u64)
                .map_err(|e| Error::Kvm("CREATE_VCPU", e))?;
            fd.set_cpuid2(&vcpu::cpuid_for(&supported, i)?)
                .map_err(|e| Error::Kvm("SET_CPUID2", e))?;
            let v = Vcpu {
                fd,
                index: i,
                msr_list: msrs.clone(),
            };
            if i == 0 {
                v.setup_boot(image.entry)?;
            }
            v.set_tsc(canonical::BOOT_TSC)?;
            vcpus.push(v);
        }
        let tsc_khz = vcpus[0].fd.get_tsc_khz().unwrap_or(0);
        kvm.set_clock(0)?;
        let origin = ClockOrigin {
            clock_ns: 0,
            tsc: vec![Some(canonical::BOOT_TSC); vcpus.len()],
            tsc_khz,
        };

        let mut blocks = Vec::new();
        for p in &cfg.disks {
            blocks.push(VirtioBlk::open(p, memory.clone())?);
        }
        let mut disk_mmio = [0u64; abi::MAX_DISKS];
        for (i, a) in disk_mmio.iter_mut().enumerate().take(blocks.len()) {
            *a = abi::VIRTIO_MMIO_BASE + i as u64 * abi::VIRTIO_MMIO_SIZE;
        }
        let heap_start = image.end.div_ceil(2 << 20) * (2 << 20);
        if heap_start >= cfg.memory_size {
            return Err(Error::Config("memory too small for the guest image".into()));
        }
        arch::write_boot_info(
            &memory,
            &BootInfo {
                magic: abi::BOOT_MAGIC,
                abi_version: abi::ABI_VERSION,
                vcpu_count: cfg.vcpus as u32,
                memory_size: cfg.memory_size,
                tsc_khz: tsc_khz as u64,
                heap_start,
                heap_end: cfg.memory_size,
                serial_port: abi::SERIAL_PORT as u32,
                disk_count: blocks.len() as u32,
                disk_mmio,
            },
        )?;
        let mut vm = Self::start(
            kvm,
            memory,
            vcpus,
            SerialDevice::default(),
            blocks,
            cfg.disks.clone(),
            tsc_khz,
            (false, false),
            Vec::new(),
        );
        vm.clock_origin = Some(origin);
        Ok(vm)
    }

    #[allow(clippy::too_many_arguments)]
    fn start(
        kvm: KvmVm,
        memory: Memory,
        vcpus: Vec<Vcpu>,
        serial: SerialDevice,
        blocks: Vec<VirtioBlk>,
        disks: Vec<PathBuf>,
        tsc_khz: u32,
        (ready, needs_sync): (bool, bool),
        partial_line: Vec<u8>,
    ) -> Vm {
        let mut inner = Inner::new(serial, ready);
        inner.out_line = partial_line;
        inner.needs_sync = needs_sync;
        let shared = Arc::new(Shared {
            inner: Mutex::new(inner),
            cond: Condvar::new(),
            blocks: Mutex::new(blocks),
            throttle: AtomicU32::new(0),
        });
        let vcpus: Vec<_> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
        let (s, v0) = (shared.clone(), vcpus[0].clone());
        let thread = std::thread::Builder::new()
            .name("vcpu0".into())
            .spawn(move || runner::vcpu_thread(s, v0))
            .ok();
        if thread.is_none() {
            let mut g = lock(&shared.inner);
            g.state = RunState::Exited;
            g.exit = Some(runner::GuestExit::Other(
                "cannot spawn the vCPU thread".into(),
            ));
        }
        if let Some(t) = &thread {
            let (s, tid) = (shared.clone(), t.as_pthread_t());
            memory.on_lazy_error(Box::new(move |why| {
                let mut g = lock(&s.inner);
                if g.state == RunState::Exited {
                    return;
                }
                g.exit
                    .get_or_insert_with(|| runner::GuestExit::Other(why.to_string()));
                g.request = Request::Exit;
                s.cond.notify_all();
                // SAFETY: the vCPU thread has not exited (it sets Exited
                // under this lock before it ends, and is joined only after),
                // so `tid` names a live thread; the kick handler is
                // installed. The signal makes KVM_RUN return as soon as the
                // waiting access is let go, before the guest runs on.
                unsafe { libc::pthread_kill(tid, runner::kick_signal()) };
            }));
        }
        Vm {
            kvm,
            memory,
            shared,
            vcpus,
            thread,
            disks,
            tsc_khz,
            started: Instant::now(),
            ticker: None,
            clock_origin: None,
            canonical_save: false,
            origin: None,
            memory_lock: None,
        }
    }

    /// Restores a VM from a memory file (mapped MAP_PRIVATE: lazy,
    /// copy-on-write), its disks (in the order they were saved) and a state
    /// blob from [`Vm::save`]. The VM is running when this returns.
    ///
    /// Each path must name a regular file, not a symbolic link (opened with
    /// `kimberley_formats::fsutil::open_regular`), and is opened once; see
    /// [`Vm::restore_opened`] to pass files already opened and checked.
    pub fn restore(memory: &Path, disks: Vec<PathBuf>, state: &[u8]) -> Result<Vm> {
        let open = |path: &Path, write: bool, what: &str| -> Result<OpenedFile> {
            let file = kimberley_formats::fsutil::open_regular(path, write)
                .map_err(|e| Error::io(format!("open {what} {}", path.display()), e))?;
            Ok(OpenedFile {
                file,
                path: path.to_path_buf(),
            })
        };
        let memory = open(memory, false, "memory file")?;
        let disks = disks
            .iter()
            .map(|p| open(p, true, "disk"))
            .collect::<Result<Vec<_>>>()?;
        Self::restore_opened(memory, disks, state)
    }

    /// [`Vm::restore`] from files the caller opened and checked (e.g.
    /// through `VmDir::open_component` for the memory and
    /// `VmDir::open_component_rw` for the disks): the VM maps and writes
    /// exactly these files and never opens a path. Sizes come from the
    /// files; each must be a regular file.
    pub fn restore_opened(memory: OpenedFile, disks: Vec<OpenedFile>, state: &[u8]) -> Result<Vm> {
        Self::restore_opened_as(memory, disks, state, MemorySource::PrivateFileMap)
    }

    /// [`Vm::restore_opened`], its memory brought in as `source` says:
    /// mapped copy-on-write, or served on first touch through userfaultfd
    /// from the memory file ([`crate::vstate::lazy`]).
    pub fn restore_opened_as(
        memory: OpenedFile,
        disks: Vec<OpenedFile>,
        state: &[u8],
        source: MemorySource,
    ) -> Result<Vm> {
        Self::restore_patched(memory, disks, state, source, None)
    }

    /// [`Vm::restore_opened_as`] with `memory_patches` written over guest
    /// memory before the vCPUs start (a chain's launch VM held as its base
    /// plus in-memory changes: `kimberlize build --parent`).
    pub fn restore_patched(
        memory: OpenedFile,
        disks: Vec<OpenedFile>,
        state: &[u8],
        source: MemorySource,
        memory_patches: Option<&Patches>,
    ) -> Result<Vm> {
        let snap = decode_snapshot(state)?;
        check_disk_count(disks.iter().map(|d| &d.path), &snap)?;
        runner::install_kick_handler();
        // A shared lock for as long as the VM lives (it maps or reads the
        // memory file): a suspend in place updates the file only when no
        // other VM holds it (`vmdir::save_in_place`). It is taken on an
        // open file description of its own, kept in `memory_lock`: the
        // caller's descriptor may be a duplicate another VM's restore
        // shares (e.g. from the same `VmDir`), and duplicates share a lock.
        // Without /proc the caller's descriptor is locked instead, and
        // this VM never updates the file in place (no `memory_lock`).
        let locking = |e| Error::io(format!("locking {}", memory.path.display()), e);
        let memory_lock = match lock::reopen(&memory.file) {
            Ok(f) => {
                lock::flock(&f, Mode::Shared, true).map_err(locking)?;
                Some(f)
            }
            Err(_) => {
                lock::flock(&memory.file, Mode::Shared, true).map_err(locking)?;
                None
            }
        };
        let kvm = KvmVm::new()?;
        check_vcpus(&kvm, snap.vcpus.len() as u8)?;
        let mem = match source {
            MemorySource::PrivateFileMap => {
                Memory::private_file(memory.file, &memory.path, snap.memory_size)?
            }
            MemorySource::Lazy | MemorySource::LazyRecording => {
                Memory::check_file(&memory.file, &memory.path, snap.memory_size)?;
                let pages = Arc::new(FileSource::new(memory.file, snap.memory_size));
                if source == MemorySource::Lazy {
                    Memory::lazy(snap.memory_size, pages)?
                } else {
                    Memory::lazy_recording(snap.memory_size, pages)?
                }
            }
        };
        if let Some(p) = memory_patches {
            write_patches(&mem, p)?;
        }
        let disks = disks.into_iter().map(|d| (d, None)).collect();
        Self::restore_on(kvm, mem, disks, &snap, memory_lock)
    }

    /// Restores a launch VM whose overlay is still being applied
    /// ([`Early`]): its state blob is `state`, its memory is served on first
    /// touch from what has arrived ([`ArrivingSource`]), and each disk
    /// (the apply's own output file) waits on its gate before the guest's
    /// first request to it. Nothing locks a memory file (there is none
    /// yet): a later suspend writes the memory whole.
    pub fn restore_arriving(
        early: Early,
        disks: Vec<(OpenedFile, DiskGate)>,
        state: &[u8],
    ) -> Result<Vm> {
        let snap = decode_snapshot(state)?;
        check_disk_count(disks.iter().map(|d| &d.0.path), &snap)?;
        let memory_size = early.components().first().map_or(0, |c| c.size);
        if memory_size != snap.memory_size {
            return Err(Error::StateMismatch(
                PathBuf::from("memory"),
                format!(
                    "the launch memory is {memory_size} bytes, the state says {}",
                    snap.memory_size
                ),
            ));
        }
        runner::install_kick_handler();
        let kvm = KvmVm::new()?;
        check_vcpus(&kvm, snap.vcpus.len() as u8)?;
        let mem = Memory::lazy(snap.memory_size, Arc::new(ArrivingSource::new(early)))?;
        let disks = disks.into_iter().map(|(d, g)| (d, Some(g))).collect();
        Self::restore_on(kvm, mem, disks, &snap, None)
    }

    /// The common end of a restore: `mem` holds (or serves) guest memory.
    fn restore_on(
        mut kvm: KvmVm,
        mem: Memory,
        disks: Vec<(OpenedFile, Option<DiskGate>)>,
        snap: &Snapshot,
        memory_lock: Option<File>,
    ) -> Result<Vm> {
        kvm.set_memory(&mem)?;
        let msrs = msr_list(&kvm)?;
        let mut vcpus = Vec::new();
        for s in &snap.vcpus {
            let fd = kvm
                .fd
                .create_vcpu(s.index as u64)
                .map_err(|e| Error::Kvm("CREATE_VCPU", e))?;
            vcpus.push(Vcpu::restore((fd, msrs.clone()), s)?);
        }
        kvm.restore_state(&snap.kvm)?;
        let serial = SerialDevice::restore((), &snap.serial)?;
        let mut blocks = Vec::new();
        let mut paths = Vec::new();
        for ((d, gate), s) in disks.into_iter().zip(&snap.blocks) {
            paths.push(d.path.clone());
            let mut dev = VirtioBlk::restore((d.file, d.path, mem.clone()), s)?;
            if let Some(g) = gate {
                dev.set_gate(g);
            }
            blocks.push(dev);
        }
        let origin = ClockOrigin {
            clock_ns: snap.kvm.clock.clock,
            tsc: snap.vcpus.iter().map(VcpuState::tsc).collect(),
            tsc_khz: snap.tsc_khz,
        };
        let mut vm = Self::start(
            kvm,
            mem,
            vcpus,
            serial,
            blocks,
            paths,
            snap.tsc_khz,
            (snap.ready, snap.needs_sync),
            snap.partial_line.clone(),
        );
        vm.clock_origin = Some(origin);
        vm.memory_lock = memory_lock;
        Ok(vm)
    }

    /// Makes every wait of this VM ([`Vm::wait_ready`], [`Vm::run_script`],
    /// [`Vm::wait_first_exit`]) end with [`Error::Interrupted`] within
    /// about 20 ms of `flag` becoming true (e.g. the stop flag of
    /// [`crate::stop_on_signals`]), so SIGINT/SIGTERM is not held up by a
    /// long or hung script. A script cut short keeps running in the guest.
    /// [`Vm::pause`] is not interrupted: it is how a stop takes effect.
    pub fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        lock(&self.shared.inner).interrupt = Some(flag);
        self.shared.cond.notify_all();
    }

    /// Waits until the guest signalled it is ready for commands.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        self.shared.wait_for(timeout, |g| g.ready.then_some(Ok(())))
    }

    /// Sends `script` to the guest and collects its output until `done N`.
    /// `on_line` sees each output line as it arrives. A script error is
    /// reported in `ScriptOutcome::status`, not as `Err`.
    ///
    /// A script cut short earlier (timeout, interrupt, even before a
    /// save and restore) still runs in the guest and ends with its own
    /// `done`. So that its output is not taken for this script's, the
    /// script is preceded by a one-line sync script, `print` of a marker
    /// unique to this call: output up to the marker and the sync script's
    /// own `done` is dropped.
    pub fn run_script(
        &mut self,
        script: &str,
        on_line: &mut dyn FnMut(&str),
        timeout: Duration,
    ) -> Result<ScriptOutcome> {
        if script.as_bytes().contains(&abi::SCRIPT_END) {
            return Err(Error::Script(
                "contains byte 0x04 (the end-of-script marker)".into(),
            ));
        }
        let marker = sync_marker();
        let sync;
        {
            let mut g = lock(&self.shared.inner);
            if let Some(e) = &g.exit {
                return Err(e.to_error());
            }
            if g.request != Request::Run {
                return Err(Error::Paused);
            }
            if g.interrupted() {
                return Err(Error::Interrupted);
            }
            g.lines.clear();
            // After a script that was cut short (it may still print in the
            // guest), a marker script first: what comes before its line is
            // the old script's.
            sync = g.needs_sync;
            let mut bytes = Vec::new();
            if sync {
                bytes.extend_from_slice(format!("print {marker}\n").as_bytes());
                bytes.push(abi::SCRIPT_END);
            }
            bytes.extend_from_slice(script.as_bytes());
            if !script.is_empty() && !script.ends_with('\n') {
                bytes.push(b'\n');
            }
            bytes.push(abi::SCRIPT_END);
            g.serial.push_input(&bytes);
        }
        self.shared.cond.notify_all();
        let mut lines = Vec::new();
        let (mut kept, mut dropped) = (0usize, 0u64);
        // Before the marker: leftovers; right after it: the sync's `done`.
        let (mut synced, mut sync_done) = (!sync, !sync);
        let r = self.shared.wait_for(timeout, |g| {
            while let Some(l) = g.lines.pop_front() {
                if !synced {
                    synced = l == marker;
                    continue;
                }
                let done = l
                    .strip_prefix("done ")
                    .and_then(|s| s.trim().parse::<i32>().ok());
                if !sync_done {
                    sync_done = done.is_some();
                    continue;
                }
                if let Some(status) = done {
                    g.needs_sync = false;
                    return Some(Ok(ScriptOutcome {
                        status,
                        lines: std::mem::take(&mut lines),
                    }));
                }
                on_line(&l);
                // A guest printing without end cannot make the host hold
                // it all: past the cap, lines are counted, not kept.
                if kept < MAX_SCRIPT_OUTPUT {
                    kept += l.len() + 1;
                    lines.push(l);
                } else {
                    dropped += 1;
                    if dropped == 1 {
                        lines.push(format!(
                            "[output over {MAX_SCRIPT_OUTPUT} bytes: further lines dropped]"
                        ));
                    }
                }
            }
            None
        });
        if r.is_err() {
            // Cut short: the script may go on in the guest.
            lock(&self.shared.inner).needs_sync = true;
        }
        r
    }

    /// Output lines the guest printed outside of scripts (drained).
    pub fn take_console_lines(&mut self) -> Vec<String> {
        lock(&self.shared.inner).lines.drain(..).collect()
    }

    fn kick(&self) {
        if let Some(t) = &self.thread {
            // SAFETY: the pthread_t belongs to a thread we own and have not
            // joined; the signal's handler is installed (install_kick_handler).
            unsafe { libc::pthread_kill(t.as_pthread_t(), runner::kick_signal()) };
        }
    }

    /// Stops the vCPU (completing in-flight I/O) and waits until it is parked.
    pub fn pause(&mut self) -> Result<()> {
        {
            let mut g = lock(&self.shared.inner);
            if g.state == RunState::Exited {
                return Ok(());
            }
            g.request = Request::Pause;
            self.shared.cond.notify_all();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            self.kick();
            let g = lock(&self.shared.inner);
            if matches!(g.state, RunState::Paused | RunState::Exited) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(Duration::from_secs(10)));
            }
            let _ = self.shared.cond.wait_timeout(g, Duration::from_millis(5));
        }
    }

    /// Pauses the guest where it waits for commands, for a suspend that
    /// equal runs save identically: the vCPU stops at the same instruction
    /// with the same registers and stack, and the next save writes canonical
    /// clocks (see [`crate::vstate::canonical`]) instead of the time the guest
    /// ran. Waits up to `timeout` for the guest to be idle; one with
    /// background work (`counter start`, `dirty`) never is, and is paused
    /// where it runs: returns whether it was idle.
    pub fn pause_reproducibly(&mut self, timeout: Duration) -> Result<bool> {
        let idle = self.shared.wait_for(timeout, |g| {
            if g.state == RunState::Exited {
                return Some(Ok(false));
            }
            if g.request != Request::Run {
                // Already paused or pausing: wherever it stopped.
                return Some(Ok(g.state == RunState::Paused && g.idle));
            }
            // Under the lock the vCPU thread waits in its idle exit; it
            // leaves that wait only for input (none: no script runs) or for
            // this request, and parks before it enters the guest again.
            g.idle.then(|| {
                g.request = Request::Pause;
                Ok(true)
            })
        });
        self.shared.cond.notify_all();
        let idle = match idle {
            Ok(i) => i,
            Err(Error::Timeout(_)) => false,
            Err(e) => return Err(e),
        };
        self.pause()?;
        self.canonical_save = true;
        Ok(idle)
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&mut self) -> Result<()> {
        self.canonical_save = false;
        let mut g = lock(&self.shared.inner);
        if let Some(e) = &g.exit {
            return Err(e.to_error());
        }
        g.request = Request::Run;
        self.shared.cond.notify_all();
        Ok(())
    }

    /// True if paused (or asked to pause).
    pub fn is_paused(&self) -> bool {
        lock(&self.shared.inner).request == Request::Pause
    }

    /// Why the guest stopped on its own, if it did.
    pub fn exit_error(&self) -> Option<Error> {
        if let Some(e) = lock(&self.shared.inner).exit.as_ref() {
            return Some(e.to_error());
        }
        // A guest waiting on a page that cannot be served is stopped too.
        self.memory.lazy_error().map(Error::Memory)
    }

    /// The guest-physical pages first touched since the restore, in order
    /// (None unless restored with [`MemorySource::LazyRecording`]).
    pub fn touched_pages(&self) -> Option<Vec<u64>> {
        self.memory.touched()
    }

    /// How lazily restored memory was served so far (None unless restored
    /// with [`MemorySource::Lazy`]).
    pub fn lazy_stats(&self) -> Option<crate::vstate::lazy::LazyStats> {
        self.memory.lazy_stats()
    }

    /// True once the guest reported ready.
    pub fn is_ready(&self) -> bool {
        lock(&self.shared.inner).ready
    }

    /// Time since this `Vm` was created (booted or restored).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// When this `Vm` object was created.
    pub fn started_at(&self) -> Instant {
        self.started
    }

    /// When the vCPU thread first entered KVM_RUN (None until it has).
    pub fn first_entry(&self) -> Option<Instant> {
        lock(&self.shared.inner).first_entry
    }

    /// When KVM_RUN first returned, i.e. the guest executed up to its first exit.
    pub fn first_exit(&self) -> Option<Instant> {
        lock(&self.shared.inner).first_exit
    }

    /// Waits for [`Vm::first_exit`] to be set.
    pub fn wait_first_exit(&self, timeout: Duration) -> Result<Instant> {
        self.shared.wait_for(timeout, |g| g.first_exit.map(Ok))
    }

    /// Guest RAM in bytes.
    pub fn memory_size(&self) -> u64 {
        self.memory.size() as u64
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> u8 {
        self.vcpus.len() as u8
    }

    /// Guest TSC frequency in kHz.
    pub fn tsc_khz(&self) -> u32 {
        self.tsc_khz
    }

    /// Paths of the disks, in device order.
    pub fn disk_paths(&self) -> &[PathBuf] {
        &self.disks
    }

    /// Guest memory (for migration tools).
    pub fn memory(&self) -> &Memory {
        &self.memory
    }

    /// Records where the VM's memory is mapped copy-on-write from (see
    /// [`crate::vstate::origin::Origin`]).
    pub(crate) fn set_origin(&mut self, o: crate::vstate::origin::Origin) {
        self.origin = Some(o);
    }

    /// The memory file's description holding the VM's shared lock.
    pub(crate) fn memory_lock(&self) -> Option<&std::fs::File> {
        self.memory_lock.as_ref()
    }

    /// The memory file the VM's memory is mapped from, if recorded.
    pub(crate) fn origin_mut(&mut self) -> Option<&mut crate::vstate::origin::Origin> {
        self.origin.as_mut()
    }

    /// Guest memory and the file it is mapped from, if recorded.
    pub(crate) fn memory_and_origin(
        &mut self,
    ) -> (&Memory, Option<&mut crate::vstate::origin::Origin>) {
        (&self.memory, self.origin.as_mut())
    }

    /// Whether the memory file's block hashes are ready (a suspend then
    /// rehashes only the blocks the VM wrote; otherwise it waits for
    /// them). False when the VM has no recorded memory file.
    pub fn memory_hashed(&self) -> bool {
        self.origin.as_ref().is_some_and(|o| o.hashed())
    }

    /// Turns dirty-page logging on or off. Turning it on clears the
    /// devices' own dirty bitmaps.
    pub fn set_dirty_logging(&mut self, on: bool) -> Result<()> {
        self.kvm.set_dirty_logging(on)?;
        if on {
            for b in lock(&self.shared.blocks).iter_mut() {
                b.take_dirty_pages();
            }
        }
        Ok(())
    }

    /// Pages (4 KiB) written since the last call: KVM's log ORed with the
    /// pages devices wrote (fetch-and-clear). Logging must be on.
    pub fn dirty_pages(&mut self) -> Result<Bitmap> {
        let mut bm = self.kvm.dirty_log()?;
        for b in lock(&self.shared.blocks).iter_mut() {
            bm.or(&b.take_dirty_pages());
        }
        Ok(bm)
    }

    /// 4 KiB blocks of disk `disk` the guest wrote since the last call
    /// (fetch-and-clear; always tracked).
    pub fn dirty_disk_blocks(&mut self, disk: usize) -> Result<Bitmap> {
        lock(&self.shared.blocks)
            .get_mut(disk)
            .map(|b| b.take_dirty_blocks())
            .ok_or(Error::NoSuchDisk(disk))
    }

    /// Throttles vCPU 0 to run only `100 - pct` percent of the time (0 turns
    /// throttling off; at most 99): it runs 10 ms slices and sleeps
    /// `pct / (100 - pct)` of a slice after each (auto-converge for live
    /// migration). A ticker thread kicks the vCPU out of KVM_RUN every slice
    /// while a throttle is set.
    pub fn set_throttle(&mut self, pct: u32) {
        let pct = pct.min(runner::MAX_THROTTLE);
        self.shared.throttle.store(pct, Ordering::SeqCst);
        self.shared.cond.notify_all();
        if pct == 0 {
            if let Some(t) = self.ticker.take() {
                let _ = t.join();
            }
            return;
        }
        if self.ticker.is_some() {
            return;
        }
        let Some(thread) = &self.thread else { return };
        let pthread = thread.as_pthread_t();
        let shared = self.shared.clone();
        self.ticker = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while shared.throttle.load(Ordering::SeqCst) > 0 {
                    if lock(&shared.inner).state == RunState::Exited {
                        break;
                    }
                    // SAFETY: the vCPU thread is joined only after this
                    // ticker (set_throttle(0) and Drop join the ticker
                    // first), so the pthread_t is valid.
                    unsafe { libc::pthread_kill(pthread, runner::kick_signal()) };
                    std::thread::sleep(runner::THROTTLE_SLICE);
                }
            })
            .ok();
    }

    /// The current throttle in percent.
    pub fn throttle(&self) -> u32 {
        self.shared.throttle.load(Ordering::SeqCst)
    }

    /// Tells the VM its disks now live under new paths (the same files,
    /// moved or renamed while open, e.g. when a received VM directory is
    /// renamed into place). The devices keep their open files.
    pub fn relocate_disks(&mut self, paths: Vec<PathBuf>) -> Result<()> {
        if paths.len() != self.disks.len() {
            return Err(Error::Config(format!(
                "{} disk paths for {} disks",
                paths.len(),
                self.disks.len()
            )));
        }
        self.disks = paths;
        Ok(())
    }

    /// Pauses, flushes the disks, writes guest memory to `memory_out`
    /// (sparse: zero pages are holes) and returns the state blob. The VM
    /// stays paused; call [`Vm::resume`] to continue.
    pub fn save(&mut self, memory_out: &Path) -> Result<Vec<u8>> {
        let blob = self.save_state()?;
        // SAFETY: the vCPU is parked (save_state paused it) and devices only
        // write guest memory from the vCPU thread, so nothing writes while
        // the slice lives.
        let mem = unsafe { self.memory.as_slice() };
        memory::write_sparse(mem, memory_out)?;
        Ok(blob)
    }

    /// Pauses, flushes the disks and returns the state blob without
    /// writing memory (for migration tools that send memory themselves).
    pub fn save_state(&mut self) -> Result<Vec<u8>> {
        self.pause()?;
        if let Some(e) = self.exit_error() {
            return Err(e);
        }
        let blocks = {
            let b = lock(&self.shared.blocks);
            let mut v = Vec::new();
            for d in b.iter() {
                d.flush()?;
                v.push(d.save()?);
            }
            v
        };
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            vcpus.push(lock(v).save()?);
        }
        let kvm = self.kvm.save_state()?;
        let (serial, ready, needs_sync, partial_line) = {
            let g = lock(&self.shared.inner);
            (g.serial.save()?, g.ready, g.needs_sync, g.out_line.clone())
        };
        let mut kvm = kvm;
        if let (true, Some(origin)) = (self.canonical_save, &self.clock_origin) {
            let now = Clocks {
                clock_ns: kvm.clock.clock,
                tsc: vcpus.iter().map(VcpuState::tsc).collect(),
            };
            let c = canonical::clocks(origin, &now);
            // What KVM reports besides the guest's time (host wall clock,
            // host TSC, which of them it filled in) is not restored.
            kvm.clock.clock = c.clock_ns;
            kvm.clock.flags = 0;
            kvm.clock.realtime = 0;
            kvm.clock.host_tsc = 0;
            for (v, t) in vcpus.iter_mut().zip(c.tsc) {
                if let Some(t) = t {
                    v.set_tsc(t);
                }
                v.canonical_xsave();
            }
        }
        let snap = Snapshot {
            memory_size: self.memory.size() as u64,
            tsc_khz: self.tsc_khz,
            ready,
            needs_sync,
            partial_line,
            kvm,
            vcpus,
            serial,
            blocks,
        };
        Ok(encode_snapshot(&snap))
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.set_throttle(0);
        {
            let mut g = lock(&self.shared.inner);
            g.request = Request::Exit;
            self.shared.cond.notify_all();
        }
        if let Some(t) = self.thread.take() {
            loop {
                self.kick_thread(&t);
                if lock(&self.shared.inner).state == RunState::Exited || t.is_finished() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            let _ = t.join();
        }
    }
}

impl Vm {
    fn kick_thread(&self, t: &JoinHandle<()>) {
        if !t.is_finished() {
            // SAFETY: as in `kick`.
            unsafe { libc::pthread_kill(t.as_pthread_t(), runner::kick_signal()) };
        }
    }
}

fn encode_snapshot(s: &Snapshot) -> Vec<u8> {
    let mut w = Writer::new();
    w.section(TAG_VM, |w| {
        w.u64(s.memory_size);
        w.u32(s.vcpus.len() as u32);
        w.u32(s.blocks.len() as u32);
        w.u32(s.tsc_khz);
        // Bit 0: the guest is ready; bit 1: a script was cut short.
        w.u8(u8::from(s.ready) | u8::from(s.needs_sync) << 1);
        w.bytes(&s.partial_line);
        s.kvm.encode(w);
    });
    for v in &s.vcpus {
        w.section(TAG_VCPU, |w| v.encode(w));
    }
    w.section(TAG_SERIAL, |w| s.serial.encode(w));
    for b in &s.blocks {
        w.section(TAG_BLOCK, |w| b.encode(w));
    }
    persist::seal(&w.into_inner())
}

fn section_name(tag: u32) -> &'static str {
    match tag {
        TAG_VM => "VM section",
        TAG_VCPU => "vCPU section",
        TAG_SERIAL => "serial section",
        TAG_BLOCK => "block section",
        _ => "unknown section",
    }
}

fn expect_section<'a>(r: &mut Reader<'a>, tag: u32) -> Result<Reader<'a>> {
    let (t, body) = r.section(section_name)?;
    if t != tag {
        return Err(Error::corrupt(format!(
            "section tag {t} where {tag} was expected"
        )));
    }
    Ok(body)
}

/// Refuses disks (named by `paths`) that are not as many as `snap` has.
fn check_disk_count<'a>(
    mut paths: impl ExactSizeIterator<Item = &'a PathBuf>,
    snap: &Snapshot,
) -> Result<()> {
    let n = paths.len();
    if n == snap.blocks.len() {
        return Ok(());
    }
    Err(Error::StateMismatch(
        paths.next().cloned().unwrap_or_default(),
        format!("{n} disks given, the state has {}", snap.blocks.len()),
    ))
}

fn decode_snapshot(blob: &[u8]) -> Result<Snapshot> {
    let body = persist::open(blob)?;
    let mut r = Reader::new(body, "state body");
    let mut vm = expect_section(&mut r, TAG_VM)?;
    let memory_size = vm.u64()?;
    if memory_size % MEMORY_ALIGN != 0
        || !(abi::MIN_MEMORY..=abi::MAX_MEMORY).contains(&memory_size)
    {
        return Err(Error::corrupt(format!("memory size {memory_size}")));
    }
    let nvcpus = vm.count(255, "vCPUs")?;
    if nvcpus == 0 {
        return Err(Error::corrupt("no vCPUs"));
    }
    let nblocks = vm.count(abi::MAX_DISKS, "disks")?;
    let tsc_khz = vm.u32()?;
    let flags = vm.u8()?;
    if flags > 3 {
        return Err(Error::corrupt(format!(
            "guest flags {flags:#x}: reserved bits set"
        )));
    }
    let (ready, needs_sync) = (flags & 1 != 0, flags & 2 != 0);
    let partial_line = vm.bytes(MAX_PARTIAL_LINE, "partial output line")?.to_vec();
    let kvm = VmKvmState::decode(&mut vm)?;
    vm.finish()?;
    let mut vcpus = Vec::new();
    for i in 0..nvcpus {
        let mut s = expect_section(&mut r, TAG_VCPU)?;
        let v = VcpuState::decode(&mut s)?;
        s.finish()?;
        if v.index as usize != i {
            return Err(Error::corrupt(format!(
                "vCPU {} where {i} was expected",
                v.index
            )));
        }
        vcpus.push(v);
    }
    let mut s = expect_section(&mut r, TAG_SERIAL)?;
    let serial = SerialDeviceState::decode(&mut s)?;
    s.finish()?;
    let mut blocks = Vec::new();
    for _ in 0..nblocks {
        let mut s = expect_section(&mut r, TAG_BLOCK)?;
        blocks.push(BlockState::decode(&mut s)?);
        s.finish()?;
    }
    r.finish()?;
    Ok(Snapshot {
        memory_size,
        tsc_khz,
        ready,
        needs_sync,
        partial_line,
        kvm,
        vcpus,
        serial,
        blocks,
    })
}

/// Checks a state blob without restoring it.
pub fn validate_state(blob: &[u8]) -> Result<()> {
    decode_snapshot(blob).map(|_| ())
}

/// Writes `p`'s replacements over guest memory (offsets are guest-physical
/// addresses: the memory file is guest memory from address 0).
fn write_patches(mem: &Memory, p: &Patches) -> Result<()> {
    static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
    for (off, piece) in p.pieces() {
        match piece {
            Piece::Data(d) => mem.write(*off, d)?,
            Piece::Zero(n) => {
                let mut at = 0u64;
                while at < *n {
                    let k = (*n - at).min(ZEROS.len() as u64) as usize;
                    mem.write(off + at, &ZEROS[..k])?;
                    at += k as u64;
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_blk::QueueState;
    use vm_superio::serial::SerialState;

    /// Committed golden blobs (docs/VMM.md, "State blob"; see
    /// testdata/vectors/state/README.md).
    fn vector(name: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/vectors/state")
            .join(name)
    }

    /// `n` deterministic, position-dependent bytes.
    fn pattern(seed: u32, n: usize) -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_mul(131) ^ (i >> 8).wrapping_mul(7) ^ seed.wrapping_mul(17)) as u8)
            .collect()
    }

    /// A KVM structure whose bytes are `pattern(seed, size)`.
    fn fill<T: zerocopy::FromBytes>(seed: u32) -> T {
        T::read_from_bytes(&pattern(seed, std::mem::size_of::<T>())).unwrap()
    }

    /// A state with every field set to distinct, non-zero bytes (the values
    /// a reader checks — section order, vCPU indices, chip ids, queue size —
    /// are valid).
    fn pattern_snapshot() -> Snapshot {
        let mut irqchips: [kvm_bindings::kvm_irqchip; 3] = [fill(20), fill(21), fill(22)];
        for (i, c) in irqchips.iter_mut().enumerate() {
            c.chip_id = i as u32;
        }
        let vcpu = |i: u8| {
            let s = 100 * (u32::from(i) + 1);
            VcpuState {
                index: i,
                cpuid: (0..3).map(|k| fill(s + k)).collect(),
                regs: fill(s + 10),
                sregs: fill(s + 11),
                xsave: fill(s + 12),
                xcrs: fill(s + 13),
                debugregs: fill(s + 14),
                events: fill(s + 15),
                mp_state: fill(s + 16),
                lapic: fill(s + 17),
                msrs: (0..5u32)
                    .map(|k| (0xc000_0080 + k, 0x0123_4567_89ab_cdef ^ u64::from(s + k)))
                    .collect(),
            }
        };
        let block = |k: u64| BlockState {
            disk_size: (4 << 20) + k * 4096,
            status: 0xf + k as u32,
            dev_features_sel: 1,
            drv_features_sel: 0,
            drv_features: (1 << 32) | (1 << 9),
            queue_sel: 0,
            interrupt_status: 1,
            config_generation: 7 + k as u32,
            queue: QueueState {
                size: 256,
                ready: true,
                desc: 0x10_0000 + k,
                avail: 0x10_1000 + k,
                used: 0x10_2000 + k,
                next_avail: 0xfffe,
                next_used: 0x1234 + k as u16,
            },
        };
        Snapshot {
            memory_size: 64 << 20,
            tsc_khz: 2_500_000,
            ready: true,
            needs_sync: false,
            partial_line: b"partial \xffline".to_vec(),
            kvm: VmKvmState {
                clock: fill(10),
                irqchips,
            },
            vcpus: vec![vcpu(0), vcpu(1)],
            serial: SerialDeviceState {
                uart: SerialState {
                    baud_divisor_low: 1,
                    baud_divisor_high: 2,
                    interrupt_enable: 3,
                    interrupt_identification: 4,
                    line_control: 5,
                    line_status: 6,
                    modem_control: 7,
                    modem_status: 8,
                    scratch: 9,
                    in_buffer: pattern(30, 10),
                },
                pending: pattern(31, 100),
            },
            blocks: vec![block(0), block(1)],
        }
    }

    fn check_golden(name: &str, blob: &[u8]) {
        let p = vector(name);
        if std::env::var_os("UPDATE_STATE_VECTORS").is_some() {
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, blob).unwrap();
        }
        let golden = std::fs::read(&p).unwrap();
        assert!(golden == blob, "encoding differs from {}", p.display());
    }

    #[test]
    fn pattern_state_encodes_to_the_golden_blob() {
        let blob = encode_snapshot(&pattern_snapshot());
        check_golden("pattern-v1.bin", &blob);
        // And decoding the golden blob gives a state that encodes to it.
        let again = encode_snapshot(&decode_snapshot(&blob).unwrap());
        assert!(again == blob, "decode/encode round trip changed the blob");
    }

    #[test]
    fn vm_state_vector_decodes_and_reencodes_unchanged() {
        let golden = std::fs::read(vector("vm-v1.bin")).unwrap();
        let s = decode_snapshot(&golden).unwrap();
        assert_eq!(s.memory_size, 16 << 20);
        assert_eq!((s.vcpus.len(), s.blocks.len()), (1, 1));
        assert_eq!(s.blocks[0].disk_size, 1 << 20);
        assert!(!s.vcpus[0].cpuid.is_empty() && !s.vcpus[0].msrs.is_empty());
        let again = encode_snapshot(&s);
        assert!(
            again == golden,
            "decode/encode round trip changed vm-v1.bin"
        );
    }

    /// docs/VMM.md: chip ids 0, 1, 2, a queue size of 0 or a power of two
    /// up to 256 and a memory size in 2 MiB units are checks of the blob itself, so `validate_state` (what
    /// the migration receiver runs before it commits) must refuse them, not
    /// only a later restore.
    #[test]
    fn validate_refuses_bad_chip_ids_queue_and_memory_sizes() {
        validate_state(&encode_snapshot(&pattern_snapshot())).unwrap();
        for (chip, id) in [(0, 1), (1, 0), (2, 3), (2, u32::MAX)] {
            let mut s = pattern_snapshot();
            s.kvm.irqchips[chip].chip_id = id;
            let e = validate_state(&encode_snapshot(&s)).unwrap_err();
            assert!(e.to_string().contains("irqchip id"), "{e}");
        }
        for size in [3u16, 257, 512, 0xffff] {
            let mut s = pattern_snapshot();
            s.blocks[1].queue.size = size;
            let e = validate_state(&encode_snapshot(&s)).unwrap_err();
            assert!(e.to_string().contains("virtio queue size"), "{e}");
        }
        // Memory sizes a restore could not map are refused by the decoder.
        for size in [(16 << 20) + 4096, (3 << 30) + (2 << 20), 14 << 20, 0] {
            let mut s = pattern_snapshot();
            s.memory_size = size;
            let e = validate_state(&encode_snapshot(&s)).unwrap_err();
            assert!(e.to_string().contains("memory size"), "{e}");
        }
        for size in [0u16, 1, 2, 128, 256] {
            let mut s = pattern_snapshot();
            s.blocks[0].queue.size = size;
            validate_state(&encode_snapshot(&s)).unwrap();
        }
    }
}
