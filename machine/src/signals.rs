//! SIGINT/SIGTERM to a stop flag, for callers of `control::serve`.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::error::{Error, Result};

/// Makes SIGINT and SIGTERM set `flag` (instead of killing the process, or
/// interrupting it with the cleanup of `kimberley_formats::cleanup`).
/// Only the first flag registered in a process is used.
pub fn stop_on_signals(flag: Arc<AtomicBool>) -> Result<Arc<AtomicBool>> {
    kimberley_formats::sys::signal::stop_on(flag).map_err(|e| Error::io("sigaction", e))
}
