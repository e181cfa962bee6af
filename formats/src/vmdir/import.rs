//! `kimberlize import`: wrap raw images into a VM directory, reading each
//! once (copying and hashing in the same pass) and keeping holes.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::dir::VmDirWriter;
use super::manifest::{Component, Kind, Manifest};
use crate::digest::SparseHasher;
use crate::error::{IoContext, Result};
use crate::fsutil::copy_sparse;

/// What to import.
#[derive(Debug, Clone)]
pub struct ImportSpec {
    /// VM name.
    pub name: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Raw guest memory.
    pub memory: PathBuf,
    /// Raw disks, in order.
    pub disks: Vec<PathBuf>,
    /// Opaque state blob.
    pub state: Option<PathBuf>,
}

/// Imports into a new VMDIR at `out`; returns its manifest.
pub fn import(out: &Path, spec: &ImportSpec) -> Result<Manifest> {
    let w = VmDirWriter::create(out)?;
    let mut sources: Vec<(Kind, &Path)> = vec![(Kind::Memory, &spec.memory)];
    sources.extend(spec.disks.iter().map(|d| (Kind::Disk, d.as_path())));
    if let Some(s) = &spec.state {
        sources.push((Kind::State, s));
    }
    let mut manifest = Manifest {
        name: spec.name.clone(),
        vcpus: spec.vcpus,
        components: Vec::new(),
        machine: None,
    };
    for (kind, src) in sources {
        let f = File::open(src).ctx(|| format!("opening {}", src.display()))?;
        let size = f
            .metadata()
            .ctx(|| format!("stat {}", src.display()))?
            .len();
        manifest.components.push(Component {
            kind,
            size,
            digest: [0; 32],
        });
        let i = manifest.components.len() - 1;
        let dst = w.create_file(&manifest.file_name(i))?;
        let mut h = SparseHasher::new(size);
        copy_sparse(&f, size, &dst, |off, data| {
            h.feed(off, data);
            Ok(())
        })
        .map_err(|e| match e {
            crate::Error::Io { context, source } => crate::Error::Io {
                context: format!("importing {}: {context}", src.display()),
                source,
            },
            other => other,
        })?;
        manifest.components[i].digest = h.finish();
    }
    w.commit(&manifest)?;
    Ok(manifest)
}
