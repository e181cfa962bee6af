//! Digests of files a hypervisor is still writing (a received stream's
//! memory and disks), kept nearly current in the background so that the
//! pause re-digests only the blocks that changed since.
//!
//! A background thread of the lowest priority passes over the files again
//! and again. For each digest block (FORMAT.md section 3) holding data it
//! reads the bytes once and keeps two hashes of them: the SUMS hashes of
//! its pieces (XXH3-128, cheap) and its digest-block hash (BLAKE3). Both
//! come from the same read, so they agree even when the hypervisor wrote
//! the block during the read. A later pass that finds the same SUMS hashes
//! skips the BLAKE3. In the pause the caller hashes the final contents with
//! [`crate::sums::file_sums`] (for the memory it does so anyway, for SUMS)
//! and [`Prehash::finish`] keeps the BLAKE3 hash of every block whose SUMS
//! hashes are those a pass saw, and reads the others again.
//!
//! The equality of XXH3-128 hashes stands for the equality of the bytes,
//! as it does for the memory check (docs/MIGRATION.md, "QEMU guests"):
//! bytes made to collide can only come from the guest, and they only make
//! its own VM directory's digest wrong (a later check of the directory
//! fails).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kimberley_formats::digest::{self, BlockDigests, Digest, BLOCK};

use crate::protocol::{SUM_BLOCK, SUM_LEN};
use crate::sums;

/// SUMS pieces per digest block.
const PER: u64 = BLOCK / SUM_BLOCK;
const _: () = assert!(BLOCK.is_multiple_of(SUM_BLOCK));

/// A background pass starts at most this often.
const PASS_EVERY: Duration = Duration::from_millis(300);

/// What a pass saw of one digest block: the SUMS hashes of its pieces and
/// its digest-block hash, both of the same bytes.
#[derive(Clone)]
struct Seen {
    sums: Vec<[u8; SUM_LEN]>,
    hash: Digest,
}

/// Per file, per digest block: what the latest pass saw.
type Table = Vec<Vec<Option<Seen>>>;

fn lock(t: &Mutex<Table>) -> MutexGuard<'_, Table> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

/// The background hashing of a set of files.
pub struct Prehash {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Table>>,
    sizes: Vec<u64>,
    /// Never joined outside tests: a thread of the lowest priority may
    /// wait long for a core, and the pause must not wait for it.
    #[cfg_attr(not(test), allow(dead_code))]
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prehash {
    /// Starts hashing `files` (each with the size it has and keeps, and
    /// whether to start its writeback after each pass) on a thread of the
    /// lowest priority. Writeback: QEMU flushes its disks when it saves the
    /// device state in the pause, and a disk its stream filled would
    /// otherwise still hold all of that in dirty pages.
    pub fn start(files: Vec<(File, u64, bool)>) -> Prehash {
        let sizes: Vec<u64> = files.iter().map(|f| f.1).collect();
        let table: Table = sizes
            .iter()
            .map(|&s| vec![None; digest::block_count(s) as usize])
            .collect();
        let seen = Arc::new(Mutex::new(table));
        let stop = Arc::new(AtomicBool::new(false));
        let (st, se) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            kimberley_formats::sys::sched::lower_priority();
            passes(&files, &st, &se);
        });
        Prehash {
            stop,
            seen,
            sizes,
            thread: Some(thread),
        }
    }

    /// Stops the passes (the thread ends at its next block).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// The size file `k` was started with.
    pub fn size(&self, k: usize) -> u64 {
        self.sizes[k]
    }

    /// Stops the passes (without waiting for the thread) and returns the
    /// block hashes of file `k` for each `(k, file, now)`, where `now` is
    /// [`crate::sums::file_sums`] of its current contents: a block whose
    /// pieces all hash as zeros is zeros, a block whose hashes a pass saw
    /// keeps that pass's digest-block hash, any other is read again (on all
    /// cores). Also returns how many blocks were read again.
    pub fn finish(
        self,
        files: &[(usize, &File, &[[u8; SUM_LEN]])],
    ) -> std::io::Result<(Vec<Vec<Digest>>, u64)> {
        self.stop.store(true, Ordering::SeqCst);
        let seen = std::mem::take(&mut *lock(&self.seen));
        let mut out = Vec::with_capacity(files.len());
        let mut reread = 0;
        for &(k, f, now) in files {
            let size = self.sizes[k];
            let mut d = BlockDigests::zeros(size);
            for i in 0..digest::block_count(size) {
                let first = i * PER;
                let last = ((i + 1) * PER).min(sums::blocks(size));
                let Some(cur) = now.get(first as usize..last as usize) else {
                    d.mark(i * BLOCK);
                    continue;
                };
                let zero = (first..last).zip(cur).all(|(p, s)| {
                    *s == sums::zero_sum((size - p * SUM_BLOCK).min(SUM_BLOCK) as usize)
                });
                if zero {
                    continue;
                }
                match seen.get(k).and_then(|b| b.get(i as usize)) {
                    Some(Some(s)) if s.sums == cur => d.set(i, s.hash),
                    _ => d.mark(i * BLOCK),
                }
            }
            reread += d.rehash(f)?;
            out.push(d.hashes().to_vec());
        }
        Ok((out, reread))
    }

    /// Stops the passes and waits for the thread to end.
    #[cfg(test)]
    fn halt(mut self) -> Self {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self
    }

    /// Digest blocks some pass has hashed so far.
    #[cfg(test)]
    fn hashed(&self) -> usize {
        lock(&self.seen)
            .iter()
            .flatten()
            .filter(|s| s.is_some())
            .count()
    }
}

