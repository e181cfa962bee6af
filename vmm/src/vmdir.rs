//! VM directories and running VMs: suspend a VM into a VMDIR, resume one
//! from it. The VMDIR format itself belongs to `kimberley-formats`.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use kimberley_formats::chunk::is_zero;
use kimberley_formats::digest::{Digest, BLOCK};
use kimberley_formats::fsutil::{copy_sparse, occupied, open_regular, same_file};
use kimberley_formats::sys::clone;
use kimberley_formats::vmdir::dir::{block_hashes_file, digest_file};
use kimberley_formats::vmdir::{file_name, Component, Kind, Manifest, VmDir, VmDirWriter};

use crate::error::{Error, Result};
use crate::vm::{OpenedFile, Vm};
use crate::vstate::memory::{self, PAGE_SIZE};
use crate::vstate::origin::Origin;
use kimberley_formats::digest::{combine, data_block_hash};
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
    let mut vm = Vm::restore_opened_as(memory, disks, &state, source)?;
    attach_origin(&mut vm, dir, source)?;
    Ok(vm)
}

/// Records that `vm`'s memory is mapped copy-on-write from `dir`'s memory
/// file (nothing for lazily restored memory): its block hashes are computed
/// in the background, so a later suspend writes and rehashes only the pages
/// the VM changed.
pub(crate) fn attach_origin(vm: &mut Vm, dir: &VmDir, source: MemorySource) -> Result<()> {
    if source != MemorySource::PrivateFileMap {
        return Ok(());
    }
    let c = &dir.manifest.components[0];
    let f = dir.open_component(0)?;
    // The file the VM maps, not merely one at the same path.
    let same = match (f.metadata(), vm.memory().file_metadata()) {
        (Ok(a), Some(b)) => same_file(&a, &b),
        _ => false,
    };
    if same {
        let known = dir.read_memory_blocks();
        let lock = match vm.memory_lock() {
            Some(l) => Some(
                l.try_clone()
                    .map_err(|e| Error::io("duplicating the memory file's lock".to_string(), e))?,
            ),
            None => None,
        };
        vm.set_origin(match known {
            Some(h) => Origin::known(f, lock, c.size, c.digest, h),
            None => Origin::start(f, lock, c.size, c.digest),
        });
    }
    Ok(())
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
    let state = vm.save_state()?;
    let mem_path = dir.join(file_name(Kind::Memory, 0));
    let mem_hashes = match save_memory(vm, &w, &mem_path)? {
        Some(h) => h,
        None => {
            // Written whole: hashed from the file, its holes skipped.
            let f = open_checked(&mem_path)?;
            block_hashes_file(&f, vm.memory_size())
                .map_err(|e| Error::io(format!("reading {}", mem_path.display()), e))?
        }
    };
    // For the next restore: it then knows every block's hash at once.
    w.write_memory_blocks(vm.memory_size(), &mem_hashes)?;
    let mem_digest = Some(combine(vm.memory_size(), &mem_hashes));
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
        if let (0, Some(d)) = (i, mem_digest) {
            manifest.components[0].digest = d;
            continue;
        }
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
    // The memory file too when it is the one the VM maps: `save_memory`
    // then updates it in place.
    let mem = dir.component_path(0);
    let mapped = match (vm.origin_mut(), open_checked(&mem)) {
        (Some(o), Ok(f)) => match (o.file().metadata(), f.metadata()) {
            (Ok(a), Ok(b)) => same_file(&a, &b),
            _ => false,
        },
        _ => false,
    };
    if mapped {
        let dst = w.path().join(file_name(Kind::Memory, 0));
        std::fs::hard_link(&mem, &dst)
            .map_err(|e| Error::io(format!("linking {}", mem.display()), e))?;
    }
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

/// Writes the paused `vm`'s memory to `path` in `w`'s directory and returns
/// its component digest when it computed it (None: the caller hashes the
/// file). Memory mapped copy-on-write from a file whose block hashes are
/// known ([`Origin`]) is written as that file plus the pages the VM changed:
/// in place when `path` is a link to that file that no other VM holds
/// (`save_in_place`), else into a reflink of it where the file system
/// shares extents, else whole; either way only blocks holding changed pages
/// are rehashed. Other memory is written whole ([`memory::write_sparse`])
/// and hashed by the caller.
fn save_memory(vm: &mut Vm, w: &VmDirWriter, path: &Path) -> Result<Option<Vec<Digest>>> {
    let (memory, origin) = vm.memory_and_origin();
    // SAFETY: the vCPU is parked (the caller's save_state paused it) and
    // devices only write guest memory from the vCPU thread, so nothing
    // writes while the slice lives.
    let mem = unsafe { memory.as_slice() };
    // Where pagemap cannot be read, memory is written whole.
    let changed = memory.pages_changed().ok().flatten();
    let (Some(changed), Some(origin)) = (changed, origin) else {
        return full(mem, path);
    };
    if origin.size() != mem.len() as u64 || origin.hashes().is_none() {
        return full(mem, path);
    }
    let linked = occupied(path)
        && match (open_checked(path), origin.file().metadata()) {
            (Ok(f), Ok(o)) => f.metadata().is_ok_and(|m| same_file(&m, &o)),
            _ => false,
        };
    let in_place = linked && origin.lock_exclusive();
    let r = if in_place {
        let update = || {
            let f = open_regular(path, true)
                .map_err(|e| Error::io(format!("opening {}", path.display()), e))?;
            let same = match (f.metadata(), origin.file().metadata()) {
                (Ok(a), Ok(b)) => same_file(&a, &b),
                _ => false,
            };
            if !same {
                return Err(Error::Config(format!(
                    "{} changed while it was suspended into",
                    path.display()
                )));
            }
            write_changed(mem, &changed, &f, path)
        };
        update()
    } else {
        if linked {
            // Another VM holds the file: leave it alone, write a copy.
            std::fs::remove_file(path)
                .map_err(|e| Error::io(format!("unlinking {}", path.display()), e))?;
        }
        // A reflink of the file plus the changed pages where the file
        // system shares extents; elsewhere a copy would cost as much as
        // writing the whole of memory, so that is what is done.
        let name = file_name(Kind::Memory, 0);
        let f = w.create_file(&name)?;
        match clone::ficlone(&f, origin.file()) {
            Ok(()) => write_changed(mem, &changed, &f, path),
            Err(_) => {
                drop(f);
                memory::write_sparse(mem, path).map(|_| ())
            }
        }
    };
    let hashes = origin.hashes().map(|h| {
        let mut h = h.clone();
        rehash_changed(mem, &changed, &mut h);
        h
    });
    if in_place {
        // The file now holds what the new hashes say; after a failed write
        // nobody knows what it holds.
        origin.set_hashes(if r.is_ok() { hashes.clone() } else { None });
        origin.lock_shared();
    }
    r?;
    Ok(hashes)
}

/// Today's whole write: zero pages as holes, the rest with large writes.
fn full(mem: &[u8], path: &Path) -> Result<Option<Vec<Digest>>> {
    memory::write_sparse(mem, path)?;
    Ok(None)
}

/// Largest single write of changed pages.
const MAX_RUN: usize = 16 << 20;

/// Writes the pages flagged in `changed` from `mem` into `f` (named `path`
/// in messages) at their offsets: all-zero runs become holes (or written
/// zeros where the file system cannot punch), others are written.
fn write_changed(mem: &[u8], changed: &[bool], f: &File, path: &Path) -> Result<()> {
    use kimberley_formats::sys::punch;
    let ctx = |what: &str| format!("{what} {}", path.display());
    let flush = |s: usize, e: usize, zero: bool| -> Result<()> {
        if zero {
            match punch::punch_hole(f, s as u64, (e - s) as u64) {
                Ok(()) => return Ok(()),
                Err(e) if punch::is_unsupported(&e) => {}
                Err(e) => return Err(Error::io(ctx("punching a hole in"), e)),
            }
        }
        f.write_all_at(&mem[s..e], s as u64)
            .map_err(|e| Error::io(ctx("writing"), e))
    };
    let mut run: Option<(usize, bool)> = None;
    for (p, &c) in changed.iter().enumerate() {
        let off = p * PAGE_SIZE;
        let zero = c && is_zero(&mem[off..off + PAGE_SIZE]);
        if let Some((s, z)) = run {
            if !c || z != zero || off - s >= MAX_RUN {
                flush(s, off, z)?;
                run = None;
            }
        }
        if c && run.is_none() {
            run = Some((off, zero));
        }
    }
    if let Some((s, z)) = run {
        flush(s, mem.len(), z)?;
    }
    Ok(())
}

/// Recomputes, from `mem`, the hashes of the digest blocks holding a page
/// flagged in `changed`.
fn rehash_changed(mem: &[u8], changed: &[bool], hashes: &mut [Digest]) {
    let per_block = (BLOCK as usize) / PAGE_SIZE;
    for (b, h) in hashes.iter_mut().enumerate() {
        let pages =
            &changed[(b * per_block).min(changed.len())..((b + 1) * per_block).min(changed.len())];
        if pages.iter().any(|&c| c) {
            let s = b * BLOCK as usize;
            *h = data_block_hash(&mem[s..(s + BLOCK as usize).min(mem.len())]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kimberley_formats::digest::{block_count, digest_bytes};

    #[test]
    fn changed_pages_make_the_file_and_digest_of_memory() {
        // Three digest blocks and a bit; the file holds the old contents.
        let size = 3 * BLOCK as usize + 4 * PAGE_SIZE;
        let pages = size / PAGE_SIZE;
        let old: Vec<u8> = (0..size).map(|i| (i % 251) as u8 + 1).collect();
        let mut mem = old.clone();
        let mut changed = vec![false; pages];
        // A non-zero page, a zero run, a run spanning a block boundary,
        // the last page, and a changed page that equals the old one.
        for (first, n, byte) in [(1, 1, 9u8), (10, 3, 0), (255, 3, 7), (pages - 1, 1, 0)] {
            for p in first..first + n {
                mem[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].fill(byte);
                changed[p] = true;
            }
        }
        changed[600] = true;
        let t = tempfile::tempdir().unwrap();
        let path = t.path().join("memory.raw");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        f.write_all_at(&old, 0).unwrap();
        write_changed(&mem, &changed, &f, &path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), mem);
        let holes = kimberley_formats::sparse::data_extents(&f, size as u64).unwrap();
        assert!(
            !holes
                .iter()
                .any(|&(s, e)| s <= 10 * PAGE_SIZE as u64 && e >= 13 * PAGE_SIZE as u64),
            "the zero run was not punched: {holes:?}"
        );
        let mut h: Vec<Digest> = (0..block_count(size as u64) as usize)
            .map(|b| {
                data_block_hash(&old[b * BLOCK as usize..((b + 1) * BLOCK as usize).min(size)])
            })
            .collect();
        assert_eq!(combine(size as u64, &h), digest_bytes(&old));
        rehash_changed(&mem, &changed, &mut h);
        assert_eq!(combine(size as u64, &h), digest_bytes(&mem));
    }
}
