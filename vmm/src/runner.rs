//! The vCPU thread: runs vCPU 0, serves its exits (serial, control ports,
//! virtio-mmio), and parks when asked to pause. Another thread stops a
//! running KVM_RUN by sending [`kick_signal`] to it; the signal handler sets
//! `kvm_run.immediate_exit`, so a kick that races with entering KVM_RUN is
//! not lost.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::VcpuExit;

use crate::abi;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio_blk::VirtioBlk;
use crate::error::{Error, Result};
use crate::vstate::vcpu::Vcpu;

/// Longest output line kept; longer lines are split.
const MAX_LINE: usize = 64 * 1024;
/// Most unread output lines kept; older ones are dropped.
const MAX_LINES: usize = 100_000;

/// What the owner wants the vCPU thread to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// Run the guest.
    Run,
    /// Park (after completing any in-flight I/O).
    Pause,
    /// Leave the thread.
    Exit,
}

/// What the vCPU thread is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    /// Not started yet.
    Starting,
    /// Running (or about to).
    Running,
    /// Parked; the vCPU fd may be used by other threads.
    Paused,
    /// Thread finished (stopped or guest died).
    Exited,
}

/// Why the guest stopped on its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestExit {
    /// KVM_EXIT_SHUTDOWN.
    TripleFault,
    /// The guest reported a panic (message).
    Panic(String),
    /// Another unexpected exit.
    Other(String),
}

impl GuestExit {
    /// The matching error.
    pub fn to_error(&self) -> Error {
        match self {
            GuestExit::TripleFault => Error::TripleFault,
            GuestExit::Panic(m) => Error::GuestPanic(m.clone()),
            GuestExit::Other(m) => Error::VcpuStopped(m.clone()),
        }
    }
}

/// State shared by the vCPU thread and the `Vm` owner.
#[derive(Debug)]
pub struct Inner {
    pub request: Request,
    pub state: RunState,
    pub exit: Option<GuestExit>,
    pub serial: SerialDevice,
    pub out_line: Vec<u8>,
    pub lines: VecDeque<String>,
    pub lines_dropped: u64,
    pub ready: bool,
    pub idle: bool,
    pub first_entry: Option<Instant>,
    pub first_exit: Option<Instant>,
    pub last_panic_line: Option<String>,
    /// Set by the owner to end waits early ([`Shared::wait_for`]).
    pub interrupt: Option<Arc<AtomicBool>>,
    /// A script was cut short (timeout, interruption) and may still run
    /// in the guest: the next script resynchronises first.
    pub needs_sync: bool,
}

impl Inner {
    /// New state with the given serial device.
    pub fn new(serial: SerialDevice, ready: bool) -> Inner {
        Inner {
            request: Request::Run,
            state: RunState::Starting,
            exit: None,
            serial,
            out_line: Vec::new(),
            lines: VecDeque::new(),
            lines_dropped: 0,
            ready,
            idle: false,
            first_entry: None,
            first_exit: None,
            last_panic_line: None,
            interrupt: None,
            needs_sync: false,
        }
    }

    fn push_output(&mut self, bytes: &[u8]) -> bool {
        let mut new_line = false;
        for &b in bytes {
            if b == b'\n' || self.out_line.len() >= MAX_LINE {
                let mut l = std::mem::take(&mut self.out_line);
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                let s = String::from_utf8_lossy(&l).into_owned();
                if let Some(m) = s.strip_prefix("panic: ") {
                    self.last_panic_line = Some(m.to_string());
                }
                if self.lines.len() >= MAX_LINES {
                    self.lines.pop_front();
                    self.lines_dropped += 1;
                }
                self.lines.push_back(s);
                new_line = true;
                if b == b'\n' {
                    continue;
                }
            }
            self.out_line.push(b);
        }
        new_line
    }
}

/// The shared part of a VM.
#[derive(Debug)]
pub struct Shared {
    pub inner: Mutex<Inner>,
    pub cond: Condvar,
    pub blocks: Mutex<Vec<VirtioBlk>>,
    /// vCPU throttle in percent (0 = none, at most [`MAX_THROTTLE`]): see
    /// [`throttle_sleep`].
    pub throttle: AtomicU32,
}

/// Length of a throttle time slice: a throttled vCPU runs this long, then
/// sleeps `pct / (100 - pct)` of it (as QEMU's auto-converge does).
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);
/// Highest throttle.
pub const MAX_THROTTLE: u32 = 99;
/// How often a wait looks at the interrupt flag.
pub const INTERRUPT_POLL: Duration = Duration::from_millis(20);

