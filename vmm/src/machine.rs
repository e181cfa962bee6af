//! The microVM behind the machine seam: [`MicroVmBackend`] restores VM
//! directories of the test guest, and [`Vm`] is a [`Machine`], its own
//! [`GuestAgent`] (the serial script protocol) and [`Migratable`].

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use std::os::unix::fs::FileExt;

use kimberley_formats::apply::early::Early;
use kimberley_formats::fsutil::copy_sparse;
use kimberley_formats::sys::punch::punch_hole;
use kimberley_formats::vmdir::patched::{Patched, Piece};
use kimberley_formats::vmdir::{file_name, Kind, Manifest, VmDir, VmDirWriter};
use kimberley_machine::{
    Backend, Bitmap, GuestAgent, Machine, MachineInfo, MemorySource, Migratable, Placement,
    Reclaim, Reclaimed, RestoreOptions, ScriptOutcome,
};

use crate::devices::virtio_blk::DiskGate;
use crate::error::Error;
use crate::vm::{OpenedFile, Vm};
use crate::vmdir;

/// The name VM directories of this backend record.
pub const BACKEND: &str = "microvm";

/// How long a restored guest may take to reach its first instruction.
const FIRST_RUN: Duration = Duration::from_secs(10);

impl From<Error> for kimberley_machine::Error {
    fn from(e: Error) -> Self {
        use kimberley_machine::Error as M;
        match e {
            Error::VmDir(f) => M::VmDir(f),
            Error::Timeout(t) => M::Timeout(t),
            Error::Interrupted => M::Interrupted,
            Error::Paused => M::Paused,
            Error::Script(s) => M::Script(s),
            e @ (Error::TripleFault | Error::GuestPanic(_) | Error::VcpuStopped(_)) => {
                M::GuestStopped(e.to_string())
            }
            other => M::Backend {
                backend: BACKEND,
                message: other.to_string(),
            },
        }
    }
}

type MResult<T> = kimberley_machine::Result<T>;

/// Restores microVM directories (the project's KVM test guest).
#[derive(Debug, Default, Clone, Copy)]
pub struct MicroVmBackend;

impl Backend for MicroVmBackend {
    fn name(&self) -> &'static str {
        BACKEND
    }

    fn check(&self, dir: &VmDir) -> MResult<()> {
        if dir.manifest.state_index().is_none() {
            return Err(Error::Config(format!(
                "{} has no state blob: it is a powered-off VM, not a suspended one",
                dir.path.display()
            ))
            .into());
        }
        Ok(())
    }

    fn restore(&self, dir: &VmDir, opts: RestoreOptions<'_>) -> MResult<Box<dyn Machine>> {
        self.check(dir)?;
        if !opts.forwards.is_empty() || opts.network {
            return Err(kimberley_machine::Error::Unsupported(
                "the microVM has no network: it cannot reach one, nor can ports be forwarded"
                    .into(),
            ));
        }
        let vm = match opts.placement {
            Placement::InPlace => vmdir::restore_as(dir, opts.memory)?,
            Placement::CopyInto(w) => restore_copy(dir, w, opts.memory)?,
        };
        vm.wait_first_exit(FIRST_RUN)?;
        Ok(Box::new(vm))
    }

    fn patched_restore(&self) -> bool {
        true
    }

    fn serves_arriving(&self) -> bool {
        true
    }

    fn restore_arriving(
        &self,
        early: &Early,
        launch: &Manifest,
        out: &Path,
    ) -> MResult<Box<dyn Machine>> {
        let state_i = launch.state_index().ok_or_else(|| {
            Error::Config("the launch VM has no state blob: it is not a suspended VM".into())
        })?;
        let io = |what: &str, e: std::io::Error| Error::io(what.to_string(), e);
        // The state first: every chunk of it, waiting for any that has not
        // arrived (an overlay whose working set lacks it starts late).
        let mut state = vec![0u8; launch.components[state_i].size as usize];
        early
            .read(state_i, 0, &mut state)
            .map_err(|e| io("reading the launch VM's state", e))?;
        let mut files: Vec<Option<std::fs::File>> = early
            .output_files()
            .map_err(|e| io("opening the launch VM's disks", e))?
            .into_iter()
            .map(Some)
            .collect();
        let mut disks = Vec::new();
        for i in launch.disk_indices() {
            let file = files
                .get_mut(i)
                .and_then(Option::take)
                .ok_or_else(|| Error::Config("a disk with no file".into()))?;
            let e = early.clone();
            let gate: DiskGate =
                Box::new(move |off, len| e.wait_written(i, off.saturating_add(len)));
            disks.push((
                OpenedFile {
                    file,
                    path: out.join(launch.file_name(i)),
                },
                gate,
            ));
        }
        let vm = Vm::restore_arriving(early.clone(), disks, &state)?;
        vm.wait_first_exit(FIRST_RUN)?;
        Ok(Box::new(vm))
    }

    fn restore_patched(&self, vm: &Patched, opts: RestoreOptions<'_>) -> MResult<Box<dyn Machine>> {
        let unsupported = |why: &str| Err(kimberley_machine::Error::Unsupported(why.into()));
        if !opts.forwards.is_empty() || opts.network {
            return unsupported(
                "the microVM has no network: it cannot reach one, nor can ports be forwarded",
            );
        }
        let Placement::CopyInto(w) = opts.placement else {
            return unsupported("a patched VM runs on copies in a new directory only");
        };
        if opts.memory != MemorySource::PrivateFileMap {
            return unsupported("a patched VM's memory is mapped from its base's file only");
        }
        let vm = restore_patched_copy(vm, w)?;
        vm.wait_first_exit(FIRST_RUN)?;
        Ok(Box::new(vm))
    }
}

