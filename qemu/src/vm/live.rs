//! Live migration of a running [`Vm`] with QEMU's own stream, RAM
//! included, through a local socket pair the caller reads or feeds
//! (`vmigrate` carries it between hosts).

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde_json::{json, Value};

use super::{Files, Vm, MIGRATION_TIMEOUT};
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::qmp::reply::{self, Migration, Progress};
use crate::qmp::COMMAND_TIMEOUT;

/// The descriptor name QEMU knows the stream's socket by.
const FD_NAME: &str = "live";
/// QEMU's largest downtime limit (2000 s), used to make it switch over at
/// the end of the current round.
const FORCE_DOWNTIME_MS: u64 = 2_000_000;
/// QEMU's own bandwidth cap, set out of the way: the stream is paced by
/// the socket (vmigrate's `--max-bandwidth` applies to the wire).
const UNCAPPED: u64 = 1 << 40;

/// Where an outgoing live migration stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LiveState {
    /// Setting up or copying RAM while the guest runs.
    Active,
    /// Paused before the switch-over (`pause-before-switchover`): waits
    /// for [`Vm::live_switch_over`].
    PreSwitchover,
    /// Writing the device state (the guest is paused).
    Device,
    /// Complete: the guest stays paused.
    Completed,
    /// Failed or cancelled (QEMU's status and description).
    Failed(String),
}

fn caps(list: &[(&str, bool)]) -> Value {
    let c: Vec<Value> = list
        .iter()
        .map(|(name, on)| json!({"capability": name, "state": on}))
        .collect();
    json!({ "capabilities": c })
}

/// One end of a new socket pair as the descriptor QEMU gets.
fn pair() -> Result<(UnixStream, std::fs::File)> {
    let (ours, theirs) =
        UnixStream::pair().map_err(|e| Error::io("creating the migration socket pair", e))?;
    Ok((ours, std::fs::File::from(OwnedFd::from(theirs))))
}

impl Vm {
    fn set_caps(&mut self, list: &[(&str, bool)]) -> Result<()> {
        self.qmp
            .execute(
                "migrate-set-capabilities",
                Some(caps(list)),
                COMMAND_TIMEOUT,
            )
            .map(drop)
    }

    fn set_downtime(&mut self, ms: u64) -> Result<()> {
        self.qmp
            .execute(
                "migrate-set-parameters",
                Some(json!({"downtime-limit": ms})),
                COMMAND_TIMEOUT,
            )
            .map(drop)
    }

    /// True if this QEMU can copy the disks in its migration stream
    /// (the `block` capability: QEMU's block migration, deprecated in 8.2
    /// and removed in 9.1).
    fn live_can_copy_disks(&mut self) -> Result<bool> {
        self.check_running("asking QEMU's migration capabilities")?;
        let v = self
            .qmp
            .execute("query-migrate-capabilities", None, COMMAND_TIMEOUT)?;
        Ok(v.as_array().is_some_and(|caps| {
            caps.iter()
                .any(|c| c.get("capability").and_then(Value::as_str) == Some("block"))
        }))
    }

    /// Starts a live migration of the whole VM (RAM included: the shared
    /// memory file is not assumed on the other side) into the returned
    /// socket, with auto-converge, QEMU's downtime limit `downtime_ms`, and
    /// a pause before the switch-over. With `copy_disks` the disks travel
    /// in the same stream, pre-copied with QEMU's own dirty tracking
    /// (block migration; all-zero blocks are sent as flags); without, the
    /// other side is to open the same (shared) files. [`Vm::live_end`]
    /// puts the settings back for suspends.
    pub fn live_start(&mut self, downtime_ms: u64, copy_disks: bool) -> Result<UnixStream> {
        self.check_running("starting a live migration")?;
        if copy_disks && !self.live_can_copy_disks()? {
            return Err(Error::Unsupported(
                "this QEMU cannot copy disks in its migration stream (its block migration was removed in QEMU 9.1): put the disks on storage both hosts see and migrate with --shared-disk".into(),
            ));
        }
        let mut list = vec![
            ("x-ignore-shared", false),
            ("auto-converge", true),
            ("pause-before-switchover", true),
        ];
        if copy_disks {
            list.extend([("block", true), ("zero-blocks", true)]);
        }
        self.set_caps(&list)?;
        self.copying_disks = copy_disks;
        self.qmp.execute(
            "migrate-set-parameters",
            Some(json!({"downtime-limit": downtime_ms, "max-bandwidth": UNCAPPED})),
            COMMAND_TIMEOUT,
        )?;
        let (ours, theirs) = pair()?;
        self.qmp.pass_fd(FD_NAME, &theirs)?;
        drop(theirs);
        // Only this migration's STOP counts.
        self.qmp.take_events();
        self.qmp.migrate(&format!("fd:{FD_NAME}"))?;
        Ok(ours)
    }

