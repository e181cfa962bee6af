//! Pages of QEMU's stream sent as references to blocks of the shared disks
//! (docs/MIGRATION.md, "Shared-disk references"): the sender's index of
//! the disks' blocks by content; the receiver's rebuilding of the stream
//! from its own view of the disks.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::RwLock;

use anyhow::{bail, Context, Result};

use crate::protocol::{DiskRef, MAX_DISKS, REF_PAGE};

/// Most disk blocks the sender indexes (8 GiB of data, about 40 MiB of
/// index); blocks past it are not referred to.
pub const MAX_INDEXED: usize = 1 << 21;

/// The hash a reference carries: XXH3-64 of the page. It tells the
/// receiver that a block changed since the sender read it (counted), not
/// an adversary: the bytes come from the guest's own disk, and the memory
/// check decides what the received memory holds.
pub fn page_hash(page: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(page)
}

/// The sender's index of the shared disks' non-zero blocks by content,
/// usable while it is built (a block not indexed yet is not referred to).
pub struct DiskIndex {
    /// XXH3-64 of a block → disk << 32 | block number.
    map: RwLock<HashMap<u64, u64>>,
    disks: Vec<File>,
    /// Set when the stream no longer needs more of it.
    stopped: AtomicBool,
}

impl DiskIndex {
    /// An empty index of `disks`; [`DiskIndex::build`] fills it.
    pub fn new(disks: Vec<File>) -> DiskIndex {
        assert!(disks.len() <= MAX_DISKS);
        DiskIndex {
            map: RwLock::new(HashMap::new()),
            disks,
            stopped: AtomicBool::new(false),
        }
    }

    /// Ends [`DiskIndex::build`] at its next 1 MiB (the migration ended or
    /// failed: reading on would only load the disks).
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
    }

    /// Reads and hashes every block of the disks that holds data (at most
    /// [`MAX_INDEXED`] of them), adding them 1 MiB at a time.
    pub fn build(&self) -> std::io::Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        let zero = page_hash(&[0u8; REF_PAGE]);
        let mut batch = Vec::with_capacity(buf.len() / REF_PAGE);
        for (d, f) in self.disks.iter().enumerate() {
            let size = f.metadata()?.len();
            for (start, end) in kimberley_formats::sparse::data_extents(f, size)? {
                let mut off = start - start % REF_PAGE as u64;
                while off < end {
                    if self.stopped.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    let n = (buf.len() as u64).min(end - off) as usize;
                    let n = n - n % REF_PAGE;
                    if n == 0 {
                        break;
                    }
                    f.read_exact_at(&mut buf[..n], off)?;
                    batch.clear();
                    for (i, b) in buf[..n].chunks_exact(REF_PAGE).enumerate() {
                        let h = page_hash(b);
                        if h == zero && b.iter().all(|&x| x == 0) {
                            continue;
                        }
                        if let Ok(block) = u32::try_from(off / REF_PAGE as u64 + i as u64) {
                            batch.push((h, ((d as u64) << 32) | u64::from(block)));
                        }
                    }
                    let mut map = self.map.write().unwrap_or_else(|p| p.into_inner());
                    for &(h, v) in &batch {
                        if map.len() >= MAX_INDEXED {
                            return Ok(());
                        }
                        map.entry(h).or_insert(v);
                    }
                    drop(map);
                    off += n as u64;
                }
            }
        }
        Ok(())
    }

    /// Blocks indexed so far.
    pub fn len(&self) -> usize {
        self.map.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// A reference to the disk block whose bytes are `page`'s now (read
    /// again and compared byte for byte), if the index knows one.
    pub fn find(&self, page: &[u8], pos: u32, scratch: &mut [u8; REF_PAGE]) -> Option<DiskRef> {
        let hash = page_hash(page);
        let v = *self
            .map
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&hash)?;
        let (disk, block) = ((v >> 32) as usize, v as u32);
        self.disks[disk]
            .read_exact_at(scratch, u64::from(block) * REF_PAGE as u64)
            .ok()?;
        (scratch[..] == *page).then_some(DiskRef {
            pos,
            disk: disk as u8,
            block,
            hash,
        })
    }
}

