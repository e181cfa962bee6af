//! The memory file a VM's memory is mapped copy-on-write from, and its block hashes, so a suspend rewrites and rehashes only the pages the VM changed.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kimberley_formats::digest::{
    block_count, block_len, combine, data_block_hash, zero_block_hash, BlockDigests, Digest, BLOCK,
};
use kimberley_formats::sys::lock::{flock, Mode};

/// The file behind a [`crate::vstate::memory::Memory`] mapped MAP_PRIVATE,
/// with the per-block hashes (FORMAT.md section 3) of its contents, computed
/// by a background thread from the file and checked against the digest the
/// VMDIR's manifest gives it. Pages the VM never wrote still equal the
/// file's; a suspend needs new hashes only for blocks holding written pages.
#[derive(Debug)]
pub struct Origin {
    /// The mapped file (read).
    file: File,
    /// The description holding the VM's shared lock on the file.
    lock: Option<File>,
    size: u64,
    /// The digest the manifest gives the file.
    digest: Digest,
    stop: Arc<AtomicBool>,
    /// Filled by the background thread; a suspend that comes first hashes
    /// the blocks still marked itself, on all cores.
    progress: Arc<Mutex<BlockDigests>>,
    thread: Option<JoinHandle<()>>,
    hashes: Option<Vec<Digest>>,
}

impl Origin {
    /// Starts hashing `file` (`size` bytes, said to have component digest
    /// `digest`) in the background, at low priority.
    /// `lock` is the description holding the VM's shared lock on it.
    pub fn start(file: File, lock: Option<File>, size: u64, digest: Digest) -> Origin {
        let stop = Arc::new(AtomicBool::new(false));
        let mut d = BlockDigests::zeros(size);
        // Until the data extents are known every block is to be hashed.
        d.mark_all();
        let progress = Arc::new(Mutex::new(d));
        let thread = file.try_clone().ok().and_then(|f| {
            let (stop, progress) = (stop.clone(), progress.clone());
            std::thread::Builder::new()
                .name("memory-hash".into())
                .spawn(move || {
                    kimberley_formats::sys::sched::lower_priority();
                    hash_file(&f, size, &stop, &progress);
                })
                .ok()
        });
        Origin {
            file,
            lock,
            size,
            digest,
            stop,
            progress,
            thread,
            hashes: None,
        }
    }

    /// An origin whose block hashes are known already (`memory.blocks`,
    /// checked against `digest` by its reader): nothing to hash.
    pub fn known(
        file: File,
        lock: Option<File>,
        size: u64,
        digest: Digest,
        hashes: Vec<Digest>,
    ) -> Origin {
        Origin {
            file,
            lock,
            size,
            digest,
            stop: Arc::new(AtomicBool::new(false)),
            progress: Arc::new(Mutex::new(BlockDigests::zeros(0))),
            thread: None,
            hashes: Some(hashes),
        }
    }

    /// The mapped file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The file's block hashes, waiting for the background thread if it is
    /// not done; None if they could not be computed or the file does not
    /// match the manifest's digest.
    pub fn hashes(&mut self) -> Option<&mut Vec<Digest>> {
        if let Some(t) = self.thread.take() {
            // Stops it at the next block; what is left is hashed here.
            self.stop.store(true, Ordering::SeqCst);
            let _ = t.join();
            let mut d = match self.progress.lock() {
                Ok(d) => d,
                Err(p) => p.into_inner(),
            };
            self.hashes = d
                .rehash(&self.file)
                .ok()
                .filter(|_| combine(self.size, d.hashes()) == self.digest)
                .map(|_| d.hashes().to_vec());
        }
        self.hashes.as_mut()
    }

    /// Replaces the block hashes (after the file was updated in place).
    pub fn set_hashes(&mut self, h: Option<Vec<Digest>>) {
        if let Some(t) = self.thread.take() {
            self.stop.store(true, Ordering::SeqCst);
            let _ = t.join();
        }
        self.hashes = h;
    }

