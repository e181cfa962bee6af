//! Live migration of a [`QemuMachine`] with QEMU's own stream: the sending
//! side ([`StreamMigratable`]) and the receiving side (a machine started
//! on a VM directory being written, fed the stream, committed before it
//! runs).

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kimberley_formats::vmdir::dir::digest_file;
use kimberley_formats::vmdir::{file_name, Component, Kind, MachineSpec, Manifest, VmDirWriter};
use kimberley_machine::{StreamLimits, StreamMigratable, StreamPhase, StreamStatus};
use rayon::prelude::*;

use super::{open_checked, Home, QemuBackend, QemuMachine};
use crate::config::MachineConfig;
use crate::error::{Error, Result};
use crate::vm::{Files, LiveState, Vm};

type MResult<T> = kimberley_machine::Result<T>;

impl StreamMigratable for QemuMachine {
    fn memory_size(&self) -> u64 {
        self.vm.config().memory_size
    }

    fn vcpus(&self) -> u32 {
        self.vm.config().vcpus
    }

    fn disk_paths(&self) -> Vec<PathBuf> {
        self.vm.config().disks.clone()
    }

    fn description(&self) -> MachineSpec {
        self.vm.config().spec(&self.vm.version().to_string())
    }

    fn memory_file(&self) -> MResult<File> {
        let (path, shared) = self.vm.memory_file();
        if !shared {
            return Err(Error::Config(format!(
                "{} is mapped privately: it is not the guest's RAM",
                path.display()
            ))
            .into());
        }
        Ok(self
            .vm
            .files()
            .memory
            .try_clone()
            .map_err(|e| Error::io("duplicating the memory file's descriptor", e))?)
    }

    fn boot_files(&self) -> MResult<Vec<File>> {
        let f = self.vm.files();
        let mut out = vec![f
            .kernel
            .try_clone()
            .map_err(|e| Error::io("duplicating the kernel's descriptor", e))?];
        if let Some(i) = &f.initrd {
            out.push(
                i.try_clone()
                    .map_err(|e| Error::io("duplicating the initrd's descriptor", e))?,
            );
        }
        Ok(out)
    }

    fn start_stream(&mut self, limits: &StreamLimits) -> MResult<UnixStream> {
        Ok(self.vm.live_start(limits.downtime_ms, limits.copy_disks)?)
    }

    fn stream_status(&mut self) -> MResult<StreamStatus> {
        let (s, p) = self.vm.live_status()?;
        Ok(StreamStatus {
            phase: match s {
                LiveState::Active => StreamPhase::Active,
                LiveState::PreSwitchover => StreamPhase::SwitchOver,
                LiveState::Device => StreamPhase::Device,
                LiveState::Completed => StreamPhase::Completed,
                LiveState::Failed(why) => StreamPhase::Failed(why),
            },
            transferred: p.transferred,
            remaining: p.remaining,
            dirty_syncs: p.dirty_syncs,
            dirty_rate: p.dirty_rate,
            throttle_pct: p.throttle_pct,
            pages: p.pages,
            zero_pages: p.zero_pages,
        })
    }

    fn force_switch_over(&mut self) -> MResult<()> {
        Ok(self.vm.live_force()?)
    }

    fn switch_over(&mut self) -> MResult<()> {
        Ok(self.vm.live_switch_over()?)
    }

    fn stream_paused_at(&mut self) -> Option<std::time::SystemTime> {
        self.vm.live_stopped_at()
    }

    fn cancel_stream(&mut self) -> MResult<()> {
        Ok(self.vm.live_cancel()?)
    }

    fn end_stream(&mut self) -> MResult<()> {
        Ok(self.vm.live_end()?)
    }
}

/// The files a received machine runs on, created in the VM directory being
/// written (the shared disks linked there by the caller).
#[derive(Debug)]
pub struct IncomingFiles {
    /// `memory.raw`, sized, empty.
    pub memory: File,
    /// The kernel, received.
    pub kernel: File,
    /// The initrd, received.
    pub initrd: Option<File>,
    /// The disks (read-write), in order.
    pub disks: Vec<File>,
}

impl QemuBackend {
    /// The configuration a sender's description stands for, its files in
    /// `dir` under their VM-directory names; refuses one this backend
    /// would not write or this host cannot run (machine type, QEMU
    /// version, accelerator).
    pub fn incoming_config(
        &self,
        spec: &MachineSpec,
        memory_size: u64,
        vcpus: u32,
        disks: usize,
        initrd: bool,
        dir: &Path,
    ) -> Result<MachineConfig> {
        spec.validate().map_err(Error::Unsupported)?;
        let cfg = MachineConfig::from_spec(
            spec,
            memory_size,
            vcpus,
            dir.join(file_name(Kind::Kernel, 0)),
            initrd.then(|| dir.join(file_name(Kind::Initrd, 0))),
            (0..disks)
                .map(|i| dir.join(file_name(Kind::Disk, i)))
                .collect(),
            Vec::new(),
            false,
        )?;
        self.check_host(spec, Path::new("the sender's VM"))?;
        Ok(cfg)
    }