/// Rebuilds the `len` bytes of stream of a STREAM_REFS from its opened
/// references and literals, reading each reference's block from `disks`
/// (START's order; `None` for a disk that is not shared). A block whose
/// bytes no longer hash as the sender's page did (the guest rewrote it
/// since the sender read it) is used as it is and counted in `missed`:
/// the page is guest memory, which the memory check at the end of the
/// stream compares with the source's and repairs.
pub fn rebuild(
    len: usize,
    refs: &[DiskRef],
    literals: &[u8],
    disks: &[Option<File>],
    missed: &mut u64,
) -> Result<Vec<u8>> {
    let mut bytes = Vec::with_capacity(len);
    let mut from = 0usize;
    for r in refs {
        let gap = r.pos as usize - bytes.len();
        let Some(lit) = literals.get(from..from + gap) else {
            bail!("protocol error: STREAM_REFS literals too short");
        };
        bytes.extend_from_slice(lit);
        from += gap;
        let at = bytes.len();
        bytes.resize(at + REF_PAGE, 0);
        let Some(Some(f)) = disks.get(usize::from(r.disk)) else {
            bail!(
                "protocol error: a reference to disk {}, which is not shared",
                r.disk
            );
        };
        let page = &mut bytes[at..];
        match f.read_exact_at(page, u64::from(r.block) * REF_PAGE as u64) {
            Ok(()) => {}
            // Past the end: zeros, and a miss.
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => page.fill(0),
            Err(e) => return Err(e).context("reading a shared disk"),
        }
        if page_hash(page) != r.hash {
            *missed += 1;
        }
    }
    bytes.extend_from_slice(&literals[from..]);
    if bytes.len() != len {
        bail!("protocol error: STREAM_REFS of the wrong length");
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(b: u8) -> Vec<u8> {
        (0..REF_PAGE).map(|i| b ^ (i as u8)).collect()
    }

    fn disk(blocks: &[u8]) -> (tempfile::TempDir, File) {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("disk");
        let mut v = Vec::new();
        for &b in blocks {
            if b == 0 {
                v.extend(vec![0u8; REF_PAGE]);
            } else {
                v.extend(page(b));
            }
        }
        std::fs::write(&p, v).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&p)
            .unwrap();
        (d, f)
    }

    #[test]
    fn a_stopped_index_reads_no_further() {
        let (_d, f) = disk(&[1, 2, 3]);
        let ix = DiskIndex::new(vec![f]);
        ix.stop();
        ix.build().unwrap();
        assert_eq!(ix.len(), 0);
    }

    #[test]
    fn the_index_finds_blocks_by_content_and_checks_the_bytes() {
        let (_d, f) = disk(&[1, 0, 2, 3]);
        let w = f.try_clone().unwrap();
        let ix = DiskIndex::new(vec![f]);
        let mut s = [0u8; REF_PAGE];
        assert!(ix.find(&page(2), 7, &mut s).is_none(), "not indexed yet");
        ix.build().unwrap();
        assert_eq!(ix.len(), 3, "the zero block is not indexed");
        let r = ix.find(&page(2), 7, &mut s).unwrap();
        assert_eq!(
            (r.pos, r.disk, r.block, r.hash),
            (7, 0, 2, page_hash(&page(2)))
        );
        assert_eq!(ix.find(&page(3), 0, &mut s).unwrap().block, 3);
        assert!(ix.find(&page(4), 0, &mut s).is_none());
        // A block rewritten since it was indexed is not referred to.
        w.write_all_at(&page(9), 2 * REF_PAGE as u64).unwrap();
        assert!(ix.find(&page(2), 0, &mut s).is_none());
    }

    #[test]
    fn rebuild_reads_the_blocks_and_counts_those_that_changed() {
        // Block 1 holds page(1); block 2 was rewritten (page(7)) after the
        // sender referred to its page(2).
        let (_d, f) = disk(&[0, 1, 7]);
        let disks = [Some(f)];
        let r = |pos: u32, block: u32, content: &[u8]| DiskRef {
            pos,
            disk: 0,
            block,
            hash: page_hash(content),
        };
        let refs = [r(2, 1, &page(1)), r(3 + REF_PAGE as u32, 2, &page(2))];
        let len = 5 + 2 * REF_PAGE;
        let mut missed = 0;
        let got = rebuild(len, &refs, b"abXcd", &disks, &mut missed).unwrap();
        let mut want = b"ab".to_vec();
        want.extend(page(1));
        want.push(b'X');
        want.extend(page(7));
        want.extend(b"cd");
        assert_eq!(got, want);
        assert_eq!(missed, 1);
        // A block past the disk's end reads as zeros, and is a miss.
        let past = [r(0, 9, &page(1))];
        let got = rebuild(REF_PAGE, &past, b"", &disks, &mut missed).unwrap();
        assert_eq!(got, vec![0; REF_PAGE]);
        assert_eq!(missed, 2);
        // Refused: a disk that is not shared or not there, literals of
        // another length.
        assert!(rebuild(len, &refs, b"abXcd", &[None], &mut missed).is_err());
        assert!(rebuild(len, &refs, b"abXcd", &[], &mut missed).is_err());
        assert!(rebuild(len, &refs, b"abXc", &disks, &mut missed).is_err());
        assert!(rebuild(len, &refs, b"abXcde", &disks, &mut missed).is_err());
        assert!(rebuild(len, &refs, b"a", &disks, &mut missed).is_err());
    }
}