/// Restores `vm` to run on copies of its disks in `w`, made from the
/// base's files with the patches written over them; memory is the base's
/// file mapped copy-on-write with the memory patches written into it, so
/// the base is never modified.
fn restore_patched_copy(vm: &Patched, w: &VmDirWriter) -> crate::Result<Vm> {
    let m = &vm.manifest;
    let files = vm.open_files()?;
    let mut disks = Vec::new();
    for (k, i) in m.disk_indices().into_iter().enumerate() {
        let name = file_name(Kind::Disk, k);
        let dst = w.create_file(&name)?;
        let size = m.components[i].size;
        match &files[i] {
            Some((src, bsize)) => {
                copy_sparse(src, (*bsize).min(size), &dst, |_, _| Ok(()))?;
                dst.set_len(size)
                    .map_err(|e| Error::Io(format!("sizing {name}"), e))?;
            }
            None => dst
                .set_len(size)
                .map_err(|e| Error::Io(format!("sizing {name}"), e))?,
        }
        for (off, piece) in vm.patches[i].pieces() {
            match piece {
                Piece::Data(d) => dst.write_all_at(d, *off),
                Piece::Zero(n) => punch_hole(&dst, *off, *n),
            }
            .map_err(|e| Error::Io(format!("writing {name}"), e))?;
        }
        disks.push(OpenedFile {
            file: dst,
            path: w.path().join(name),
        });
    }
    let state_i = m
        .state_index()
        .ok_or_else(|| Error::Config(format!("{} has no state blob", vm.path().display())))?;
    let state = vm.read_component(state_i)?;
    // Memory is the first component (as `restore_copy` reads it).
    let mem_i = 0;
    let memory = match (&files[mem_i], vm.paired[mem_i]) {
        (Some((_, bsize)), Some(b))
            if m.components[mem_i].kind == Kind::Memory && *bsize == m.components[mem_i].size =>
        {
            OpenedFile {
                file: vm.base.open_component(b)?,
                path: vm.base.component_path(b),
            }
        }
        _ => {
            return Err(Error::Config(format!(
                "{}: the launch VM's memory is not the size of its base's",
                vm.path().display()
            )))
        }
    };
    Vm::restore_patched(
        memory,
        disks,
        &state,
        MemorySource::PrivateFileMap,
        Some(&vm.patches[mem_i]),
    )
}

/// Restores `dir` to run on copies of its disks in `w` (its memory is
/// mapped copy-on-write, so `dir` is never modified). The VM uses the files
/// opened here and by `VmDir::open`, never a path looked up again.
fn restore_copy(dir: &VmDir, w: &VmDirWriter, source: MemorySource) -> crate::Result<Vm> {
    let mut disks = Vec::new();
    for (k, i) in dir.manifest.disk_indices().into_iter().enumerate() {
        let name = file_name(Kind::Disk, k);
        let dst = w.create_file(&name)?;
        copy_sparse(
            &dir.open_component(i)?,
            dir.manifest.components[i].size,
            &dst,
            |_, _| Ok(()),
        )?;
        disks.push(OpenedFile {
            file: dst,
            path: w.path().join(name),
        });
    }
    let state_i = dir
        .manifest
        .state_index()
        .ok_or_else(|| Error::Config(format!("{} has no state blob", dir.path.display())))?;
    let state = dir.read_component(state_i)?;
    let memory = OpenedFile {
        file: dir.open_component(0)?,
        path: dir.component_path(0),
    };
    let mut vm = Vm::restore_opened_as(memory, disks, &state, source)?;
    vmdir::attach_origin(&mut vm, dir, source)?;
    Ok(vm)
}