impl Inner {
    /// True when the owner's interrupt flag is set.
    pub fn interrupted(&self) -> bool {
        self.interrupt
            .as_ref()
            .is_some_and(|f| f.load(Ordering::SeqCst))
    }
}

impl Shared {
    /// Waits on the condition until `check` gives an answer, the guest
    /// stopped (its error), the interrupt flag is set
    /// ([`Error::Interrupted`], noticed within [`INTERRUPT_POLL`]) or
    /// `timeout` passed. `check` runs with the lock held, first right away
    /// and then after every notification.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut check: impl FnMut(&mut Inner) -> Option<Result<T>>,
    ) -> Result<T> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.inner);
        loop {
            if let Some(r) = check(&mut g) {
                return r;
            }
            if let Some(e) = &g.exit {
                return Err(e.to_error());
            }
            if g.interrupted() {
                return Err(Error::Interrupted);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout));
            }
            let mut wait = deadline - now;
            if g.interrupt.is_some() {
                wait = wait.min(INTERRUPT_POLL);
            }
            g = self
                .cond
                .wait_timeout(g, wait)
                .map(|r| r.0)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}

/// Locks, ignoring poisoning (a panicked holder leaves consistent-enough data).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    static RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN() + 2
}

extern "C" fn on_kick(_: libc::c_int) {
    let p = RUN_PTR.with(|p| p.get());
    if !p.is_null() {
        // SAFETY: p is this thread's kvm_run mapping, valid while the vCPU
        // thread runs (it clears the pointer before the vCPU can go away).
        unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), 1) };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid starting point; we set the
        // handler to a function that only does an async-signal-safe write.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_kick as *const () as usize;
            sa.sa_flags = 0;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(kick_signal(), &sa, std::ptr::null_mut());
        }
    });
}

fn set_immediate_exit(p: *mut kvm_run, v: u8) {
    // SAFETY: p is the vCPU's kvm_run mapping, valid for the thread's life.
    unsafe { std::ptr::write_volatile(std::ptr::addr_of_mut!((*p).immediate_exit), v) };
}

/// Body of the vCPU thread.
pub fn vcpu_thread(shared: Arc<Shared>, vcpu: Arc<Mutex<Vcpu>>) {
    let run_ptr: *mut kvm_run = lock(&vcpu).fd.get_kvm_run();
    RUN_PTR.with(|p| p.set(run_ptr));
    let exit = run_loop(&shared, &vcpu, run_ptr);
    RUN_PTR.with(|p| p.set(std::ptr::null_mut()));
    let mut g = lock(&shared.inner);
    if let Some(e) = exit {
        g.exit = Some(e);
    }
    g.state = RunState::Exited;
    shared.cond.notify_all();
}

/// With a throttle set, sleeps `pct / (100 - pct)` time slices once the
/// vCPU has run for a slice (a ticker thread kicks it out of KVM_RUN every
/// slice). The sleep ends early on a pause or exit request.
fn throttle_sleep(shared: &Shared, slice_start: &mut Instant) {
    let pct = shared.throttle.load(Ordering::Relaxed).min(MAX_THROTTLE);
    if pct == 0 {
        *slice_start = Instant::now();
        return;
    }
    if slice_start.elapsed() < THROTTLE_SLICE {
        return;
    }
    let sleep = THROTTLE_SLICE * pct / (100 - pct);
    let deadline = Instant::now() + sleep;
    let mut g = lock(&shared.inner);
    while g.request == Request::Run {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        g = shared
            .cond
            .wait_timeout(g, deadline - now)
            .map(|r| r.0)
            .unwrap_or_else(|e| e.into_inner().0);
    }
    drop(g);
    *slice_start = Instant::now();
}

fn run_loop(shared: &Shared, vcpu: &Mutex<Vcpu>, run_ptr: *mut kvm_run) -> Option<GuestExit> {
    let mut slice_start = Instant::now();
    loop {
        throttle_sleep(shared, &mut slice_start);
        set_immediate_exit(run_ptr, 0);
        {
            let mut g = lock(&shared.inner);
            if g.request != Request::Run {
                drop(g);
                complete_pending_io(vcpu, run_ptr);
                g = lock(&shared.inner);
                loop {
                    match g.request {
                        Request::Run => break,
                        Request::Exit => return None,
                        Request::Pause => {
                            if g.state != RunState::Paused {
                                g.state = RunState::Paused;
                                shared.cond.notify_all();
                            }
                            g = shared.cond.wait(g).unwrap_or_else(|e| e.into_inner());
                        }
                    }
                }
            }
            if g.state != RunState::Running {
                g.state = RunState::Running;
                shared.cond.notify_all();
            }
            if g.first_entry.is_none() {
                g.first_entry = Some(Instant::now());
            }
        }
        let mut v = lock(vcpu);
        let res = v.fd.run();
        if let Some(e) = handle_exit(shared, res) {
            if std::env::var_os("KIMBERLEY_VMM_DEBUG").is_some() {
                eprintln!(
                    "vcpu0 stopped: {e:?}\nregs: {:#x?}\nsregs: {:#x?}",
                    v.fd.get_regs(),
                    v.fd.get_sregs()
                );
            }
            return Some(e);
        }
    }
}

