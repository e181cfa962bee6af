//! Guest memory: one region at guest-physical 0, anonymous or a private
//! (copy-on-write) mapping of a memory file, and the sparse memory writer.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use kimberley_formats::chunk::is_zero;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::error::{Error, Result};
use crate::vstate::lazy::{LazyServer, LazyStats, OnError, PageSource};

/// Guest page size used for dirty tracking and sparse files.
pub const PAGE_SIZE: usize = 4096;

/// The VM's RAM.
#[derive(Clone, Debug)]
pub struct Memory {
    /// Serves first touches of lazily restored memory (None otherwise);
    /// declared first so it stops before the mapping goes.
    lazy: Option<Arc<LazyServer>>,
    mem: GuestMemoryMmap,
    host: *mut u8,
    size: usize,
    /// Mapped MAP_PRIVATE from a memory file ([`Memory::private_file`]).
    private_file: bool,
}

// SAFETY: `host` points into the mapping owned (through an Arc) by `mem`,
// which is Send + Sync; the pointer itself carries no thread affinity.
unsafe impl Send for Memory {}
// SAFETY: as above; concurrent access goes through volatile/bounds-checked
// vm-memory calls or happens while the vCPU is paused.
unsafe impl Sync for Memory {}

fn check_size(size: u64) -> Result<usize> {
    use crate::abi::{MAX_MEMORY, MIN_MEMORY};
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || size & ((2 << 20) - 1) != 0 {
        return Err(Error::Config(format!(
            "memory size {size} must be a multiple of 2 MiB between {MIN_MEMORY} and {MAX_MEMORY}"
        )));
    }
    Ok(size as usize)
}

impl Memory {
    /// Anonymous, zero-filled memory of `size` bytes.
    pub fn anonymous(size: u64) -> Result<Memory> {
        let size = check_size(size)?;
        let region = MmapRegion::<()>::build(
            None,
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Memory(format!("mmap {size} bytes: {e}")))?;
        Self::from_region(region, size)
    }

    /// Memory backed by `file` (opened by the caller, e.g. with
    /// `kimberley_formats::fsutil::open_regular`; `path` names it in
    /// messages) mapped MAP_PRIVATE: pages are read lazily on first touch
    /// and guest writes never reach the file. Its size is taken from the
    /// file itself.
    pub fn private_file(file: File, path: &Path, size: u64) -> Result<Memory> {
        Self::check_file(&file, path, size)?;
        let size = size as usize;
        let region = MmapRegion::<()>::build(
            Some(FileOffset::new(file, 0)),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
        .map_err(|e| Error::Memory(format!("mmap {}: {e}", path.display())))?;
        let mut m = Self::from_region(region, size)?;
        m.private_file = true;
        Ok(m)
    }

    /// Checks that `file` (named `path` in messages) is a regular file of
    /// `size` bytes, a valid memory size.
    pub fn check_file(file: &File, path: &Path, size: u64) -> Result<()> {
        check_size(size)?;
        kimberley_formats::fsutil::check_regular(file)
            .map_err(|e| Error::io(format!("memory file {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        if len != size {
            return Err(Error::StateMismatch(
                path.to_path_buf(),
                format!("memory file is {len} bytes, the state says {size}"),
            ));
        }
        Ok(())
    }

    /// Memory of `size` bytes whose pages `source` fills on first touch
    /// (by the guest, a device or the VMM), through userfaultfd.
    pub fn lazy(size: u64, source: Arc<dyn PageSource>) -> Result<Memory> {
        let mut m = Self::anonymous(size)?;
        m.lazy = Some(Arc::new(LazyServer::start(m.host, m.size, source)?));
        Ok(m)
    }

    /// [`Memory::lazy`] that records the first touches
    /// ([`LazyServer::start_recording`]).
    pub fn lazy_recording(size: u64, source: Arc<dyn PageSource>) -> Result<Memory> {
        let mut m = Self::anonymous(size)?;
        m.lazy = Some(Arc::new(LazyServer::start_recording(
            m.host, m.size, source,
        )?));
        Ok(m)
    }

    /// Pages first touched, in order (None unless [`Memory::lazy_recording`]).
    pub fn touched(&self) -> Option<Vec<u64>> {
        self.lazy.as_ref().and_then(|l| l.touched())
    }

    /// Sets what stops the VM if lazily restored memory cannot be served
    /// ([`LazyServer::on_error`]); nothing for other memory.
    pub fn on_lazy_error(&self, f: OnError) {
        if let Some(l) = &self.lazy {
            l.on_error(f);
        }
    }

    /// How first touches were served (None unless [`Memory::lazy`]).
    pub fn lazy_stats(&self) -> Option<LazyStats> {
        self.lazy.as_ref().map(|l| l.stats())
    }

    /// Why lazily restored memory could not be served, if it could not.
    pub fn lazy_error(&self) -> Option<String> {
        self.lazy.as_ref().and_then(|l| l.error())
    }

    fn from_region(region: MmapRegion<()>, size: usize) -> Result<Memory> {
        let host = region.as_ptr();
        let r = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| Error::Memory("region overflows the address space".into()))?;
        let mem =
            GuestMemoryMmap::from_regions(vec![r]).map_err(|e| Error::Memory(e.to_string()))?;
        Ok(Memory {
            mem,
            host,
            size,
            lazy: None,
            private_file: false,
        })
    }

    /// The vm-memory view (bounds-checked accesses).
    pub fn guest(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Size in bytes.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Host address of guest-physical 0.
    pub fn host_addr(&self) -> *mut u8 {
        self.host
    }

    /// The whole of guest memory as a byte slice.
    ///
    /// # Safety
    /// No vCPU may run (the guest could change the bytes under the slice)
    /// and no other reference to the memory may be written through while the
    /// slice lives.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: the mapping covers `size` bytes at `host` and lives as long
        // as `self`; the caller guarantees no concurrent writers.
        unsafe { std::slice::from_raw_parts(self.host, self.size) }
    }

    /// The metadata of the memory file mapped MAP_PRIVATE (None for other
    /// memory).
    pub fn file_metadata(&self) -> Option<std::fs::Metadata> {
        use vm_memory::GuestMemoryBackend;
        if !self.private_file {
            return None;
        }
        let r = self.mem.find_region(GuestAddress(0))?;
        r.file_offset()?.file().metadata().ok()
    }

    /// For memory mapped MAP_PRIVATE from a memory file: one flag per page,
    /// true where the page may differ from the file (it was copied on
    /// write, by the guest, a device or the VMM: `/proc/self/pagemap`
    /// says it is anonymous, present or swapped out). Pages not flagged
    /// still are the file's. None for other memory.
    pub fn pages_changed(&self) -> Result<Option<Vec<bool>>> {
        use kimberley_formats::sys::pagemap;
        if !self.private_file {
            return Ok(None);
        }
        let e = pagemap::entries(self.host as usize, self.size / PAGE_SIZE, PAGE_SIZE)
            .map_err(|e| Error::io("reading /proc/self/pagemap".to_string(), e))?;
        Ok(Some(
            e.into_iter().map(pagemap::differs_from_file).collect(),
        ))
    }

    /// Writes `bytes` at guest-physical `addr` (bounds-checked).
    pub fn write(&self, addr: u64, bytes: &[u8]) -> Result<()> {
        use vm_memory::Bytes;
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("write {} bytes at {addr:#x}: {e}", bytes.len())))
    }