    /// The outgoing migration's state and counters. A paused guest is
    /// recorded as paused (so [`Vm::resume`] restarts it).
    pub fn live_status(&mut self) -> Result<(LiveState, Progress)> {
        self.check_running("migrating")?;
        let v = self.qmp.execute("query-migrate", None, COMMAND_TIMEOUT)?;
        let (m, p) = reply::progress(&v)?;
        let s = match m {
            Migration::Completed => LiveState::Completed,
            Migration::Failed { status, detail } => LiveState::Failed(match detail {
                Some(d) => format!("{status}: {d}"),
                None => status,
            }),
            Migration::Running(s) if s == "pre-switchover" => LiveState::PreSwitchover,
            Migration::Running(s) if s == "device" => LiveState::Device,
            Migration::Running(_) => LiveState::Active,
        };
        if matches!(
            s,
            LiveState::PreSwitchover | LiveState::Device | LiveState::Completed
        ) {
            self.paused = true;
        }
        Ok((s, p))
    }

    /// Makes QEMU switch over at the end of the current round, whatever
    /// remains.
    pub fn live_force(&mut self) -> Result<()> {
        self.set_downtime(FORCE_DOWNTIME_MS)
    }

    /// Lets a migration paused before its switch-over write the device
    /// state and complete.
    pub fn live_switch_over(&mut self) -> Result<()> {
        self.qmp
            .execute(
                "migrate-continue",
                Some(json!({"state": "pre-switchover"})),
                COMMAND_TIMEOUT,
            )
            .map(drop)
    }