/// Lets KVM finish an in-flight IN/MMIO read (it writes the result into the
/// guest registers on the next KVM_RUN) without running guest code, so
/// saved registers are complete.
fn complete_pending_io(vcpu: &Mutex<Vcpu>, run_ptr: *mut kvm_run) {
    let mut v = lock(vcpu);
    set_immediate_exit(run_ptr, 1);
    let _ = v.fd.run();
    set_immediate_exit(run_ptr, 0);
}

fn handle_exit(shared: &Shared, res: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Option<GuestExit> {
    {
        let mut g = lock(&shared.inner);
        if g.first_exit.is_none() {
            g.first_exit = Some(Instant::now());
            shared.cond.notify_all();
        }
    }
    let serial_end = abi::SERIAL_PORT + 8;
    match res {
        Ok(VcpuExit::IoIn(port, data)) => {
            let v = if (abi::SERIAL_PORT..serial_end).contains(&port) {
                lock(&shared.inner)
                    .serial
                    .read((port - abi::SERIAL_PORT) as u8)
            } else {
                0xff
            };
            data.fill(0);
            if let Some(b) = data.first_mut() {
                *b = v;
            }
            None
        }
        Ok(VcpuExit::IoOut(port, data)) => {
            let b = data.first().copied().unwrap_or(0);
            match port {
                p if (abi::SERIAL_PORT..serial_end).contains(&p) => {
                    let mut g = lock(&shared.inner);
                    g.serial.write((p - abi::SERIAL_PORT) as u8, b);
                    let out = g.serial.take_output();
                    if !out.is_empty() && g.push_output(&out) {
                        shared.cond.notify_all();
                    }
                    None
                }
                abi::PORT_IDLE => {
                    let mut g = lock(&shared.inner);
                    while g.request == Request::Run && !g.serial.has_input() {
                        g.idle = true;
                        shared.cond.notify_all();
                        g = shared.cond.wait(g).unwrap_or_else(|e| e.into_inner());
                    }
                    g.idle = false;
                    None
                }
                abi::PORT_READY => {
                    let mut g = lock(&shared.inner);
                    g.ready = true;
                    shared.cond.notify_all();
                    None
                }
                abi::PORT_PANIC => {
                    let g = lock(&shared.inner);
                    let msg = g
                        .last_panic_line
                        .clone()
                        .unwrap_or_else(|| "no message".into());
                    Some(GuestExit::Panic(msg))
                }
                _ => None,
            }
        }
        Ok(VcpuExit::MmioRead(addr, data)) => {
            data.fill(0xff);
            if let Some((i, off)) = mmio_slot(addr) {
                if let Some(dev) = lock(&shared.blocks).get_mut(i) {
                    dev.mmio_read(off, data);
                }
            }
            None
        }
        Ok(VcpuExit::MmioWrite(addr, data)) => {
            if let Some((i, off)) = mmio_slot(addr) {
                if let Some(dev) = lock(&shared.blocks).get_mut(i) {
                    dev.mmio_write(off, data);
                }
            }
            None
        }
        Ok(VcpuExit::Shutdown) => Some(GuestExit::TripleFault),
        Ok(VcpuExit::Hlt) => Some(GuestExit::Other("guest executed HLT".into())),
        Ok(VcpuExit::FailEntry(reason, cpu)) => Some(GuestExit::Other(format!(
            "KVM entry failed (reason {reason:#x}, cpu {cpu})"
        ))),
        Ok(VcpuExit::InternalError) => Some(GuestExit::Other("KVM internal error".into())),
        Ok(VcpuExit::Intr) => None,
        Ok(other) => Some(GuestExit::Other(format!("unexpected exit {other:?}"))),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
        Err(e) => Some(GuestExit::Other(format!("KVM_RUN failed: {e}"))),
    }
}

fn mmio_slot(addr: u64) -> Option<(usize, u64)> {
    let rel = addr.checked_sub(abi::VIRTIO_MMIO_BASE)?;
    let i = (rel / abi::VIRTIO_MMIO_SIZE) as usize;
    (i < abi::MAX_DISKS).then_some((i, rel % abi::VIRTIO_MMIO_SIZE))
}