    /// Reads into `bytes` from guest-physical `addr` (bounds-checked).
    pub fn read(&self, addr: u64, bytes: &mut [u8]) -> Result<()> {
        use vm_memory::Bytes;
        self.mem
            .read_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("read {} bytes at {addr:#x}: {e}", bytes.len())))
    }
}

/// Largest single write.
const MAX_RUN: usize = 16 << 20;

/// Writes `mem` to `path` as a sparse file: all-zero 4 KiB pages become
/// holes, runs of non-zero pages are written with large `pwrite`s. The file
/// is created private (0600) under a temporary name and renamed into place,
/// so `path` may be the file the memory was restored from.
pub fn write_sparse(mem: &[u8], path: &Path) -> Result<u64> {
    use kimberley_formats::fsutil::{create_private, temp_sibling};
    let tmp = temp_sibling(path);
    let f = create_private(&tmp).map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    let r = write_sparse_to(mem, &f, &tmp);
    drop(f);
    let r = r.and_then(|written| {
        std::fs::rename(&tmp, path)
            .map_err(|e| Error::io(format!("rename to {}", path.display()), e))?;
        Ok(written)
    });
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

fn write_sparse_to(mem: &[u8], f: &File, tmp: &Path) -> Result<u64> {
    let ctx = |what: &str| format!("{what} {}", tmp.display());
    f.set_len(mem.len() as u64)
        .map_err(|e| Error::io(ctx("truncate"), e))?;
    let mut written = 0u64;
    let mut run_start: Option<usize> = None;
    let mut off = 0usize;
    while off <= mem.len() {
        let zero = off == mem.len() || is_zero(&mem[off..off + PAGE_SIZE]);
        if let Some(s) = run_start {
            if zero || off - s >= MAX_RUN {
                f.write_all_at(&mem[s..off], s as u64)
                    .map_err(|e| Error::io(ctx("write"), e))?;
                written += (off - s) as u64;
                run_start = None;
            }
        }
        if off == mem.len() {
            break;
        }
        if !zero && run_start.is_none() {
            run_start = Some(off);
        }
        off += PAGE_SIZE;
    }
    Ok(written)
}
