//! The guest agent: runs a script in the guest and returns its status and
//! output (the test guest's serial protocol, or qemu-guest-agent).

use std::time::Duration;

use crate::error::Result;
use crate::reclaim::{Reclaim, Reclaimed};

/// The result of a script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScriptOutcome {
    /// Its exit status: 0 on success.
    pub status: i32,
    /// Its output lines (stdout and stderr as the guest interleaved them).
    pub lines: Vec<String>,
}

/// Runs scripts in the guest.
pub trait GuestAgent {
    /// Waits until the guest answers a trivial request (the first answer
    /// after a restore).
    fn ping(&mut self, timeout: Duration) -> Result<()>;

    /// Runs `script` (in the guest's own script language: the test
    /// guest's commands, or `/bin/sh` for Linux guests) and collects its
    /// output; `on_line` sees each line as it arrives. A script that fails
    /// is a non-zero [`ScriptOutcome::status`], not an `Err`; `Err` is a
    /// script that could not run, or ran past `timeout` (and was stopped).
    fn run_script(
        &mut self,
        script: &str,
        on_line: &mut dyn FnMut(&str),
        timeout: Duration,
    ) -> Result<ScriptOutcome>;

    /// Before a suspend whose VM is diffed: asks the guest to give back
    /// what it freed (`what`), within `timeout`. Every backend answers:
    /// one whose guest has nothing of the kind (no file system, no page
    /// cache) says [`Reclaimed::NotApplicable`]. What the guest cannot do
    /// (no `fstrim`, a file system refusing it) is a note in the answer,
    /// not an `Err`; `Err` is an agent that failed or ran past `timeout`.
    fn reclaim(&mut self, what: Reclaim, timeout: Duration) -> Result<Reclaimed>;
}