    /// Whether the block hashes are ready without waiting.
    pub fn hashed(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Turns the VM's shared lock on the file exclusive if no other open
    /// file description holds a lock on it (every restore takes a shared
    /// lock on the memory file it maps or reads, on a description of its
    /// own: [`crate::vm::Vm::restore_patched`]), so no other VM reads the
    /// file while it is updated in place. False without a lock.
    pub fn lock_exclusive(&self) -> bool {
        let Some(l) = &self.lock else { return false };
        if flock(l, Mode::Exclusive, false).is_ok() {
            return true;
        }
        // Linux drops the shared lock before it tries the exclusive one,
        // and does not give it back when that fails.
        self.lock_shared();
        false
    }

    /// Goes back to the shared lock every restore holds.
    pub fn lock_shared(&self) {
        if let Some(l) = &self.lock {
            let _ = flock(l, Mode::Shared, true);
        }
    }

    /// Size of the file in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Hashes the data blocks of `f` (`size` bytes; holes are not read) into
/// `progress`, one block at a time, until done, a read fails or `stop` is
/// set; unmarks the hole blocks first.
fn hash_file(f: &File, size: u64, stop: &AtomicBool, progress: &Mutex<BlockDigests>) {
    let Ok(extents) = kimberley_formats::sparse::data_extents(f, size) else {
        return;
    };
    let mut data = vec![false; block_count(size) as usize];
    for &(start, end) in &extents {
        let mut b = start / BLOCK;
        while b * BLOCK < end {
            data[b as usize] = true;
            b += 1;
        }
    }
    {
        let Ok(mut d) = progress.lock() else { return };
        for (b, &has_data) in data.iter().enumerate() {
            if !has_data {
                d.set(b as u64, zero_block_hash(block_len(size, b as u64)));
            }
        }
    }
    let mut buf = vec![0u8; BLOCK as usize];
    for (b, &has_data) in data.iter().enumerate() {
        if !has_data {
            continue;
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let b = b as u64;
        let len = block_len(size, b);
        if kimberley_formats::fsutil::read_at_zero_padded(f, &mut buf[..len], b * BLOCK, size)
            .is_err()
        {
            return;
        }
        let h = data_block_hash(&buf[..len]);
        let Ok(mut d) = progress.lock() else { return };
        d.set(b, h);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn hashes_match_the_component_digest_and_a_wrong_digest_gives_none() {
        let f = tempfile::tempfile().unwrap();
        let size = 3 * BLOCK + 8192;
        f.set_len(size).unwrap();
        let mut img = vec![0u8; size as usize];
        for (off, b) in [(4096u64, 1u8), (2 * BLOCK + 5, 2), (3 * BLOCK + 4096, 3)] {
            f.write_all_at(&[b; 100], off).unwrap();
            img[off as usize..off as usize + 100].fill(b);
        }
        let d = kimberley_formats::digest::digest_bytes(&img);
        let mut o = Origin::start(f.try_clone().unwrap(), None, size, d);
        let h = o.hashes().unwrap().clone();
        assert_eq!(combine(size, &h), d);
        let mut wrong = Origin::start(f, None, size, [0; 32]);
        assert!(wrong.hashes().is_none());
    }

    #[test]
    fn hashes_asked_for_early_are_finished_in_the_foreground() {
        // Large enough that the background thread is usually still busy.
        let f = tempfile::tempfile().unwrap();
        let size = 48 * BLOCK;
        f.set_len(size).unwrap();
        let mut img = vec![0u8; size as usize];
        for b in (0..48).step_by(2) {
            let off = b * BLOCK + 4096;
            f.write_all_at(&[b as u8 + 1; 8192], off).unwrap();
            img[off as usize..off as usize + 8192].fill(b as u8 + 1);
        }
        let d = kimberley_formats::digest::digest_bytes(&img);
        let mut o = Origin::start(f, None, size, d);
        let h = o.hashes().unwrap().clone();
        assert_eq!(combine(size, &h), d);
    }

    #[test]
    fn a_failed_upgrade_keeps_the_shared_lock() {
        use kimberley_formats::sys::lock::reopen;
        let f = tempfile::tempfile().unwrap();
        let mine = reopen(&f).unwrap();
        flock(&mine, Mode::Shared, true).unwrap();
        let o = Origin::start(f.try_clone().unwrap(), Some(mine), 0, [0; 32]);
        let other = reopen(&f).unwrap();
        flock(&other, Mode::Shared, true).unwrap();
        assert!(!o.lock_exclusive());
        drop(other);
        // The origin still holds its shared lock: nobody else gets the
        // file exclusively.
        let third = reopen(&f).unwrap();
        assert!(flock(&third, Mode::Exclusive, false).is_err());
        // With no other holder the upgrade succeeds.
        drop(third);
        assert!(o.lock_exclusive());
        o.lock_shared();
    }
}
