//! The receiving side of a hypervisor stream (QEMU): the machine
//! description checked, the boot files received as round 0, a QEMU
//! started on the new VM directory's files and fed the stream, and at
//! COMMIT the directory committed (device state, digests) before the
//! guest runs from it.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kimberley_formats::digest::BlockDigests;
use kimberley_formats::sys::openat;
use kimberley_formats::vmdir::{file_name, Kind, VmDir, VmDirWriter};
use kimberley_machine::Machine;
use kimberley_qemu::backend::IncomingFiles;
use kimberley_qemu::{QemuBackend, QemuMachine};

use crate::channel::{Rx, Tx};
use crate::chunks::CHUNK;
use crate::dest::{
    apply, discard, hand_over, next, open_shared, send_error, shared_disks, Listener, Options,
    Phase, Received, SenderAborted, Target,
};
use crate::disk_refs;
use crate::prehash::Prehash;
use crate::protocol::{
    DiskRef, Message, RoundAck, Running, Start, MAX_STREAM_CHUNK, MAX_SUMS, REF_LEN, SESSION_ID_LEN,
};

/// How long QEMU may take to finish loading the stream after COMMIT.
const LOAD_WAIT: Duration = Duration::from_secs(60);
/// A QEMU that takes no stream bytes for this long is given up on.
const FEED_LIMIT: Duration = Duration::from_secs(60);
/// What failed when QEMU does not take the stream.
const FEED_FAILED: &str = "feeding the stream to QEMU (it refused the stream or stopped)";

/// Most bytes of stream queued for QEMU (a reference counts as its
/// [`REF_LEN`] bytes).
const FEED_QUEUE: usize = 64 << 20;

/// A piece of stream on its way to QEMU.
enum Piece {
    /// Its bytes.
    Plain(Vec<u8>),
    /// A STREAM_REFS, opened.
    Refs {
        len: usize,
        refs: Vec<DiskRef>,
        literals: Vec<u8>,
    },
}

impl Piece {
    fn held(&self) -> usize {
        match self {
            Piece::Plain(b) => b.len(),
            Piece::Refs { refs, literals, .. } => literals.len() + refs.len() * REF_LEN,
        }
    }
}

/// What the feeding counted of references.
#[derive(Debug, Default, Clone, Copy)]
struct RefCounts {
    pages: u64,
    missed: u64,
}

/// Writes the stream to QEMU on a thread of its own, reading the pages of
/// references from the shared disks as it goes, so that reading the
/// channel does not wait for QEMU to load what came before (at most
/// [`FEED_QUEUE`] bytes ahead): a run of references, cheap on the wire, is
/// much stream for QEMU to load, and the link carries what follows it
/// meanwhile.
struct Feeder {
    tx: Option<std::sync::mpsc::Sender<Piece>>,
    /// Bytes queued, and its change.
    queued: std::sync::Arc<(std::sync::Mutex<usize>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<Result<RefCounts>>>,
}

impl Feeder {
    fn start(mut sock: UnixStream, disks: Vec<Option<std::fs::File>>) -> Feeder {
        let (tx, rx) = std::sync::mpsc::channel::<Piece>();
        let queued =
            std::sync::Arc::new((std::sync::Mutex::new(0usize), std::sync::Condvar::new()));
        let q = queued.clone();
        let thread = std::thread::spawn(move || {
            let mut counts = RefCounts::default();
            let r = (|| {
                for p in rx {
                    let held = p.held();
                    let bytes = match p {
                        Piece::Plain(b) => b,
                        Piece::Refs {
                            len,
                            refs,
                            literals,
                        } => {
                            counts.pages += refs.len() as u64;
                            disk_refs::rebuild(len, &refs, &literals, &disks, &mut counts.missed)?
                        }
                    };
                    sock.write_all(&bytes).context(FEED_FAILED)?;
                    let mut n = q.0.lock().unwrap_or_else(|p| p.into_inner());
                    *n -= held;
                    q.1.notify_all();
                }
                Ok(counts)
            })();
            // Wakes a sender waiting for room after a failure.
            *q.0.lock().unwrap_or_else(|p| p.into_inner()) = 0;
            q.1.notify_all();
            r
        });
        Feeder {
            tx: Some(tx),
            queued,
            thread: Some(thread),
        }
    }