impl GuestAgent for Vm {
    fn ping(&mut self, timeout: Duration) -> MResult<()> {
        let o = Vm::run_script(self, "print ready", &mut |_| {}, timeout)?;
        if o.status != 0 {
            return Err(kimberley_machine::Error::GuestStopped(
                "the guest did not answer".into(),
            ));
        }
        Ok(())
    }

    fn run_script(
        &mut self,
        script: &str,
        on_line: &mut dyn FnMut(&str),
        timeout: Duration,
    ) -> MResult<ScriptOutcome> {
        Ok(Vm::run_script(self, script, on_line, timeout)?)
    }

    /// The test guest has no file system and no page cache: its disk
    /// discards are its own (`disk-discard`), so nothing is asked of it.
    fn reclaim(&mut self, _what: Reclaim, _timeout: Duration) -> MResult<Reclaimed> {
        Ok(Reclaimed::NotApplicable(
            "the microVM's test guest has no file system or page cache to trim or drop".into(),
        ))
    }
}

impl Machine for Vm {
    fn info(&self) -> MachineInfo {
        MachineInfo {
            backend: BACKEND,
            memory_size: Vm::memory_size(self),
            vcpus: u32::from(Vm::vcpus(self)),
            disks: Vm::disk_paths(self).to_vec(),
            uptime: self.uptime(),
            ready: self.is_ready(),
            exited: self.exit_error().map(|e| e.to_string()),
        }
    }

    fn pause(&mut self) -> MResult<()> {
        Ok(Vm::pause(self)?)
    }

    fn pause_reproducibly(&mut self, timeout: Duration) -> MResult<bool> {
        Ok(Vm::pause_reproducibly(self, timeout)?)
    }

    fn resume(&mut self) -> MResult<()> {
        Ok(Vm::resume(self)?)
    }

    fn is_paused(&self) -> bool {
        Vm::is_paused(self)
    }

    fn agent(&mut self) -> &mut dyn GuestAgent {
        self
    }

    fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        Vm::set_interrupt(self, flag)
    }

    fn take_console_lines(&mut self) -> Vec<String> {
        Vm::take_console_lines(self)
    }

    fn first_run(&self) -> Option<Instant> {
        self.first_entry()
    }

    fn touched_pages(&self) -> Option<Vec<u64>> {
        Vm::touched_pages(self)
    }

    fn memory_faults(&self) -> Option<(u64, u64)> {
        self.lazy_stats()
            .map(|s| (s.faults, s.data_pages + s.zero_pages))
    }

    fn suspend_into(&mut self, w: VmDirWriter, name: &str) -> MResult<PathBuf> {
        Ok(vmdir::save_into(self, w, name)?)
    }

    fn suspend_in_place(&mut self, dir: &VmDir) -> MResult<PathBuf> {
        Ok(vmdir::save_in_place(self, dir)?)
    }

    fn migratable(&mut self) -> Option<&mut dyn Migratable> {
        Some(self)
    }
}

impl Migratable for Vm {
    fn memory_size(&self) -> u64 {
        Vm::memory_size(self)
    }

    fn vcpus(&self) -> u32 {
        u32::from(Vm::vcpus(self))
    }

    fn disk_paths(&self) -> Vec<PathBuf> {
        Vm::disk_paths(self).to_vec()
    }

    fn read_memory(&self, offset: u64, buf: &mut [u8]) -> MResult<()> {
        Ok(self.memory().read(offset, buf)?)
    }

    fn set_dirty_logging(&mut self, on: bool) -> MResult<()> {
        Ok(Vm::set_dirty_logging(self, on)?)
    }

    fn dirty_pages(&mut self) -> MResult<Bitmap> {
        Ok(Vm::dirty_pages(self)?)
    }

    fn dirty_disk_blocks(&mut self, disk: usize) -> MResult<Bitmap> {
        Ok(Vm::dirty_disk_blocks(self, disk)?)
    }

    fn set_throttle(&mut self, pct: u32) {
        Vm::set_throttle(self, pct)
    }

    fn throttle(&self) -> u32 {
        Vm::throttle(self)
    }

    fn save_state(&mut self) -> MResult<Vec<u8>> {
        Ok(Vm::save_state(self)?)
    }

    fn pause(&mut self) -> MResult<()> {
        Ok(Vm::pause(self)?)
    }

    fn resume(&mut self) -> MResult<()> {
        Ok(Vm::resume(self)?)
    }

    fn is_paused(&self) -> bool {
        Vm::is_paused(self)
    }
}
