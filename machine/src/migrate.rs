//! What live migration needs of a machine beyond the [`crate::Machine`]
//! seam: its memory and disks, their dirty logs, a vCPU throttle and the
//! device state (the microVM has them; `vmigrate` drives them); or, for a
//! hypervisor that migrates the machine itself (QEMU), its migration
//! stream.

use std::path::PathBuf;

use crate::bitmap::Bitmap;
use crate::error::Result;

/// A machine that can be live-migrated with pre-copy.
pub trait Migratable: Send + Sync {
    /// Guest RAM in bytes.
    fn memory_size(&self) -> u64;
    /// vCPUs.
    fn vcpus(&self) -> u32;
    /// Disk paths, in device order.
    fn disk_paths(&self) -> Vec<PathBuf>;
    /// Reads guest memory at `offset` into `buf` (the guest may run).
    fn read_memory(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Turns dirty-page logging on (clearing it) or off.
    fn set_dirty_logging(&mut self, on: bool) -> Result<()>;
    /// Pages (4 KiB) written since the last call (fetch-and-clear).
    fn dirty_pages(&mut self) -> Result<Bitmap>;
    /// 4 KiB blocks of disk `disk` written since the last call.
    fn dirty_disk_blocks(&mut self, disk: usize) -> Result<Bitmap>;
    /// Throttles the vCPUs to run `100 - pct` percent of the time (0: off).
    fn set_throttle(&mut self, pct: u32);
    /// The throttle in force.
    fn throttle(&self) -> u32;
    /// Pauses and returns the vCPU and device state (disks flushed).
    fn save_state(&mut self) -> Result<Vec<u8>>;
    /// Pauses.
    fn pause(&mut self) -> Result<()>;
    /// Resumes.
    fn resume(&mut self) -> Result<()>;
    /// True if paused.
    fn is_paused(&self) -> bool;
}

/// Limits of a hypervisor-driven migration stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamLimits {
    /// The downtime the hypervisor aims at when it decides to stop the
    /// guest, milliseconds.
    pub downtime_ms: u64,
    /// The hypervisor copies the disks in its stream (pre-copy, with its
    /// own dirty tracking); otherwise the other side opens the same,
    /// shared, files.
    pub copy_disks: bool,
}

/// Where a hypervisor-driven migration stream stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamPhase {
    /// Setting up, or copying memory while the guest runs.
    Active,
    /// The guest is paused: the hypervisor waits for
    /// [`StreamMigratable::switch_over`] before it sends the device state.
    SwitchOver,
    /// The guest is paused and the rest of the stream is being written.
    Device,
    /// The whole stream was written: the guest stays paused here.
    Completed,
    /// The migration failed or was cancelled (why).
    Failed(String),
}

/// A hypervisor-driven migration stream's progress.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamStatus {
    /// The phase.
    pub phase: StreamPhase,
    /// Stream bytes the hypervisor wrote so far (before vmigrate's
    /// compression).
    pub transferred: u64,
    /// Memory bytes still dirty.
    pub remaining: u64,
    /// Dirty-log synchronisations so far: 1 during the first pass over
    /// memory, +1 for each further round.
    pub dirty_syncs: u64,
    /// Bytes of memory dirtied per second, as last measured.
    pub dirty_rate: u64,
    /// The vCPU throttle the hypervisor applies (auto-converge), percent.
    pub throttle_pct: u32,
    /// Memory pages sent (zero pages included).
    pub pages: u64,
    /// Zero pages among them (sent as a flag).
    pub zero_pages: u64,
}

/// A machine whose hypervisor migrates it with its own live-migration
/// stream (QEMU): it does pre-copy, auto-converge and the switch-over;
/// `vmigrate` carries the stream (compressed, sealed) and decides the
/// hand-over.
pub trait StreamMigratable: Send {
    /// Guest RAM in bytes.
    fn memory_size(&self) -> u64;
    /// vCPUs.
    fn vcpus(&self) -> u32;
    /// Disk paths, in device order.
    fn disk_paths(&self) -> Vec<PathBuf>;
    /// The machine description the receiver starts its own machine from
    /// (the manifest's `machine` member).
    fn description(&self) -> kimberley_formats::vmdir::MachineSpec;
    /// The guest's memory file (the RAM itself while the machine runs),
    /// opened read-only: what the receiver holds is checked against it
    /// once the hypervisor has paused the guest.
    fn memory_file(&self) -> Result<std::fs::File>;
    /// The files the receiver needs to start the machine (kernel, then the
    /// initrd if there is one), opened read-only.
    fn boot_files(&self) -> Result<Vec<std::fs::File>>;
    /// Starts the migration; the stream comes out of the returned socket
    /// (end of file once it is complete or failed). The hypervisor pauses
    /// the guest when the rest fits `limits` (or it is told to with
    /// [`StreamMigratable::force_switch_over`]) and then waits for
    /// [`StreamMigratable::switch_over`].
    fn start_stream(&mut self, limits: &StreamLimits) -> Result<std::os::unix::net::UnixStream>;
    /// Where it stands.
    fn stream_status(&mut self) -> Result<StreamStatus>;
    /// Makes the hypervisor stop the guest at the end of the current round
    /// whatever remains (`--max-rounds`).
    fn force_switch_over(&mut self) -> Result<()>;
    /// In [`StreamPhase::SwitchOver`]: writes the device state and ends the
    /// stream; the guest stays paused.
    fn switch_over(&mut self) -> Result<()>;
    /// When the hypervisor paused the guest for the switch-over, by its own
    /// clock, if it reported it since the last call.
    fn stream_paused_at(&mut self) -> Option<std::time::SystemTime>;
    /// Cancels a migration that has not completed; the guest runs again if
    /// it ran before.
    fn cancel_stream(&mut self) -> Result<()>;
    /// Puts the hypervisor's migration settings back as they were for
    /// suspending (after any outcome).
    fn end_stream(&mut self) -> Result<()>;
}
