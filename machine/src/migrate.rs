//! What live migration needs of a machine beyond the [`crate::Machine`]
//! seam: its memory and disks, their dirty logs, a vCPU throttle and the
//! device state (the microVM has them; `vmigrate` drives them).

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