    /// Starts QEMU for `cfg` (from [`QemuBackend::incoming_config`]) on
    /// `files`, paused, waiting for the live migration stream written into
    /// the returned socket.
    pub fn incoming(
        &self,
        cfg: &MachineConfig,
        files: IncomingFiles,
        dir: &Path,
    ) -> Result<(QemuMachine, UnixStream)> {
        let memory = dir.join(file_name(Kind::Memory, 0));
        let files = Files {
            memory: files.memory,
            kernel: files.kernel,
            initrd: files.initrd,
            disks: files.disks,
        };
        let (vm, stream) = Vm::live_incoming(&self.program, cfg, files, &memory)?;
        Ok((
            QemuMachine::new(vm, self.program.clone(), Home::Booted),
            stream,
        ))
    }
}

impl QemuMachine {
    /// Waits (at most `timeout`) until QEMU has loaded the whole incoming
    /// stream: its RAM (the memory file) is then final; the guest stays
    /// paused.
    pub fn wait_incoming(&mut self, timeout: Duration) -> Result<()> {
        self.vm.live_incoming_done(timeout)
    }

    /// Once the whole stream was fed: waits for QEMU to have loaded it
    /// (at most `timeout`), writes the device state into `w`, digests and
    /// commits it (named `name`), and makes the machine run in place on
    /// the committed directory; the guest stays paused until
    /// [`kimberley_machine::Machine::resume`]. `known`: digests of
    /// components (kind, index) the caller computed from their final
    /// contents ahead of the pause window's end; the others are read.
    pub fn commit_incoming(
        &mut self,
        w: VmDirWriter,
        name: &str,
        timeout: Duration,
        known: &[(Kind, usize, [u8; 32])],
    ) -> Result<PathBuf> {
        self.vm.live_incoming_done(timeout)?;
        let from = w.path().to_path_buf();
        let path = self.commit_received(w, name, known)?;
        self.vm.relocate(&from, &path);
        // It runs on the committed directory as `vmigrate run` would.
        self.sealed = false;
        self.home = Home::InPlace(path.clone());
        // The files must still be the ones QEMU runs on.
        open_checked(&path.join(file_name(Kind::Memory, 0)))?;
        Ok(path)
    }

    /// The suspend of a received machine, in the pause window: every
    /// component but the device state is already in `w` (the files QEMU
    /// runs on were created or linked there), so nothing is copied, and
    /// unlike a suspend no writeback is started (the guest runs on in
    /// these files at once; the receiver syncs after the hand-over): the
    /// device state is written, everything digested on all cores, the
    /// directory committed.
    fn commit_received(
        &mut self,
        w: VmDirWriter,
        name: &str,
        known: &[(Kind, usize, [u8; 32])],
    ) -> Result<PathBuf> {
        let dir = w.path().to_path_buf();
        let state = w.create_file(&file_name(Kind::State, 0))?;
        self.vm.save_state(&state)?;
        drop(state);
        let cfg = self.vm.config().clone();
        let mut kinds = vec![(Kind::Memory, 0)];
        kinds.extend((0..cfg.disks.len()).map(|i| (Kind::Disk, i)));
        kinds.push((Kind::Kernel, 0));
        if cfg.initrd.is_some() {
            kinds.push((Kind::Initrd, 0));
        }
        kinds.push((Kind::State, 0));
        let files = kinds
            .iter()
            .map(|&(kind, i)| {
                let p = dir.join(file_name(kind, i));
                let f = open_checked(&p)?;
                let size = super::stat(&f, &p)?.len();
                Ok((kind, p, f, size))
            })
            .collect::<Result<Vec<_>>>()?;
        let components = files
            .par_iter()
            .zip(kinds.par_iter())
            .map(|((kind, p, f, size), &(_, i))| {
                let digest = match known.iter().find(|k| k.0 == *kind && k.1 == i) {
                    Some(k) => k.2,
                    None => digest_file(f, *size)
                        .map_err(|e| Error::io(format!("reading {}", p.display()), e))?,
                };
                Ok(Component {
                    kind: *kind,
                    size: *size,
                    digest,
                    trimmed: false,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let manifest = Manifest {
            name: name.to_string(),
            vcpus: cfg.vcpus,
            components,
            machine: Some(Box::new(cfg.spec(&self.vm.version().to_string()))),
        };
        Ok(w.commit(&manifest)?)
    }
}
