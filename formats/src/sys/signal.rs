//! SIGINT/SIGTERM handlers (`sigaction(2)`) that only set a stop flag or
//! write the signal's number to a self-pipe, process liveness
//! (`kill(pid, 0)`), and `_exit(2)`.

use std::fs::File;
use std::io;
use std::os::fd::FromRawFd;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// The signals that stop or interrupt a Kimberley tool.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// Set once a process hands its SIGINT/SIGTERM to a stop flag.
static STOP: OnceLock<Arc<AtomicBool>> = OnceLock::new();
/// The write end of the self-pipe (-1: none).
static PIPE: AtomicI32 = AtomicI32::new(-1);
/// The first signal that came through the self-pipe (0: none yet).
static PENDING: AtomicI32 = AtomicI32::new(0);
/// The first signal that set the stop flag (0: none yet).
static STOPPED_BY: AtomicI32 = AtomicI32::new(0);
/// Serialises installations.
static INSTALL: Mutex<()> = Mutex::new(());

/// The handler: an atomic store, or one `write(2)` of one byte to a
/// non-blocking pipe; both are async-signal-safe. `errno` is preserved.
extern "C" fn on_signal(sig: libc::c_int) {
    if let Some(f) = STOP.get() {
        let _ = STOPPED_BY.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
        f.store(true, Ordering::SeqCst);
        return;
    }
    let _ = PENDING.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    let fd = PIPE.load(Ordering::SeqCst);
    if fd >= 0 {
        // SAFETY: __errno_location returns this thread's errno slot,
        // valid for the thread's lifetime.
        let saved = unsafe { *libc::__errno_location() };
        let b = sig as u8;
        // SAFETY: `b` is a live one-byte buffer; `fd` is the pipe's write
        // end, never closed once published; a full pipe fails with EAGAIN
        // (a byte is already waiting then).
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
        // SAFETY: as above.
        unsafe { *libc::__errno_location() = saved };
    }
}

fn install(sig: libc::c_int, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; we set the handler (a function
    // that only does async-signal-safe work), an empty mask and `flags`.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = flags;
        libc::sigemptyset(&mut sa.sa_mask);
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes SIGINT and SIGTERM set `flag` instead of killing the process (or
/// being sent to the self-pipe of [`to_pipe`]). Only the first flag
/// registered in a process is used; it is returned. System calls that a
/// signal interrupts fail with EINTR (no `SA_RESTART`), so that waits
/// notice the flag.
pub fn stop_on(flag: Arc<AtomicBool>) -> io::Result<Arc<AtomicBool>> {
    let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let f = STOP.get_or_init(|| flag).clone();
    for sig in STOP_SIGNALS {
        install(sig, 0)?;
    }
    Ok(f)
}

/// Makes SIGINT and SIGTERM write their number (one byte) to a pipe whose
/// read end is returned, for a thread to act on. Once only per process
/// (later calls fail); interrupted system calls restart (`SA_RESTART`).
pub fn to_pipe() -> io::Result<File> {
    let _g = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    if PIPE.load(Ordering::SeqCst) >= 0 {
        return Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "signals already go to a pipe",
        ));
    }
    let mut fds = [-1; 2];
    // SAFETY: `fds` is a writable array of two ints, as pipe2 requires.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 just returned these two descriptors; nothing else owns
    // the read end.
    let read = unsafe { File::from_raw_fd(fds[0]) };
    crate::sys::file::set_nonblocking(fds[1], true)?;
    // The write end stays open for the life of the process.
    PIPE.store(fds[1], Ordering::SeqCst);
    for sig in STOP_SIGNALS {
        install(sig, libc::SA_RESTART)?;
    }
    Ok(read)
}

/// The first SIGINT/SIGTERM sent to the pipe of [`to_pipe`], if any came.
pub fn pending() -> Option<libc::c_int> {
    match PENDING.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The first SIGINT/SIGTERM that set the stop flag of [`stop_on`], if any
/// came: the process is stopping on request.
pub fn stopped_by() -> Option<libc::c_int> {
    match STOPPED_BY.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// The name of a stop signal.
pub fn name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

/// True unless no process `pid` exists (`kill(pid, 0)` fails with ESRCH;
/// EPERM means it exists but belongs to someone else).
pub fn pid_alive(pid: i32) -> bool {
    if pid <= 0 {
        return true;
    }
    // SAFETY: signal 0 sends nothing; kill only checks that `pid` exists
    // and may be signalled.
    let r = unsafe { libc::kill(pid, 0) };
    r == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// Ends the process at once with `code`: no destructors, no atexit
/// handlers, no flushing of buffers other threads may hold locked.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit(2) never returns and touches no memory of ours.
    unsafe { libc::_exit(code) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness() {
        assert!(pid_alive(std::process::id() as i32));
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        c.wait().unwrap();
        assert!(!pid_alive(pid));
    }
}