    /// Cancels the outgoing migration (QEMU restarts a guest that ran
    /// before it) and waits until it has ended; records whether the guest
    /// is paused now.
    pub fn live_cancel(&mut self) -> Result<()> {
        self.check_running("cancelling a live migration")?;
        let _ = self.qmp.execute("migrate_cancel", None, COMMAND_TIMEOUT);
        let t = std::time::Instant::now();
        loop {
            let v = self.qmp.execute("query-migrate", None, COMMAND_TIMEOUT)?;
            match reply::migration(&v)? {
                Migration::Running(s) if s != "cancelling" && s != "none" => {}
                _ => break,
            }
            if t.elapsed() > MIGRATION_TIMEOUT {
                return Err(Error::Timeout {
                    during: "cancelling a live migration".into(),
                    timeout: MIGRATION_TIMEOUT,
                });
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        self.paused = self.qmp.status()? != "running";
        Ok(())
    }

    /// Puts the migration settings back for suspends (device state only).
    pub fn live_end(&mut self) -> Result<()> {
        self.check_running("ending a live migration")?;
        let mut list = vec![
            ("x-ignore-shared", true),
            ("auto-converge", false),
            ("pause-before-switchover", false),
        ];
        if std::mem::take(&mut self.copying_disks) {
            list.extend([("block", false), ("zero-blocks", false)]);
        }
        self.set_caps(&list)
    }

    /// Starts QEMU for `cfg` on `files` (memory shared: the new memory
    /// file becomes the RAM), paused, waiting for a live migration stream
    /// fed into the returned socket. [`Vm::live_incoming_done`] waits for
    /// its end; the guest stays paused until [`Vm::resume`].
    pub fn live_incoming(
        program: &std::path::Path,
        cfg: &MachineConfig,
        files: Files,
        memory_file: &std::path::Path,
    ) -> Result<(Vm, UnixStream)> {
        // No image locks: until COMMIT the source may have to run on, on
        // the same shared disks, while this QEMU waits.
        let mut vm = Vm::start(program, cfg, files, memory_file, true, true, None, false)?;
        vm.set_caps(&[("x-ignore-shared", false)])?;
        let (ours, theirs) = pair()?;
        vm.qmp.pass_fd(FD_NAME, &theirs)?;
        drop(theirs);
        vm.qmp.migrate_incoming(&format!("fd:{FD_NAME}"))?;
        Ok((vm, ours))
    }

    /// Waits until the incoming stream was loaded completely (at most
    /// `timeout`), then sets up suspends again (device state only).
    pub fn live_incoming_done(&mut self, timeout: Duration) -> Result<()> {
        let r = self.qmp.wait_migration("receiving the guest", timeout);
        if let Err(e) = r {
            return Err(self.process.exit_error("receiving the guest").unwrap_or(e));
        }
        self.paused = true;
        if !self.keeps_disk_cache {
            self.read_disks_ahead();
        }
        self.set_caps(&[("x-ignore-shared", true)])
    }

    /// Starts reading the disks back into the page cache QEMU dropped when
    /// it activated them, without waiting: the receiver hashes them in the
    /// pause, and storage reads them meanwhile.
    fn read_disks_ahead(&self) {
        let files: Vec<std::fs::File> = self
            .files
            .disks
            .iter()
            .filter_map(|d| d.try_clone().ok())
            .collect();
        std::thread::spawn(move || {
            use std::os::unix::io::AsRawFd;
            for f in files {
                let Ok(size) = f.metadata().map(|m| m.len()) else {
                    continue;
                };
                let Ok(extents) = kimberley_formats::sparse::data_extents(&f, size) else {
                    continue;
                };
                for (start, end) in extents {
                    kimberley_formats::sys::file::read_ahead(f.as_raw_fd(), start, end - start);
                }
            }
        });
    }
}

impl Vm {
    /// After the directory the VM runs on was renamed from `from` to `to`
    /// (the files are the same: QEMU holds descriptors), its paths follow.
    pub fn relocate(&mut self, from: &std::path::Path, to: &std::path::Path) {
        let moved = |p: &mut std::path::PathBuf| {
            if let Ok(rest) = p.strip_prefix(from) {
                *p = to.join(rest);
            }
        };
        moved(&mut self.memory_file);
        moved(&mut self.cfg.kernel);
        if let Some(i) = self.cfg.initrd.as_mut() {
            moved(i);
        }
        for d in self.cfg.disks.iter_mut() {
            moved(d);
        }
    }
}

/// When QEMU stopped the guest, from the last `STOP` event among
/// `events` (QMP event timestamps are wall-clock seconds and
/// microseconds).
pub fn stop_time(events: &[serde_json::Map<String, Value>]) -> Option<std::time::SystemTime> {
    let e = events
        .iter()
        .rev()
        .find(|e| e.get("event").and_then(Value::as_str) == Some("STOP"))?;
    let t = e.get("timestamp")?;
    let s = t.get("seconds")?.as_u64()?;
    let us = t.get("microseconds")?.as_u64().filter(|&u| u < 1_000_000)?;
    std::time::UNIX_EPOCH.checked_add(Duration::from_secs(s) + Duration::from_micros(us))
}

impl Vm {
    /// When QEMU last stopped the guest (its `STOP` event) since the
    /// previous call, if it did.
    pub fn live_stopped_at(&mut self) -> Option<std::time::SystemTime> {
        stop_time(&self.qmp.take_events())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_stop_event_gives_the_pause_time() {
        let ev = |v: Value| v.as_object().unwrap().clone();
        let events = vec![
            ev(json!({"event": "STOP", "timestamp": {"seconds": 10, "microseconds": 5}})),
            ev(json!({"event": "RESUME", "timestamp": {"seconds": 11, "microseconds": 0}})),
            ev(json!({"event": "STOP", "timestamp": {"seconds": 12, "microseconds": 250}})),
        ];
        assert_eq!(
            stop_time(&events),
            Some(std::time::UNIX_EPOCH + Duration::from_micros(12_000_250))
        );
        assert_eq!(stop_time(&events[1..2]), None);
        let bad = vec![ev(
            json!({"event": "STOP", "timestamp": {"seconds": 1, "microseconds": 1_000_000}}),
        )];
        assert_eq!(stop_time(&bad), None);
    }
}
