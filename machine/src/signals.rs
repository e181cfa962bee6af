//! SIGINT/SIGTERM to a stop flag, for callers of `control::serve`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use crate::error::{Error, Result};

static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();

extern "C" fn on_signal(_: libc::c_int) {
    if let Some(f) = FLAG.get() {
        f.store(true, Ordering::SeqCst);
    }
}

/// Makes SIGINT and SIGTERM set `flag` (instead of killing the process).
/// Only the first flag registered in a process is used.
pub fn stop_on_signals(flag: Arc<AtomicBool>) -> Result<Arc<AtomicBool>> {
    let f = FLAG.get_or_init(|| flag).clone();
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only does an atomic store; sa is fully initialised.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(Error::io("sigaction", std::io::Error::last_os_error()));
        }
    }
    Ok(f)
}
