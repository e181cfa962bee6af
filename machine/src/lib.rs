//! The machine seam: what every command that runs a VM talks to, whatever
//! runs it. A [`Backend`] boots a VM or restores one from a VM directory; a
//! [`Machine`] is a running VM that pauses, resumes and suspends into a VM
//! directory; its [`GuestAgent`] runs scripts in the guest; a machine that
//! can be live-migrated also offers [`Migratable`]. The control socket
//! ([`control`]) serves any machine. The KVM microVM (`kimberley-vmm`) and
//! QEMU (`kimberley-qemu`) implement these traits.

pub mod agent;
pub mod backend;
pub mod bitmap;
pub mod control;
mod error;
pub mod migrate;
pub mod reclaim;
pub mod signals;

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kimberley_formats::vmdir::{VmDir, VmDirWriter};

pub use agent::{GuestAgent, ScriptOutcome};
pub use backend::{Backend, MemorySource, Placement, PortForward, RestoreOptions};
pub use bitmap::Bitmap;
pub use control::{ControlSocket, Ending, Hooks, MigrateError, MigrateFn, MigrateIo, SnapshotFn};
pub use error::{Error, Result};
pub use migrate::{Migratable, StreamLimits, StreamMigratable, StreamPhase, StreamStatus};
pub use reclaim::{Reclaim, Reclaimed, Trimmed};
pub use signals::stop_on_signals;

/// What a running machine reports about itself (the control socket's
/// `status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineInfo {
    /// The backend that runs it (`"microvm"`, `"qemu"`).
    pub backend: &'static str,
    /// Guest RAM in bytes.
    pub memory_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Disk image paths, in device order.
    pub disks: Vec<PathBuf>,
    /// Since this machine was booted or restored.
    pub uptime: Duration,
    /// True once the guest answers its agent.
    pub ready: bool,
    /// Why the guest stopped on its own, if it did (crash, panic, exit).
    pub exited: Option<String>,
}

/// A running (or paused) VM.
///
/// Every wait a machine does (scripts, pauses, boot) watches the flag given
/// to [`Machine::set_interrupt`] and ends with [`Error::Interrupted`] soon
/// after it is set.
pub trait Machine: Send {
    /// What it is and how it is.
    fn info(&self) -> MachineInfo;
    /// Stops the guest's vCPUs (in-flight I/O completed) and waits until
    /// they are stopped.
    fn pause(&mut self) -> Result<()>;
    /// Pauses for a suspend that equal runs save identically, where the
    /// backend can: the guest stopped where it waits for commands (waiting
    /// up to `timeout` for it to get there) and its clocks saved canonical
    /// rather than as the time it happened to run. Returns whether the
    /// guest was stopped at that point; backends that cannot just pause
    /// and return false.
    fn pause_reproducibly(&mut self, _timeout: Duration) -> Result<bool> {
        self.pause()?;
        Ok(false)
    }

    /// Lets a paused guest run again.
    fn resume(&mut self) -> Result<()>;
    /// True if paused (or asked to pause).
    fn is_paused(&self) -> bool;
    /// The guest agent, which runs scripts in the guest.
    fn agent(&mut self) -> &mut dyn GuestAgent;
    /// Makes every wait end with [`Error::Interrupted`] once `flag` is set.
    fn set_interrupt(&mut self, flag: Arc<AtomicBool>);
    /// Guest console lines printed outside of scripts (drained).
    fn take_console_lines(&mut self) -> Vec<String>;
    /// When the guest first ran after this machine was booted or restored.
    fn first_run(&self) -> Option<Instant>;
    /// The guest-physical pages (4 KiB, by index) first touched since the
    /// restore, in order: only for memory restored with
    /// [`MemorySource::LazyRecording`], None otherwise.
    fn touched_pages(&self) -> Option<Vec<u64>> {
        None
    }
    /// For memory served on first touch (lazily restored, or arriving):
    /// the faults resolved and the 4 KiB pages brought in so far (the
    /// faulting pages and those read ahead with them); None otherwise.
    fn memory_faults(&self) -> Option<(u64, u64)> {
        None
    }
    /// Suspends into the new VM directory `w` named `name` (memory, disks
    /// and state written or copied there) and commits it; the machine
    /// stays paused. Used by `build` (its launch VM) and by snapshots.
    fn suspend_into(&mut self, w: VmDirWriter, name: &str) -> Result<PathBuf>;
    /// Suspends back into `dir`, the directory it was restored from in
    /// place, which is replaced by the new version atomically; the machine
    /// stays paused.
    fn suspend_in_place(&mut self, dir: &VmDir) -> Result<PathBuf>;
    /// The live-migration interface, where the backend has one.
    fn migratable(&mut self) -> Option<&mut dyn Migratable> {
        None
    }
    /// The live-migration interface of a backend whose hypervisor streams
    /// the machine itself (QEMU), where it has one.
    fn stream_migratable(&mut self) -> Option<&mut dyn StreamMigratable> {
        None
    }
}
