//! Progress of a whole run: a total fixed once before the work starts, a done count, and the current stage's name.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// The total of a run not planned yet.
const UNPLANNED: u64 = u64::MAX;

/// Shared progress state that pipelines update and front ends poll. The
/// total covers the whole run (every stage) and is set once, by the first
/// [`Progress::plan`]: a bar drawn from it never changes its length
/// mid-run. Stages only change the name shown.
#[derive(Debug)]
pub struct Progress {
    total: AtomicU64,
    done: AtomicU64,
    stage: Mutex<String>,
    planned_at: OnceLock<Instant>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            total: AtomicU64::new(UNPLANNED),
            done: AtomicU64::new(0),
            stage: Mutex::new(String::new()),
            planned_at: OnceLock::new(),
        }
    }
}

/// What a front end draws.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The current stage's name ("" before the first).
    pub stage: String,
    /// Units done so far in the whole run.
    pub done: u64,
    /// The whole run's units, once planned.
    pub total: Option<u64>,
}

impl Progress {
    /// Fixes the run's total to `total` units. Only the first call counts
    /// (a front end that knows a larger run, e.g. parents applied before a
    /// diff, plans before the pipeline's own call); returns whether this
    /// call set it.
    pub fn plan(&self, total: u64) -> bool {
        let first = self
            .total
            .compare_exchange(UNPLANNED, total, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok();
        if first {
            let _ = self.planned_at.set(Instant::now());
        }
        first
    }

    /// When the run's total was planned (its work's clock starts there).
    pub fn planned_at(&self) -> Option<Instant> {
        self.planned_at.get().copied()
    }

    /// Names the stage now running; the counts go on.
    pub fn stage(&self, name: &str) {
        *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = name.to_string();
    }

    /// Adds to the done count.
    pub fn advance(&self, n: u64) {
        self.done.fetch_add(n, Ordering::Relaxed);
    }

    /// The state now.
    pub fn snapshot(&self) -> Snapshot {
        let total = self.total.load(Ordering::Relaxed);
        Snapshot {
            stage: self.stage.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            done: self.done.load(Ordering::Relaxed),
            total: (total != UNPLANNED).then_some(total),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_plan_fixes_the_total() {
        let p = Progress::default();
        assert_eq!(p.snapshot().total, None);
        assert!(p.plan(100));
        p.stage("one");
        p.advance(40);
        assert!(!p.plan(7), "a second plan must not change the total");
        p.stage("two");
        p.advance(60);
        assert_eq!(
            p.snapshot(),
            Snapshot {
                stage: "two".into(),
                done: 100,
                total: Some(100)
            }
        );
    }
}
