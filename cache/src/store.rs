//! Content-addressed stores (desync-style): [`Store`] reads complete,
//! verified blobs; [`WriteStore`] adds them through an [`Ingest`] that
//! writes beside them (`HEX.partial`, resumable), checks size and sha256,
//! and only then renames the blob into place.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;

use kimberley_formats::fsutil::{sync_dir, PRIVATE_FILE_MODE};
use kimberley_formats::sys::file::start_writeback_range;
use kimberley_formats::sys::lock::{flock, Mode};
use kimberley_registry::{Digest, Sha256Writer};

use crate::error::{Ctx, Error, Result};

/// Reads complete blobs by digest.
pub trait Store {
    /// The complete, verified blob `d`, if present.
    fn open(&self, d: &Digest) -> Result<Option<File>>;
    /// True if the complete blob `d` is present.
    fn contains(&self, d: &Digest) -> bool;
}

/// Adds and removes blobs.
pub trait WriteStore: Store {
    /// Starts (or resumes) adding blob `d` of `size` bytes: waits for
    /// anyone else adding it, then says it is present, or gives the
    /// [`Ingest`] to write it through.
    fn begin(&self, d: &Digest, size: u64) -> Result<Begin>;
    /// Removes blob `d` (complete or partial), if there.
    fn remove(&self, d: &Digest) -> Result<()>;
}

/// What [`WriteStore::begin`] found.
pub enum Begin {
    /// The blob is complete (maybe added while this process waited).
    Present(File),
    /// The blob is to be written; the ingest holds its lock.
    Write(Ingest),
}

/// A directory of blobs named by their hex digest: `HEX` (complete),
/// `HEX.partial` (a download so far: resuming needs its digest, the name,
/// and its length, the offset), `HEX.lock` (held while one is added).
#[derive(Debug, Clone)]
pub struct BlobDir {
    pub dir: PathBuf,
}

impl BlobDir {
    /// The path of complete blob `d`.
    pub fn path(&self, d: &Digest) -> PathBuf {
        self.dir.join(d.hex())
    }
    /// The path of its partial download.
    pub fn partial(&self, d: &Digest) -> PathBuf {
        self.dir.join(format!("{}.partial", d.hex()))
    }
    fn lock_path(&self, d: &Digest) -> PathBuf {
        self.dir.join(format!("{}.lock", d.hex()))
    }
}