    /// Queues the next piece (waits while the queue is full).
    fn send(&mut self, p: Piece) -> Result<()> {
        let held = p.held();
        {
            let (m, c) = &*self.queued;
            let mut n = m.lock().unwrap_or_else(|p| p.into_inner());
            while *n > 0 && *n + held > FEED_QUEUE {
                n = c.wait(n).unwrap_or_else(|p| p.into_inner());
            }
            *n += held;
        }
        let sent = self.tx.as_ref().map(|tx| tx.send(p).is_ok());
        if sent != Some(true) {
            self.finish()?;
            bail!("{FEED_FAILED}");
        }
        Ok(())
    }

    /// Closes the stream once QEMU has taken everything queued.
    fn finish(&mut self) -> Result<RefCounts> {
        drop(self.tx.take());
        match self.thread.take().map(|t| t.join()) {
            None => Ok(RefCounts::default()),
            Some(Ok(r)) => r,
            Some(Err(_)) => bail!("the thread feeding QEMU panicked"),
        }
    }
}

/// Most bytes of messages read ahead while QEMU starts.
const READ_AHEAD: usize = 64 << 20;

/// Reads messages until `done` (or [`READ_AHEAD`] bytes of them).
fn read_ahead(rx: &mut Rx, done: &AtomicBool, stop: &AtomicBool) -> Result<Vec<Message>> {
    use std::os::unix::io::AsRawFd;
    use std::sync::atomic::Ordering;
    let mut read = Vec::new();
    let mut bytes = 0usize;
    while !done.load(Ordering::SeqCst) && !stop.load(Ordering::SeqCst) && bytes < READ_AHEAD {
        if kimberley_formats::sys::poll::readable_one(
            rx.stream().as_raw_fd(),
            Some(Duration::from_millis(5)),
        )? {
            let m = rx.recv()?;
            bytes += match &m {
                Message::Stream(b) => b.len(),
                Message::StreamRefs(r) => r.frame.len(),
                _ => 64,
            };
            let last = m.ty().is_last();
            read.push(m);
            if last {
                break;
            }
        }
    }
    Ok(read)
}

/// The target a CHUNKS body names.
fn chunks_target(body: &[u8]) -> Result<u32> {
    Ok(crate::chunks::decode(body)
        .context("protocol error")?
        .target)
}

/// Digests of components (kind, index) computed from their final contents.
type Known = Vec<(Kind, usize, [u8; 32])>;

/// A thread digesting received files: their digests, and how many digest
/// blocks it read in the pause.
type Ahead = std::thread::JoinHandle<Result<(Known, u64)>>;

/// The component target `j` is, of `targets` with `nd` disks (the
/// sender's numbering: memory, disks, kernel, initrd).
fn target_kind(j: usize, nd: usize) -> (Kind, usize) {
    match j {
        0 => (Kind::Memory, 0),
        j if j <= nd => (Kind::Disk, j - 1),
        j if j == nd + 1 => (Kind::Kernel, 0),
        _ => (Kind::Initrd, 0),
    }
}

/// Digests, on a thread, the targets `which` (indices into `targets`, of
/// which `nd` are disks) once they are final, so that COMMIT finds them
/// done: the boot files at the end of round 0 (the memory and the disks go
/// through [`finish_ahead`]).
fn digest_ahead(targets: &[Target], nd: usize, which: std::ops::Range<usize>) -> Result<Ahead> {
    let mut files = Vec::new();
    for j in which.filter(|&j| j < targets.len()) {
        let (kind, i) = target_kind(j, nd);
        files.push((kind, i, clone(&targets[j], "a received file")?));
    }
    Ok(std::thread::spawn(move || {
        use rayon::prelude::*;
        let known = files
            .into_par_iter()
            .map(|(kind, i, f)| {
                let size = f.metadata().context("stat of a received file")?.len();
                let d = kimberley_formats::vmdir::dir::digest_file(&f, size)
                    .with_context(|| format!("digesting {}", file_name(kind, i)))?;
                Ok((kind, i, d))
            })
            .collect::<Result<_>>()?;
        Ok((known, 0))
    }))
}

/// Finishes, on a thread, the digests of the memory (whose final SUMS
/// hashes are `memory_sums`) and the disks from what `p` saw in the
/// background: the disks are hashed as the memory was, and only the blocks
/// whose hashes changed are read again (the count it returns). A file
/// whose size changed is digested whole.
fn finish_ahead(
    p: Prehash,
    targets: &[Target],
    nd: usize,
    memory_sums: Vec<[u8; crate::protocol::SUM_LEN]>,
) -> Result<Ahead> {
    let files = (0..=nd)
        .map(|j| clone(&targets[j], "a received file"))
        .collect::<Result<Vec<_>>>()?;
    Ok(std::thread::spawn(move || {
        // The pause has begun: the passes stop taking a core.
        p.stop();
        let sizes: Vec<u64> = (0..=nd).map(|j| p.size(j)).collect();
        let mut now = vec![memory_sums];
        for (j, f) in files.iter().enumerate().skip(1) {
            now.push(crate::sums::file_sums(f, sizes[j]).context("hashing a received disk")?);
        }
        let mut known = Known::new();
        let mut same = Vec::new();
        for (j, f) in files.iter().enumerate() {
            let size = f.metadata().context("stat of a received file")?.len();
            if size == sizes[j] {
                same.push((j, f, &now[j][..]));
            } else {
                let (k, i) = target_kind(j, nd);
                let d = kimberley_formats::vmdir::dir::digest_file(f, size)
                    .with_context(|| format!("digesting {}", file_name(k, i)))?;
                known.push((k, i, d));
            }
        }
        let (hashes, reread) = p.finish(&same).context("digesting the received files")?;
        for ((j, _, _), h) in same.iter().zip(hashes) {
            let (k, i) = target_kind(*j, nd);
            known.push((k, i, kimberley_formats::digest::combine(sizes[*j], &h)));
        }
        Ok((known, reread))
    }))
}

/// Everything received up to COMMIT: QEMU has been fed the whole stream.
pub(crate) struct Prepared {
    w: VmDirWriter,
    known: Known,
    name: String,
    machine: QemuMachine,
    apply_us: u64,
    /// Digest blocks read again in the pause.
    reread: u64,
    rounds: u32,
    bytes: u64,
    refs: RefCounts,
}

fn clone(t: &Target, what: &str) -> Result<std::fs::File> {
    t.file
        .try_clone()
        .with_context(|| format!("duplicating the descriptor of {what}"))
}

pub(crate) fn prepare(
    start: Start,
    rx: &mut Rx,
    tx: &mut Tx,
    opts: &Options,
    stop: &AtomicBool,
    acked: &mut bool,
) -> Result<Prepared> {
    let shared_files = shared_disks(&start, opts)?;
    let m = match next(rx, stop)? {
        Message::Machine(m) => m,
        other => bail!("protocol error: {} instead of MACHINE", other.ty().name()),
    };
    let backend = QemuBackend::default();
    let mut w = VmDirWriter::create(&opts.out)?;
    // Committed without fsync in the pause window; made durable after the
    // hand-over.
    w.set_sync(false);
    let cfg = backend
        .incoming_config(
            &m.spec,
            start.memory_size,
            start.vcpus,
            start.disks.len(),
            m.initrd_size > 0,
            w.path(),
        )
        .map_err(|e| anyhow!("this host cannot run the sender's VM: {e}"))?;
    let name = opts
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    let memory = w.create_file(&file_name(Kind::Memory, 0))?;
    memory
        .set_len(start.memory_size)
        .context("sizing guest memory")?;
    // Targets as the sender numbers them: memory (never sent as chunks),
    // the disks (shared, or new files QEMU's stream fills: never sent as
    // chunks either), the kernel, the initrd.
    let mut targets = vec![Target {
        file: memory,
        chunks: start.memory_size / CHUNK as u64,
        shared: false,
        digests: BlockDigests::zeros(start.memory_size),
    }];
    for (i, f) in shared_files.into_iter().enumerate() {
        let dst = w.path().join(file_name(Kind::Disk, i));
        openat::link_open_file(&f, &dst).with_context(|| {
            format!("linking the shared disk {} into the VM directory (it must be on the output's file system)", start.disks[i].path)
        })?;
        targets.push(Target {
            file: f,
            chunks: 0,
            shared: true,
            digests: BlockDigests::zeros(0),
        });
    }
    if !start.shared_disk {
        for (i, d) in start.disks.iter().enumerate() {
            let f = w.create_file(&file_name(Kind::Disk, i))?;
            f.set_len(d.size).context("sizing a disk")?;
            targets.push(Target {
                file: f,
                chunks: 0,
                shared: false,
                digests: BlockDigests::zeros(0),
            });
        }
    }
    // With shared disks the sender may name the boot files instead of
    // sending them: they are opened and linked as the disks are.
    let mut first = Some(next(rx, stop)?);
    let shared_boot = match &first {
        Some(Message::BootFiles { kernel, initrd }) => {
            let dir = opts
                .shared_disk_dir
                .as_ref()
                .filter(|_| start.shared_disk)
                .ok_or_else(|| {
                    anyhow!("protocol error: BOOT_FILES from a sender without shared disks")
                })?;
            if initrd.is_empty() != (m.initrd_size == 0) {
                bail!("protocol error: BOOT_FILES and MACHINE disagree on the initrd");
            }
            let k = open_shared(dir, kernel, m.kernel_size)?;
            let i = (m.initrd_size > 0)
                .then(|| open_shared(dir, initrd, m.initrd_size))
                .transpose()?;
            first = None;
            Some((k, i))
        }
        _ => None,
    };
    let boot = [(Kind::Kernel, m.kernel_size), (Kind::Initrd, m.initrd_size)];
    let mut shared_boot = shared_boot.map(|(k, i)| [Some(k), i]);
    for (j, (kind, size)) in boot.into_iter().enumerate().filter(|&(_, (_, s))| s > 0) {
        let dst = w.path().join(file_name(kind, 0));
        if let Some(f) = shared_boot.as_mut().and_then(|b| b[j].take()) {
            openat::link_open_file(&f, &dst).with_context(|| {
                format!("linking the shared {} into the VM directory (it must be on the output's file system)", file_name(kind, 0))
            })?;
            targets.push(Target {
                file: f,
                chunks: 0,
                shared: true,
                digests: BlockDigests::zeros(0),
            });
            continue;
        }
        let f = w.create_file(&file_name(kind, 0))?;
        f.set_len(size).context("sizing a boot file")?;
        targets.push(Target {
            file: f,
            chunks: size.div_ceil(CHUNK as u64),
            shared: false,
            digests: BlockDigests::zeros(size),
        });
    }
    let nd = start.disks.len();
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut load_us = 0u64;
    let mut qemu: Option<QemuMachine> = None;
    let mut feed: Option<Feeder> = None;
    // The stream ended and SUMS went out: only repairs of memory (CHUNKS
    // of target 0) and COMMIT may follow.
    let mut summed = false;
    let mut ahead: Vec<Ahead> = Vec::new();
    // The memory and the disks, hashed in the background while QEMU
    // writes them, so that the pause digests only what changed since.
    let mut prehash: Option<Prehash> = None;
    let mut repaired = false;
    let (mut rounds, mut bytes) = (0u32, 0u64);
    let mut refs = RefCounts::default();
    // Messages read while QEMU started.
    let mut early: std::collections::VecDeque<Message> = first.take().into_iter().collect();
    loop {
        let msg = match early.pop_front() {
            Some(m) => m,
            None => next(rx, stop)?,
        };
        match msg {
            Message::Chunks(b) if qemu.is_none() => {
                bytes += b.len() as u64;
                if chunks_target(&b)? == 0 {
                    bail!("protocol error: guest memory before the stream");
                }
                pending.push(b);
                apply(&mut targets, &mut pending)?;
            }
            Message::Chunks(b) if summed => {
                bytes += b.len() as u64;
                if chunks_target(&b)? != 0 {
                    bail!("protocol error: CHUNKS other than guest memory after the stream");
                }
                repaired = true;
                pending.push(b);
                apply(&mut targets, &mut pending)?;
            }
            Message::RoundEnd(1) if feed.is_some() => {
                // The stream is complete: once QEMU has loaded it, the
                // memory is hashed for the sender to check. The digests
                // (of the disks too: shared ones are final now, the source
                // paused and its QEMU flushed, copied ones once QEMU has
                // loaded the stream that carries them) are finished after
                // SUMS went out, while they cross the link.
                let t = Instant::now();
                refs = feed.take().expect("some").finish()?;
                let m = qemu.as_mut().expect("fed by a machine");
                m.wait_incoming(LOAD_WAIT)
                    .map_err(|e| anyhow!("QEMU did not load the stream: {e}"))?;
                let sums = crate::sums::file_sums(&targets[0].file, start.memory_size)
                    .context("hashing the received memory")?;
                for (k, part) in sums.chunks(MAX_SUMS).enumerate() {
                    tx.send(Message::Sums {
                        first: (k * MAX_SUMS) as u64,
                        sums: part.to_vec(),
                    })?;
                }
                load_us = t.elapsed().as_micros() as u64;
                summed = true;
                let p = prehash.take().expect("started with the stream");
                ahead.push(finish_ahead(p, &targets, nd, sums)?);
            }
            Message::RoundEnd(0) if qemu.is_none() => {
                let t = Instant::now();
                apply(&mut targets, &mut pending)?;
                let files = IncomingFiles {
                    memory: clone(&targets[0], "memory")?,
                    disks: targets[1..=nd]
                        .iter()
                        .map(|t| clone(t, "a disk"))
                        .collect::<Result<_>>()?,
                    kernel: clone(&targets[nd + 1], "the kernel")?,
                    initrd: targets
                        .get(nd + 2)
                        .map(|t| clone(t, "the initrd"))
                        .transpose()?,
                };
                // The sender does not wait for ROUND_ACK 0: while QEMU
                // starts, what it sends is read on (to the limit of
                // READ_AHEAD) so that the link does not stall.
                let done = AtomicBool::new(false);
                let (started, read) = std::thread::scope(|sc| {
                    let reader = sc.spawn(|| read_ahead(rx, &done, stop));
                    let started = backend.incoming(&cfg, files, w.path());
                    done.store(true, std::sync::atomic::Ordering::SeqCst);
                    let read = reader
                        .join()
                        .unwrap_or_else(|_| Err(anyhow!("a reading thread panicked")));
                    (started, read)
                });
                let (machine, sock) =
                    started.map_err(|e| anyhow!("starting QEMU for the incoming guest: {e}"))?;
                early.extend(read?);
                sock.set_write_timeout(Some(FEED_LIMIT))
                    .context("configuring the migration socket")?;
                qemu = Some(machine);
                let shared = targets[1..=nd]
                    .iter()
                    .map(|t| t.shared.then(|| clone(t, "a shared disk")).transpose())
                    .collect::<Result<_>>()?;
                feed = Some(Feeder::start(sock, shared));
                ahead.push(digest_ahead(&targets, nd, nd + 1..nd + 3)?);
                prehash = Some(Prehash::start(
                    targets[..=nd]
                        .iter()
                        .enumerate()
                        .map(|(j, t)| {
                            let f = clone(t, "a received file")?;
                            let size = f.metadata().context("stat of a received file")?.len();
                            // Copied disks: QEMU's stream writes them here.
                            Ok((f, size, j > 0 && !t.shared))
                        })
                        .collect::<Result<_>>()?,
                ));
                rounds += 1;
                tx.send(Message::RoundAck(RoundAck {
                    round: 0,
                    apply_us: t.elapsed().as_micros() as u64,
                    ..RoundAck::default()
                }))?;
                *acked = true;
            }
            Message::Stream(b) => {
                let Some(sock) = feed.as_mut() else {
                    bail!("protocol error: STREAM outside the stream");
                };
                bytes += b.len() as u64;
                let plain = zstd::bulk::decompress(&b, MAX_STREAM_CHUNK).context(
                    "protocol error: a STREAM that does not decompress to at most 1 MiB",
                )?;
                sock.send(Piece::Plain(plain))?;
            }
            Message::StreamRefs(m) => {
                let Some(sock) = feed.as_mut() else {
                    bail!("protocol error: STREAM_REFS outside the stream");
                };
                bytes += 8 + m.frame.len() as u64;
                // A reference to a disk that is not shared fails the
                // feeding thread (`disk_refs::rebuild`), and with it the
                // next send or the stream's end.
                let (list, literals) = m.open().context("protocol error")?;
                sock.send(Piece::Refs {
                    len: m.len as usize,
                    refs: list,
                    literals,
                })?;
            }
            Message::Commit if summed => {
                let t = Instant::now();
                apply(&mut targets, &mut pending)?;
                let (mut known, mut reread) = (Known::new(), 0);
                for h in ahead.drain(..) {
                    let (k, n) = h
                        .join()
                        .map_err(|_| anyhow!("a digesting thread panicked"))??;
                    known.extend(k);
                    reread += n;
                }
                if repaired {
                    // Pages were rewritten: the memory is digested at commit.
                    known.retain(|k| k.0 != Kind::Memory);
                }
                return Ok(Prepared {
                    w,
                    known,
                    name,
                    machine: qemu.expect("summed after the stream"),
                    apply_us: load_us + t.elapsed().as_micros() as u64,
                    reread,
                    rounds,
                    bytes,
                    refs,
                });
            }
            Message::Abort => return Err(SenderAborted.into()),
            other => bail!("protocol error: unexpected {}", other.ty().name()),
        }
    }
}

/// Waits for QEMU to have loaded the stream, commits the directory, lets
/// the guest run from it, and hands over.
pub(crate) fn start(
    l: &Listener,
    id: [u8; SESSION_ID_LEN],
    p: Prepared,
    tx: Tx,
    rx: Rx,
) -> Result<Received> {
    let Prepared {
        w,
        known,
        name,
        mut machine,
        apply_us,
        reread,
        rounds,
        bytes,
        refs,
    } = p;
    let mut r = Running {
        apply_us,
        blocks_hashed: reread,
        ..Running::default()
    };
    let t = Instant::now();
    let committed: PathBuf = match machine.commit_incoming(w, &name, LOAD_WAIT, &known) {
        Ok(c) => c,
        Err(e) => {
            let e = anyhow!("committing the received guest: {e}");
            l.set_phase(Phase::Aborted(id));
            send_error(tx, rx, &e);
            return Err(e.context("the migration failed; what was received is discarded"));
        }
    };
    r.commit_us = t.elapsed().as_micros() as u64;
    let t = Instant::now();
    let resumed = machine
        .resume()
        .map_err(|e| anyhow!("resuming the guest: {e}"))
        .and_then(|()| Ok(VmDir::open(&committed)?));
    let dir = match resumed {
        Ok(d) => d,
        Err(e) => {
            l.set_phase(Phase::Aborted(id));
            drop(machine);
            discard(&committed);
            send_error(tx, rx, &e);
            return Err(e.context("the migration failed; what was received is discarded"));
        }
    };
    r.restore_us = t.elapsed().as_micros() as u64;
    let mut got = hand_over(
        l,
        id,
        Box::new(machine),
        dir,
        committed,
        r,
        (tx, rx),
        (rounds, bytes),
    )?;
    got.stats["disk_refs"] = serde_json::json!({
        "pages": refs.pages,
        "missed": refs.missed,
    });
    Ok(got)
}