impl Drop for Prehash {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The background thread: passes over the blocks of `files` that hold data
/// until `stop`; a read error ends it (the pause then reads what it lacks).
fn passes(files: &[(File, u64, bool)], stop: &AtomicBool, seen: &Mutex<Table>) {
    let mut buf = vec![0u8; digest::BLOCK_SIZE];
    while !stop.load(Ordering::SeqCst) {
        let t = Instant::now();
        for (k, (f, size, writeback)) in files.iter().enumerate() {
            let Ok(extents) = kimberley_formats::sparse::data_extents(f, *size) else {
                return;
            };
            let mut next = 0u64;
            for (start, end) in extents {
                for i in (start / BLOCK).max(next)..end.div_ceil(BLOCK) {
                    if stop.load(Ordering::SeqCst) {
                        return;
                    }
                    let b = &mut buf[..digest::block_len(*size, i)];
                    if kimberley_formats::fsutil::read_at_zero_padded(f, b, i * BLOCK, *size)
                        .is_err()
                    {
                        return;
                    }
                    let now: Vec<[u8; SUM_LEN]> =
                        b.chunks(SUM_BLOCK as usize).map(sums::sum).collect();
                    let same = lock(seen)
                        .get(k)
                        .and_then(|v| v.get(i as usize))
                        .is_some_and(|s| s.as_ref().is_some_and(|s| s.sums == now));
                    if !same {
                        let hash = digest::data_block_hash(b);
                        if let Some(slot) =
                            lock(seen).get_mut(k).and_then(|v| v.get_mut(i as usize))
                        {
                            *slot = Some(Seen { sums: now, hash });
                        }
                    }
                    next = i + 1;
                }
            }
            if *writeback {
                kimberley_formats::sys::file::start_writeback(f.as_raw_fd());
            }
        }
        while t.elapsed() < PASS_EVERY {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn wait_for(p: &Prehash, blocks: usize) {
        let t = Instant::now();
        while p.hashed() < blocks {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no pass hashed the blocks"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn finish(p: Prehash, f: &File, size: u64) -> (Vec<Digest>, u64) {
        let now = sums::file_sums(f, size).unwrap();
        let (mut d, n) = p.finish(&[(0, f, &now)]).unwrap();
        (d.remove(0), n)
    }

    #[test]
    fn only_blocks_changed_since_a_pass_are_read_again() {
        let f = tempfile::tempfile().unwrap();
        // Five digest blocks and a partial one: data in 0, 1, 3 and the
        // partial one, 2 and 4 holes.
        let size = 5 * BLOCK + 12_345;
        f.set_len(size).unwrap();
        for (at, v) in [
            (70_000u64, 1u8),
            (BLOCK + 70_000, 2),
            (3 * BLOCK, 3),
            (5 * BLOCK + 100, 4),
        ] {
            f.write_all_at(&vec![v; 5000], at).unwrap();
        }
        let p = Prehash::start(vec![(f.try_clone().unwrap(), size, true)]);
        wait_for(&p, 4);
        let p = p.halt();
        // The guest writes into block 1 and into the hole of block 4.
        f.write_all_at(&[9; 10], BLOCK + 3).unwrap();
        f.write_all_at(&[8; 10], 4 * BLOCK + 3).unwrap();
        let (hashes, reread) = finish(p, &f, size);
        let want = kimberley_formats::vmdir::dir::block_hashes_file(&f, size).unwrap();
        assert_eq!(hashes, want);
        assert_eq!(reread, 2);
    }

    #[test]
    fn without_a_pass_every_block_with_data_is_read() {
        let f = tempfile::tempfile().unwrap();
        let size = 3 * BLOCK;
        f.set_len(size).unwrap();
        f.write_all_at(&[5; 100], 2 * BLOCK).unwrap();
        let p = Prehash::start(vec![(f.try_clone().unwrap(), size, true)]).halt();
        // Whatever the thread managed before it stopped is forgotten.
        lock(&p.seen)[0].fill(None);
        let (hashes, reread) = finish(p, &f, size);
        assert_eq!(
            hashes,
            kimberley_formats::vmdir::dir::block_hashes_file(&f, size).unwrap()
        );
        assert_eq!(reread, 1);
    }

    #[test]
    fn a_block_written_back_to_what_a_pass_saw_keeps_its_hash() {
        let f = tempfile::tempfile().unwrap();
        let size = 2 * BLOCK;
        f.write_all_at(&vec![7; size as usize], 0).unwrap();
        let p = Prehash::start(vec![(f.try_clone().unwrap(), size, true)]);
        wait_for(&p, 2);
        let p = p.halt();
        // Block 0 changes and changes back; block 1 is zeroed.
        f.write_all_at(&[1; 64], 10).unwrap();
        f.write_all_at(&[7; 64], 10).unwrap();
        f.write_all_at(&vec![0; BLOCK as usize], BLOCK).unwrap();
        let (hashes, reread) = finish(p, &f, size);
        assert_eq!(
            hashes,
            kimberley_formats::vmdir::dir::block_hashes_file(&f, size).unwrap()
        );
        assert_eq!(reread, 0);
    }
}