fn open_private(path: &Path, append: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .append(append)
        .mode(PRIVATE_FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn open_blob(path: &Path) -> io::Result<Option<File>> {
    match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
    {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

impl Store for BlobDir {
    fn open(&self, d: &Digest) -> Result<Option<File>> {
        let p = self.path(d);
        open_blob(&p).ctx(|| format!("opening {}", p.display()))
    }
    fn contains(&self, d: &Digest) -> bool {
        fs::symlink_metadata(self.path(d)).is_ok_and(|m| m.is_file())
    }
}

impl WriteStore for BlobDir {
    fn begin(&self, d: &Digest, size: u64) -> Result<Begin> {
        let lp = self.lock_path(d);
        let lock = open_private(&lp, false).ctx(|| format!("opening {}", lp.display()))?;
        flock(&lock, Mode::Exclusive, true).ctx(|| format!("locking {}", lp.display()))?;
        if let Some(f) = self.open(d)? {
            return Ok(Begin::Present(f));
        }
        let pp = self.partial(d);
        let mut file = open_private(&pp, true).ctx(|| format!("opening {}", pp.display()))?;
        let mut hash = Sha256Writer::new(io::sink());
        // Resuming: the bytes so far count towards the digest. More than
        // the blob's size can never verify: start again.
        let have = file
            .metadata()
            .ctx(|| format!("checking {}", pp.display()))?
            .len();
        if have > size {
            file.set_len(0)
                .ctx(|| format!("truncating {}", pp.display()))?;
        } else if have > 0 {
            let mut r = File::open(&pp).ctx(|| format!("opening {}", pp.display()))?;
            let mut buf = vec![0u8; 1 << 20];
            loop {
                let n = r
                    .read(&mut buf)
                    .ctx(|| format!("reading {}", pp.display()))?;
                if n == 0 {
                    break;
                }
                hash.absorb(&buf[..n]);
            }
        }
        // The write position is the end (append mode).
        let _ = file.flush();
        Ok(Begin::Write(Ingest {
            store: self.clone(),
            digest: *d,
            size,
            file,
            hash,
            _lock: lock,
        }))
    }

    fn remove(&self, d: &Digest) -> Result<()> {
        for p in [self.path(d), self.partial(d)] {
            match fs::remove_file(&p) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(Error::io(format!("removing {}", p.display()), e)),
            }
        }
        Ok(())
    }
}

/// Bytes between two starts of writeback of a blob being added.
const WRITEBACK_EVERY: u64 = 8 << 20;
/// Buffers in flight in [`Ingest::append_from`] (its memory: this many
/// times [`PIPE_BUF_LEN`]).
const PIPE_BUFS: usize = 8;
/// The size of one of them: reads fill it, writes of [`WRITE_LEN`] empty it.
const PIPE_BUF_LEN: usize = 1 << 20;
/// The most one write(2) of a download copies into the page cache. Larger
/// writes cost far more kernel time here (a 1 GiB fetch: about 2 s of
/// system time with 1 MiB writes, 0.4 s with 128 KiB ones).
const WRITE_LEN: usize = 128 << 10;

/// Bytes read from a download, shared by its hasher and its writer.
struct Chunk {
    buf: Vec<u8>,
    len: usize,
}

impl Chunk {
    fn bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// Gives a chunk's buffer back to the reader once its last user is done.
fn recycle(c: Arc<Chunk>, pool: &SyncSender<Vec<u8>>) {
    if let Some(c) = Arc::into_inner(c) {
        let _ = pool.try_send(c.buf);
    }
}

/// Fills `buf` from `src` as far as it goes: the bytes read, and the error
/// that stopped it early (if one did).
fn fill(src: &mut dyn Read, buf: &mut [u8]) -> (usize, Option<io::Error>) {
    let mut n = 0;
    while n < buf.len() {
        match src.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return (n, Some(e)),
        }
    }
    (n, None)
}

/// A blob being added: appends to `HEX.partial`, hashing; [`Ingest::commit`]
/// checks size and digest and renames it to `HEX`. The blob's lock is held
/// until it is dropped.
pub struct Ingest {
    store: BlobDir,
    digest: Digest,
    size: u64,
    file: File,
    hash: Sha256Writer<io::Sink>,
    _lock: File,
}

impl Ingest {
    /// Bytes held so far (where a download resumes).
    pub fn offset(&self) -> u64 {
        self.hash.len()
    }

    /// The blob's digest.
    pub fn digest(&self) -> Digest {
        self.digest
    }

    /// The blob's expected size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Drops what was written so far (a registry that ignored `Range`
    /// sends the blob from its start).
    pub fn restart(&mut self) -> Result<()> {
        let pp = self.store.partial(&self.digest);
        self.file
            .set_len(0)
            .ctx(|| format!("truncating {}", pp.display()))?;
        self.hash = Sha256Writer::new(io::sink());
        Ok(())
    }

    /// Appends bytes; more than the blob's size is a mismatch (the partial
    /// file is removed).
    pub fn append(&mut self, bytes: &[u8]) -> Result<()> {
        if self.hash.len() + bytes.len() as u64 > self.size {
            let why = format!("more than its {} bytes", self.size);
            return Err(self.reject(why));
        }
        let pp = self.store.partial(&self.digest);
        self.file
            .write_all(bytes)
            .ctx(|| format!("writing {}", pp.display()))?;
        let before = self.hash.len();
        self.hash.absorb(bytes);
        // Write back as it arrives, so that the fsync at the commit has
        // little left to wait for.
        if before / WRITEBACK_EVERY != self.hash.len() / WRITEBACK_EVERY {
            kimberley_formats::sys::file::start_writeback(std::os::fd::AsRawFd::as_raw_fd(
                &self.file,
            ));
        }
        Ok(())
    }

    /// Appends everything `src` yields, like [`Ingest::append`] but with
    /// reading, hashing and writing on three threads (the caller's reads,
    /// two workers hash and write), through a bounded queue of buffers so
    /// that memory stays flat; writeback starts window by window as the
    /// writes go, so the final fsync has little left. `got` is told the bytes received so far in this call. What
    /// arrived before a failing read is kept (a later run resumes after
    /// it); after any error the ingest is to be dropped (a new
    /// [`WriteStore::begin`] rereads the partial file).
    pub fn append_from(&mut self, src: &mut dyn Read, got: &mut dyn FnMut(u64)) -> Result<()> {
        let (pool_tx, pool_rx) = mpsc::sync_channel::<Vec<u8>>(PIPE_BUFS);
        for _ in 0..PIPE_BUFS {
            let _ = pool_tx.try_send(vec![0u8; PIPE_BUF_LEN]);
        }
        let (hash_tx, hash_rx) = mpsc::sync_channel::<Arc<Chunk>>(PIPE_BUFS);
        let (write_tx, write_rx) = mpsc::sync_channel::<Arc<Chunk>>(PIPE_BUFS);
        let write_failed = AtomicBool::new(false);
        let mut hash = std::mem::replace(&mut self.hash, Sha256Writer::new(io::sink()));
        let start = hash.len();
        let size = self.size;
        let file = &self.file;
        let pp = self.store.partial(&self.digest);
        let d = self.digest;
        let (read, wrote, hashed) = std::thread::scope(|s| {
            let hasher = s.spawn({
                let pool = pool_tx.clone();
                move || {
                    for c in hash_rx {
                        hash.absorb(c.bytes());
                        recycle(c, &pool);
                    }
                    hash
                }
            });
            let writer = s.spawn({
                let pool = pool_tx.clone();
                let failed = &write_failed;
                move || write_chunks(file, start, write_rx, &pool, failed)
            });
            drop(pool_tx);
            let read = read_chunks(
                src,
                ReadPipe {
                    pool: pool_rx,
                    hash: hash_tx,
                    write: write_tx,
                    write_failed: &write_failed,
                },
                size - start.min(size),
                got,
            );
            (read, writer.join(), hasher.join())
        });
        let stopped = || io::Error::other("a download thread stopped");
        self.hash =
            hashed.map_err(|_| Error::io(format!("hashing {}", pp.display()), stopped()))?;
        wrote
            .map_err(|_| stopped())
            .and_then(|r| r)
            .ctx(|| format!("writing {}", pp.display()))?;
        match read {
            Ok(()) => Ok(()),
            Err(ReadFail::TooLong) => {
                let why = format!("more than its {} bytes", self.size);
                Err(self.reject(why))
            }
            Err(ReadFail::Io(e)) => Err(Error::io(format!("downloading blob {d}"), e)),
        }
    }

    fn reject(&mut self, why: String) -> Error {
        let _ = fs::remove_file(self.store.partial(&self.digest));
        Error::Tampered {
            what: format!("blob {}", self.digest),
            digest: self.digest.to_string(),
            why,
        }
    }

    /// Checks size and digest; on success syncs and renames the blob into
    /// place and returns it open; on mismatch removes the partial file.
    pub fn commit(mut self) -> Result<File> {
        if self.hash.len() != self.size {
            let why = format!("{} bytes, not {}", self.hash.len(), self.size);
            return Err(self.reject(why));
        }
        let hash = std::mem::replace(&mut self.hash, Sha256Writer::new(io::sink()));
        let (got, _) = hash.finish();
        if got != self.digest {
            let why = format!("its bytes hash to {got}");
            return Err(self.reject(why));
        }
        let pp = self.store.partial(&self.digest);
        let dest = self.store.path(&self.digest);
        self.file
            .sync_all()
            .ctx(|| format!("syncing {}", pp.display()))?;
        fs::rename(&pp, &dest)
            .ctx(|| format!("renaming {} to {}", pp.display(), dest.display()))?;
        sync_dir(&self.store.dir)
            .map_err(|e| Error::io("syncing the cache", io::Error::other(e)))?;
        open_blob(&dest)
            .ctx(|| format!("opening {}", dest.display()))?
            .ok_or_else(|| {
                Error::io(
                    format!("opening {}", dest.display()),
                    io::ErrorKind::NotFound.into(),
                )
            })
    }
}

/// The reader's ends of [`Ingest::append_from`]'s pipe.
struct ReadPipe<'a> {
    pool: Receiver<Vec<u8>>,
    hash: SyncSender<Arc<Chunk>>,
    write: SyncSender<Arc<Chunk>>,
    write_failed: &'a AtomicBool,
}

/// Why the reader stopped early.
enum ReadFail {
    /// The source yielded more than the blob's size.
    TooLong,
    /// Reading failed (the bytes before it were passed on).
    Io(io::Error),
}

/// Reads `src` into the pool's buffers and hands each to the hasher and
/// the writer, until `src` ends, yields more than `room` bytes, fails, or
/// the writer failed. Returning drops the senders: the workers finish.
fn read_chunks(
    src: &mut dyn Read,
    pipe: ReadPipe<'_>,
    room: u64,
    got: &mut dyn FnMut(u64),
) -> std::result::Result<(), ReadFail> {
    let mut total = 0u64;
    loop {
        if pipe.write_failed.load(Ordering::Relaxed) {
            return Ok(()); // the writer's error is the one reported
        }
        let Ok(mut buf) = pipe.pool.recv() else {
            return Ok(()); // both workers are gone (they report why)
        };
        let (n, err) = fill(src, &mut buf);
        if total + n as u64 > room {
            return Err(ReadFail::TooLong);
        }
        if n > 0 {
            total += n as u64;
            let c = Arc::new(Chunk { buf, len: n });
            if pipe.hash.send(c.clone()).is_err() || pipe.write.send(c).is_err() {
                return Ok(());
            }
            got(total);
        }
        match err {
            Some(e) => return Err(ReadFail::Io(e)),
            None if n == 0 => return Ok(()),
            None => {}
        }
    }
}

/// Writes the chunks in order to `file` (from offset `start`), starting
/// the writeback of each [`WRITEBACK_EVERY`] window as soon as it is
/// written, without waiting for it (waiting stalled the pipeline on a
/// busy disk, which is kept busy either way). After a failure it only
/// recycles what still comes (so the reader never waits for a buffer that
/// will not return) and reports the failure at the end.
fn write_chunks(
    mut file: &File,
    start: u64,
    chunks: Receiver<Arc<Chunk>>,
    pool: &SyncSender<Vec<u8>>,
    failed: &AtomicBool,
) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut res = Ok(());
    let mut off = start;
    for c in chunks {
        if res.is_ok() {
            res = c
                .bytes()
                .chunks(WRITE_LEN)
                .try_for_each(|b| file.write_all(b));
            if res.is_err() {
                failed.store(true, Ordering::Relaxed);
            } else {
                let before = off / WRITEBACK_EVERY;
                off += c.len as u64;
                for w in before..off / WRITEBACK_EVERY {
                    start_writeback_range(fd, w * WRITEBACK_EVERY, WRITEBACK_EVERY);
                }
            }
        }
        recycle(c, pool);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn store() -> (tempfile::TempDir, BlobDir) {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("blobs");
        fs::create_dir(&dir).unwrap();
        (t, BlobDir { dir })
    }

    fn ingest(s: &BlobDir, d: &Digest, size: u64) -> Ingest {
        match s.begin(d, size).unwrap() {
            Begin::Write(i) => i,
            Begin::Present(_) => panic!("present"),
        }
    }

    #[test]
    fn a_blob_appears_only_verified() {
        let (_t, s) = store();
        let data = b"overlay bytes".to_vec();
        let d = Digest::of(&data);
        let mut i = ingest(&s, &d, data.len() as u64);
        i.append(&data[..5]).unwrap();
        assert!(!s.contains(&d));
        i.append(&data[5..]).unwrap();
        let mut f = i.commit().unwrap();
        let mut back = Vec::new();
        f.read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
        assert!(s.contains(&d) && !s.partial(&d).exists());
        let mode = fs::metadata(s.path(&d)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert!(matches!(
            s.begin(&d, data.len() as u64).unwrap(),
            Begin::Present(_)
        ));
    }

    #[test]
    fn mismatches_are_removed() {
        let (_t, s) = store();
        let d = Digest::of(b"the real bytes");
        // Same size, other bytes.
        let mut i = ingest(&s, &d, 14);
        i.append(b"the fake bytes").unwrap();
        let e = i.commit().err().unwrap();
        assert!(e.is_tampered(), "{e}");
        assert!(!s.contains(&d) && !s.partial(&d).exists());
        // Too long: refused as it arrives.
        let mut i = ingest(&s, &d, 14);
        let e = i.append(b"the real bytes!").unwrap_err();
        assert!(e.is_tampered(), "{e}");
        assert!(!s.partial(&d).exists());
        drop(i); // releases the blob's lock
                 // Too short.
        let mut i = ingest(&s, &d, 14);
        i.append(b"the real").unwrap();
        assert!(i.commit().err().unwrap().is_tampered());
    }

    #[test]
    fn partial_downloads_resume() {
        let (_t, s) = store();
        let data: Vec<u8> = (0..10_000u32).map(|x| x as u8).collect();
        let d = Digest::of(&data);
        let mut i = ingest(&s, &d, data.len() as u64);
        i.append(&data[..6000]).unwrap();
        drop(i);
        let mut i = ingest(&s, &d, data.len() as u64);
        assert_eq!(i.offset(), 6000);
        i.append(&data[6000..]).unwrap();
        i.commit().unwrap();
        assert_eq!(fs::read(s.path(&d)).unwrap(), data);
    }

    /// A reader that yields `data` in pieces of odd sizes, then fails (if
    /// `fail`) instead of ending.
    struct Pieces {
        data: Vec<u8>,
        at: usize,
        fail: bool,
    }

    impl Read for Pieces {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at == self.data.len() {
                return if self.fail {
                    Err(io::Error::new(io::ErrorKind::ConnectionReset, "cut"))
                } else {
                    Ok(0)
                };
            }
            let n = buf.len().min(77_777).min(self.data.len() - self.at);
            buf[..n].copy_from_slice(&self.data[self.at..self.at + n]);
            self.at += n;
            Ok(n)
        }
    }

    fn pieces(data: &[u8], fail: bool) -> Pieces {
        Pieces {
            data: data.to_vec(),
            at: 0,
            fail,
        }
    }

    /// The pipelined download: several buffers' worth in odd pieces
    /// verifies; a cut keeps every byte that arrived (the next run resumes
    /// after them); more than the size is refused and removed.
    #[test]
    fn pipelined_appends_resume_and_refuse() {
        let (_t, s) = store();
        let data: Vec<u8> = (0..(PIPE_BUFS * PIPE_BUF_LEN * 2 + 12_345))
            .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[3])
            .collect();
        let d = Digest::of(&data);
        let size = data.len() as u64;
        let cut = data.len() / 3 + 5;
        let mut i = ingest(&s, &d, size);
        let mut seen = 0;
        let e = i
            .append_from(&mut pieces(&data[..cut], true), &mut |n| seen = n)
            .unwrap_err();
        assert!(e.to_string().contains("cut"), "{e}");
        assert_eq!(seen, cut as u64);
        drop(i);
        assert_eq!(fs::read(s.partial(&d)).unwrap(), &data[..cut]);
        let mut i = ingest(&s, &d, size);
        assert_eq!(i.offset(), cut as u64);
        i.append_from(&mut pieces(&data[cut..], false), &mut |_| {})
            .unwrap();
        assert_eq!(i.offset(), size);
        i.commit().unwrap();
        assert_eq!(fs::read(s.path(&d)).unwrap(), data);

        // One byte too many: refused, nothing kept.
        let small = &data[..3 * PIPE_BUF_LEN];
        let d2 = Digest::of(&small[1..]);
        let mut i = ingest(&s, &d2, small.len() as u64 - 1);
        let e = i
            .append_from(&mut pieces(small, false), &mut |_| {})
            .unwrap_err();
        assert!(e.is_tampered(), "{e}");
        drop(i);
        assert!(!s.partial(&d2).exists() && !s.contains(&d2));
        // Other bytes of the right size: refused at the commit.
        let mut i = ingest(&s, &d2, small.len() as u64 - 1);
        i.append_from(&mut pieces(&small[..small.len() - 1], false), &mut |_| {})
            .unwrap();
        assert!(i.commit().err().unwrap().is_tampered());
        assert!(!s.partial(&d2).exists() && !s.contains(&d2));
    }

    /// Attack: links planted in the cache are not followed: a blob name
    /// that is a link is not read as the blob, and a partial download that
    /// is a link does not write through it.
    #[test]
    fn planted_links_are_not_followed() {
        let (t, s) = store();
        let victim = t.path().join("victim");
        fs::write(&victim, b"precious").unwrap();
        let d = Digest::of(b"precious");
        std::os::unix::fs::symlink(&victim, s.path(&d)).unwrap();
        assert!(s.open(&d).is_err());
        assert!(!s.contains(&d));
        let d2 = Digest::of(b"new blob");
        std::os::unix::fs::symlink(&victim, s.partial(&d2)).unwrap();
        assert!(s.begin(&d2, 8).is_err());
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
    }
}
