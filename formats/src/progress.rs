//! Progress counters the pipelines update and front ends poll.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Shared progress state: a stage name, a total and a done count (bytes).
#[derive(Debug, Default)]
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    stage: Mutex<String>,
}

impl Progress {
    /// Starts a stage of `total` units.
    pub fn stage(&self, name: &str, total: u64) {
        *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
        self.total.store(total, Ordering::Relaxed);
        self.done.store(0, Ordering::Relaxed);
    }

    /// Adds to the done count.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// (stage, done, total).
    pub fn snapshot(&self) -> (String, u64, u64) {
        (
            self.stage.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            self.done.load(Ordering::Relaxed),
            self.total.load(Ordering::Relaxed),
        )
    }
}
