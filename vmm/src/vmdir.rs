//! VM directories and running VMs: suspend a VM into a VMDIR, resume one
//! from it. The VMDIR format itself belongs to `kimberley-formats`.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use kimberley_formats::fsutil::{copy_sparse, occupied, open_regular, same_file};
use kimberley_formats::vmdir::dir::digest_file;
use kimberley_formats::vmdir::{file_name, Component, Kind, Manifest, VmDir, VmDirWriter};

use crate::error::{Error, Result};
use crate::vm::{OpenedFile, Vm};
use kimberley_machine::MemorySource;

/// Restores the VM stored in `dir` (memory mapped copy-on-write: the
/// directory's files are not modified until a later save; the disks are
/// used in place). Uses the files [`VmDir::open`] opened and checked: the
/// memory and state are read from them, each disk is opened read-write
/// only if it is still that same file.
pub fn restore(dir: &VmDir) -> Result<Vm> {
    restore_as(dir, MemorySource::PrivateFileMap)
}

/// [`restore`], memory brought in as `source` says.
pub fn restore_as(dir: &VmDir, source: MemorySource) -> Result<Vm> {
    let m = &dir.manifest;
    let state_i = m.state_index().ok_or_else(|| {
        Error::Config(format!(
            "{} has no state blob: it is a powered-off VM, not a suspended one",
            dir.path.display()
        ))
    })?;
    let state = dir.read_component(state_i)?;
    let memory = OpenedFile {
        file: dir.open_component(0)?,
        path: dir.component_path(0),
    };
    let disks = m
        .disk_indices()
        .into_iter()
        .map(|i| {
            Ok(OpenedFile {
                file: dir.open_component_rw(i)?,
                path: dir.component_path(i),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Vm::restore_opened_as(memory, disks, &state, source)
}

fn open_checked(p: &Path) -> Result<File> {
    open_regular(p, false).map_err(|e| Error::io(format!("opening {}", p.display()), e))
}

/// Suspends `vm` into the VMDIR being built by `w`: writes `memory.raw`
/// (sparse) and `state.bin`, copies any disk not already in `w`'s
/// directory, hashes everything and commits. The VM is left paused. Every
/// file is created private (0600); sizes and digests come from the files
/// opened without following links.
pub fn save_into(vm: &mut Vm, w: VmDirWriter, name: &str) -> Result<PathBuf> {
    let dir = w.path().to_path_buf();
    let state = vm.save(&dir.join(file_name(Kind::Memory, 0)))?;
    let mut components = vec![Component {
        kind: Kind::Memory,
        size: vm.memory_size(),
        digest: [0; 32],
        trimmed: false,
    }];
    for (i, src) in vm.disk_paths().to_vec().iter().enumerate() {
        let dname = file_name(Kind::Disk, i);
        let dst = dir.join(&dname);
        let s = open_checked(src)?;
        let stat = |f: &File, p: &Path| {
            f.metadata()
                .map_err(|e| Error::io(format!("stat {}", p.display()), e))
        };
        let s_meta = stat(&s, src)?;
        // Already there (created in place, or hard-linked by
        // `save_in_place`) or to be copied.
        let in_place = occupied(&dst) && same_file(&stat(&open_checked(&dst)?, &dst)?, &s_meta);
        if !in_place {
            let d = w.create_file(&dname)?;
            copy_sparse(&s, s_meta.len(), &d, |_, _| Ok(()))?;
        }
        let size = stat(&open_checked(&dst)?, &dst)?.len();
        components.push(Component {
            kind: Kind::Disk,
            size,
            digest: [0; 32],
            trimmed: false,
        });
    }
    let sname = file_name(Kind::State, 0);
    w.create_file(&sname)?
        .write_all(&state)
        .map_err(|e| Error::io(format!("writing {sname}"), e))?;
    components.push(Component {
        kind: Kind::State,
        size: state.len() as u64,
        digest: [0; 32],
        trimmed: false,
    });
    let mut manifest = Manifest {
        name: name.to_string(),
        vcpus: u32::from(vm.vcpus()),
        components,
        machine: None,
    };
    for i in 0..manifest.components.len() {
        let p = dir.join(manifest.file_name(i));
        let f = open_checked(&p)?;
        manifest.components[i].digest = digest_file(&f, manifest.components[i].size)
            .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
    }
    Ok(w.commit(&manifest)?)
}

/// Suspends `vm`, which was restored from `dir`, back into `dir`: a new
/// version of the directory (disks hard-linked, since the VM wrote them in
/// place; new memory and state) replaces the old one atomically.
pub fn save_in_place(vm: &mut Vm, dir: &VmDir) -> Result<PathBuf> {
    let w = VmDirWriter::replacing(&dir.path)?;
    for (k, i) in dir.manifest.disk_indices().into_iter().enumerate() {
        let src = dir.component_path(i);
        let dst = w.path().join(file_name(Kind::Disk, k));
        // link(2) does not follow a symbolic link: a link planted in place
        // of the disk is linked as a link, and refused by `save_into`.
        std::fs::hard_link(&src, &dst)
            .map_err(|e| Error::io(format!("linking {}", src.display()), e))?;
    }
    save_into(vm, w, &dir.manifest.name)
}
