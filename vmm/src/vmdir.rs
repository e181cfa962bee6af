//! VM directories and running VMs: suspend a VM into a VMDIR, resume one
//! from it. The VMDIR format itself belongs to `kimberley-formats`.

use std::fs::File;
use std::path::{Path, PathBuf};

use kimberley_formats::fsutil::copy_sparse;
use kimberley_formats::vmdir::dir::digest_file;
use kimberley_formats::vmdir::{Component, Kind, Manifest, VmDir, VmDirWriter};

use crate::error::{Error, Result};
use crate::vm::Vm;

/// Restores the VM stored in `dir` (memory mapped copy-on-write: the
/// directory's files are not modified until a later save; the disks are
/// used in place).
pub fn restore(dir: &VmDir) -> Result<Vm> {
    let m = &dir.manifest;
    let state_i = m.state_index().ok_or_else(|| {
        Error::Config(format!(
            "{} has no state blob: it is a powered-off VM, not a suspended one",
            dir.path.display()
        ))
    })?;
    let state_path = dir.component_path(state_i);
    let state = std::fs::read(&state_path)
        .map_err(|e| Error::io(format!("reading {}", state_path.display()), e))?;
    let disks = m
        .disk_indices()
        .into_iter()
        .map(|i| dir.component_path(i))
        .collect();
    Vm::restore(&dir.component_path(0), disks, &state)
}

/// Suspends `vm` into the VMDIR being built by `w`: writes `memory.raw`
/// (sparse) and `state.bin`, copies any disk not already in `w`'s
/// directory, hashes everything and commits. The VM is left paused.
pub fn save_into(vm: &mut Vm, w: VmDirWriter, name: &str) -> Result<PathBuf> {
    let dir = w.path().to_path_buf();
    let state = vm.save(&dir.join("memory.raw"))?;
    let mut components = vec![Component {
        kind: Kind::Memory,
        size: vm.memory_size(),
        digest: [0; 32],
    }];
    for (i, src) in vm.disk_paths().to_vec().iter().enumerate() {
        let name = format!("disk{i}.raw");
        let dst = dir.join(&name);
        if !same_file(src, &dst) {
            let s =
                File::open(src).map_err(|e| Error::io(format!("opening {}", src.display()), e))?;
            let size = s
                .metadata()
                .map_err(|e| Error::io(format!("stat {}", src.display()), e))?
                .len();
            let d = w.create_file(&name)?;
            copy_sparse(&s, size, &d, |_, _| Ok(()))?;
        }
        let size = std::fs::metadata(&dst)
            .map_err(|e| Error::io(format!("stat {}", dst.display()), e))?
            .len();
        components.push(Component {
            kind: Kind::Disk,
            size,
            digest: [0; 32],
        });
    }
    std::fs::write(dir.join("state.bin"), &state).map_err(|e| Error::io("writing state.bin", e))?;
    components.push(Component {
        kind: Kind::State,
        size: state.len() as u64,
        digest: [0; 32],
    });
    let mut manifest = Manifest {
        name: name.to_string(),
        vcpus: u32::from(vm.vcpus()),
        components,
    };
    for i in 0..manifest.components.len() {
        let p = dir.join(manifest.file_name(i));
        let f = File::open(&p).map_err(|e| Error::io(format!("opening {}", p.display()), e))?;
        manifest.components[i].digest = digest_file(&f, manifest.components[i].size)
            .map_err(|e| Error::io(format!("reading {}", p.display()), e))?;
    }
    Ok(w.commit(&manifest)?)
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// Suspends `vm`, which was restored from `dir`, back into `dir`: a new
/// version of the directory (disks hard-linked, since the VM wrote them in
/// place; new memory and state) replaces the old one atomically.
pub fn save_in_place(vm: &mut Vm, dir: &VmDir) -> Result<PathBuf> {
    let w = VmDirWriter::replacing(&dir.path)?;
    for (k, i) in dir.manifest.disk_indices().into_iter().enumerate() {
        let src = dir.component_path(i);
        let dst = w.path().join(format!("disk{k}.raw"));
        std::fs::hard_link(&src, &dst)
            .map_err(|e| Error::io(format!("linking {}", src.display()), e))?;
    }
    save_into(vm, w, &dir.manifest.name)
}
