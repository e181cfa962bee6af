//! The receiving side: handshakes on many connections at once (bounded,
//! each under a deadline), one incoming migration written into a VM
//! directory whose digests are kept current round by round, committed
//! before the guest runs from it, and kept after the hand-over whatever
//! fails later.

use std::collections::HashMap;
use std::fs::File;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kimberley_formats::digest::{digest_bytes, BlockDigests};
use kimberley_formats::fsutil::{parent_of, sync_dir};
use kimberley_formats::sys::{openat, poll};
use kimberley_formats::vmdir::{Component, Kind, Manifest, VmDir, VmDirWriter};
use kimberley_machine::{Machine, RestoreOptions};

/// A running guest.
type Vm = Box<dyn Machine>;
use rayon::prelude::*;
use serde_json::json;

use crate::channel::{self, Rx, Tx};
use crate::chunks::{self, Entry, CHUNK};
use crate::protocol::{Message, Outcome, RoundAck, Running, Start, SESSION_ID_LEN};

/// Most connections in their handshake at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Most connections in their handshake from one address.
pub const MAX_PER_PEER: usize = 8;
/// A sender silent for this long during pre-copy is given up on.
pub const IDLE_LIMIT: Duration = Duration::from_secs(60);
/// How long the receiver waits for DONE after RUNNING.
pub const DONE_WAIT: Duration = Duration::from_secs(30);
/// How long a receiver whose session failed before COMMIT stays to answer
/// a sender in doubt (which asks at once when the connection breaks).
pub const LINGER: Duration = Duration::from_secs(30);
/// How long after its session ended the receiver still answers QUERY (a
/// sender in doubt asks within `source::RUNNING_WAIT +
/// source::RESOLVE_FOR` of sending COMMIT, which is shorter).
pub const QUERY_WINDOW: Duration = Duration::from_secs(120);
/// Bodies decoded and written in parallel at a time.
const APPLY_BATCH: usize = 64;

/// What the receiver was told on the command line.
#[derive(Debug, Clone)]
pub struct Options {
    /// The VM directory to create.
    pub out: PathBuf,
    /// Shared disks must be files beneath this directory.
    pub shared_disk_dir: Option<PathBuf>,
    /// No messages but errors.
    pub quiet: bool,
}

/// An authenticated session whose first message was START.
pub struct Session {
    /// Sending half.
    pub tx: Tx,
    /// Receiving half.
    pub rx: Rx,
    /// The sender's address.
    pub peer: SocketAddr,
    /// Its START.
    pub start: Start,
}

/// Where this receiver's one session stands; QUERY answers from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// No session yet.
    Idle,
    /// Receiving session ID; no COMMIT yet.
    Receiving([u8; SESSION_ID_LEN]),
    /// COMMIT of session ID arrived (the guest runs here).
    Committed([u8; SESSION_ID_LEN]),
    /// Session ID ended without COMMIT, or a QUERY came first: a COMMIT
    /// arriving now is refused.
    Aborted([u8; SESSION_ID_LEN]),
}

struct Slots {
    total: usize,
    per_peer: HashMap<IpAddr, usize>,
}

/// Holds one handshake slot until dropped.
struct Slot {
    slots: Arc<Mutex<Slots>>,
    ip: IpAddr,
}

impl Slot {
    fn take(slots: &Arc<Mutex<Slots>>, ip: IpAddr) -> Option<Slot> {
        let mut s = slots.lock().unwrap_or_else(|p| p.into_inner());
        let n = s.per_peer.get(&ip).copied().unwrap_or(0);
        if s.total >= MAX_HANDSHAKES || n >= MAX_PER_PEER {
            return None;
        }
        s.total += 1;
        s.per_peer.insert(ip, n + 1);
        Some(Slot {
            slots: slots.clone(),
            ip,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.total -= 1;
        if let Some(n) = s.per_peer.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                s.per_peer.remove(&self.ip);
            }
        }
    }
}

/// The receiver's listening socket, served by a thread: every connection
/// gets its own handshake thread under [`channel::HANDSHAKE_DEADLINE`]
/// (at most [`MAX_HANDSHAKES`] at once, [`MAX_PER_PEER`] per address;
/// others are closed at once). The first START becomes the session; later
/// ones are refused; QUERY is answered from the [`Phase`].
pub struct Listener {
    phase: Arc<Mutex<Phase>>,
    queried: Arc<AtomicBool>,
    sessions: mpsc::Receiver<Session>,
    close_at: Arc<Mutex<Option<Instant>>>,
    addr: SocketAddr,
}

impl Listener {
    /// Starts serving `listener`.
    pub fn start(listener: TcpListener, key: [u8; 32], quiet: bool) -> Result<Listener> {
        listener
            .set_nonblocking(true)
            .context("configuring the listening socket")?;
        let addr = listener.local_addr().context("the listening address")?;
        let phase = Arc::new(Mutex::new(Phase::Idle));
        let queried = Arc::new(AtomicBool::new(false));
        let close_at = Arc::new(Mutex::new(None::<Instant>));
        let (tx, sessions) = mpsc::channel::<Session>();
        let (ph, q, ca) = (phase.clone(), queried.clone(), close_at.clone());
        std::thread::Builder::new()
            .name("vmigrate-listen".into())
            .spawn(move || accept_loop(listener, key, quiet, ph, q, ca, tx))
            .context("starting the listening thread")?;
        Ok(Listener {
            phase,
            queried,
            sessions,
            close_at,
            addr,
        })
    }

    /// The address listened on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Waits for the session (None when `stop` is set first).
    pub fn next_session(&self, stop: &AtomicBool) -> Option<Session> {
        loop {
            if stop.load(Ordering::SeqCst) {
                return None;
            }
            match self.sessions.recv_timeout(Duration::from_millis(50)) {
                Ok(s) => return Some(s),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Keeps answering QUERY for `d`, then closes the socket.
    pub fn close_after(&self, d: Duration) {
        *self.close_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + d);
    }

    /// Waits until the sender asked about this receiver's session (and was answered),
    /// `d` passed, or `stop` is set.
    pub fn linger(&self, d: Duration, stop: &AtomicBool) {
        let t = Instant::now();
        while t.elapsed() < d && !stop.load(Ordering::SeqCst) {
            if self.queried.load(Ordering::SeqCst) {
                // Let the answer leave before the process does.
                std::thread::sleep(Duration::from_millis(100));
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub(crate) fn set_phase(&self, p: Phase) {
        *self.phase.lock().unwrap_or_else(|p| p.into_inner()) = p;
    }

    /// Moves session `id` from Receiving to Committed; false if a QUERY
    /// aborted it first.
    pub(crate) fn commit(&self, id: [u8; SESSION_ID_LEN]) -> bool {
        let mut p = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        if *p == Phase::Receiving(id) {
            *p = Phase::Committed(id);
            true
        } else {
            false
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    key: [u8; 32],
    quiet: bool,
    phase: Arc<Mutex<Phase>>,
    queried: Arc<AtomicBool>,
    close_at: Arc<Mutex<Option<Instant>>>,
    sessions: mpsc::Sender<Session>,
) {
    let slots = Arc::new(Mutex::new(Slots {
        total: 0,
        per_peer: HashMap::new(),
    }));
    loop {
        if close_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| Instant::now() >= t)
        {
            return;
        }
        let _ = poll::readable_one(listener.as_raw_fd(), Some(Duration::from_millis(50)));
        let (stream, peer) = match listener.accept() {
            Ok(c) => c,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                continue
            }
            Err(e) => {
                // Out of descriptors and the like: refuse this one, go on.
                eprintln!("vmigrate: accepting a connection: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Some(slot) = Slot::take(&slots, peer.ip()) else {
            if !quiet {
                eprintln!("vmigrate: refused {peer}: too many handshakes in progress");
            }
            continue;
        };
        let (phase, queried, sessions) = (phase.clone(), queried.clone(), sessions.clone());
        let spawned = std::thread::Builder::new()
            .name("vmigrate-handshake".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = first_message(stream, peer, &key, &phase, &queried, &sessions) {
                    eprintln!("vmigrate: refused {peer}: {e:#}");
                }
            });
        if let Err(e) = spawned {
            eprintln!("vmigrate: refused {peer}: {e}");
        }
    }
}

/// Handshake and first message of one connection, all under the
/// handshake deadline.
fn first_message(
    stream: TcpStream,
    peer: SocketAddr,
    key: &[u8; 32],
    phase: &Mutex<Phase>,
    queried: &AtomicBool,
    sessions: &mpsc::Sender<Session>,
) -> Result<()> {
    let deadline = Instant::now() + channel::HANDSHAKE_DEADLINE;
    stream
        .set_nonblocking(false)
        .context("configuring the connection")?;
    let (mut tx, mut rx) = channel::handshake_receiver(stream, key)?;
    let left = deadline.saturating_duration_since(Instant::now());
    if !poll::readable_one(rx.stream().as_raw_fd(), Some(left))? {
        bail!("no first message within the handshake deadline");
    }
    let id = tx.session_id();
    match rx.recv()? {
        Message::Start(start) => {
            let mut p = phase.lock().unwrap_or_else(|p| p.into_inner());
            if *p != Phase::Idle {
                drop(p);
                let _ = tx.send(Message::Error(
                    "this receiver is taken by another migration".into(),
                ));
                bail!("a second migration while one is in progress");
            }
            *p = Phase::Receiving(id);
            drop(p);
            sessions
                .send(Session {
                    tx,
                    rx,
                    peer,
                    start,
                })
                .map_err(|_| anyhow!("the receiver is shutting down"))
        }
        Message::Query(q) => {
            let answer = {
                let mut p = phase.lock().unwrap_or_else(|p| p.into_inner());
                match *p {
                    Phase::Receiving(s) if s == q => {
                        // Presumed abort: asked before COMMIT arrived, it
                        // never will be taken.
                        *p = Phase::Aborted(s);
                        Outcome::Aborted
                    }
                    Phase::Committed(s) if s == q => Outcome::Committed,
                    Phase::Aborted(s) if s == q => Outcome::Aborted,
                    _ => Outcome::Unknown,
                }
            };
            eprintln!("vmigrate: {peer} asked how the hand-over ended: {answer:?}");
            tx.send(Message::Outcome(answer))?;
            if answer != Outcome::Unknown {
                queried.store(true, Ordering::SeqCst);
            }
            Ok(())
        }
        other => bail!("protocol error: {} as first message", other.ty().name()),
    }
}

/// A migrated VM running here, and its committed directory.
pub struct Received {
    /// The running guest.
    pub vm: Vm,
    /// Its directory.
    pub dir: VmDir,
    /// Receiver-side timings.
    pub stats: serde_json::Value,
    /// Set when the hand-over was not confirmed (no DONE): the guest runs
    /// here, and the source suspended its copy.
    pub in_doubt: Option<String>,
}

/// Where received chunks go.
pub(crate) struct Target {
    pub(crate) file: File,
    pub(crate) chunks: u64,
    pub(crate) shared: bool,
    pub(crate) digests: BlockDigests,
}

/// Receives one VM over an authenticated session into `opts.out`.
/// Before COMMIT every failure sends ERROR and leaves nothing behind; from
/// COMMIT on the directory is committed and the guest runs from it.
pub fn receive(l: &Listener, s: Session, opts: &Options, stop: &AtomicBool) -> Result<Received> {
    let Session {
        mut tx,
        mut rx,
        start: st,
        ..
    } = s;
    let id = tx.session_id();
    // Only once round 0 was acknowledged can the sender have moved on to
    // its final copy and COMMIT.
    let mut acked = false;
    let prepared = if st.stream {
        crate::stream_dest::prepare(st, &mut rx, &mut tx, opts, stop, &mut acked)
            .map(|p| Ready::Stream(Box::new(p)))
    } else {
        prepare(st, &mut rx, &mut tx, opts, stop, &mut acked).map(|p| Ready::Pages(Box::new(p)))
    };
    match prepared {
        Ok(Ready::Pages(p)) if l.commit(id) => start(l, id, *p, tx, rx),
        Ok(Ready::Stream(p)) if l.commit(id) => crate::stream_dest::start(l, id, *p, tx, rx),
        Ok(_) => {
            let e = anyhow!("the sender asked how the hand-over ended before COMMIT arrived, so it resumed its guest");
            send_error(tx, rx, &e);
            Err(e.context("the migration failed; what was received is discarded"))
        }
        Err(e) => {
            l.set_phase(Phase::Aborted(id));
            send_error(tx, rx, &e);
            // Unless the sender cancelled or this receiver is stopping, the
            // sender may have sent COMMIT and be in doubt: stay to tell it.
            if acked && e.downcast_ref::<SenderAborted>().is_none() && !stop.load(Ordering::SeqCst)
            {
                if !opts.quiet {
                    eprintln!(
                        "vmigrate: the migration failed; answering the sender for up to {} s in case it asks how it ended",
                        LINGER.as_secs()
                    );
                }
                l.linger(LINGER, stop);
            }
            Err(e.context("the migration failed; what was received is discarded"))
        }
    }
}

/// What a session received up to COMMIT.
enum Ready {
    /// Pages, disk blocks and a state blob (the microVM).
    Pages(Box<Prepared>),
    /// A hypervisor stream, loaded by the machine waiting for COMMIT.
    Stream(Box<crate::stream_dest::Prepared>),
}

/// Sends ERROR, then closes the sending direction and reads until the
/// sender closes too (at most 2 s): closing with unread data would reset
/// the connection, and a reset can discard the ERROR before the sender
/// reads it.
pub(crate) fn send_error(mut tx: Tx, rx: Rx, e: &anyhow::Error) {
    let _ = tx.send(Message::Error(format!("{e:#}")));
    let _ = tx.stream().shutdown(std::net::Shutdown::Write);
    let s = rx.stream();
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    let t = Instant::now();
    let mut buf = vec![0u8; 64 << 10];
    while t.elapsed() < Duration::from_secs(2) {
        match std::io::Read::read(&mut &*s, &mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return,
        }
    }
}

/// The sender sent ABORT: it resumes its guest and asks nothing.
#[derive(Debug)]
pub(crate) struct SenderAborted;

impl std::fmt::Display for SenderAborted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the sender cancelled the migration")
    }
}

impl std::error::Error for SenderAborted {}

/// Everything received up to COMMIT.
struct Prepared {
    w: VmDirWriter,
    skeleton: Manifest,
    targets: Vec<Target>,
    state: Vec<u8>,
    apply_us: u64,
    rounds: u32,
    bytes: u64,
}

/// Waits for the next message (watching `stop` and the idle limit).
pub(crate) fn next(rx: &mut Rx, stop: &AtomicBool) -> Result<Message> {
    let t = Instant::now();
    loop {
        if stop.load(Ordering::SeqCst) {
            bail!("the receiver was asked to stop");
        }
        if poll::readable_one(rx.stream().as_raw_fd(), Some(Duration::from_millis(50)))? {
            return rx.recv();
        }
        if t.elapsed() > IDLE_LIMIT {
            bail!("the sender was silent for {} s", IDLE_LIMIT.as_secs());
        }
    }
}

/// Opens the sender's shared disk `path` strictly beneath `dir`: no
/// symlink, a regular file of exactly `size` bytes.
pub(crate) fn open_shared(dir: &Path, path: &str, size: u64) -> Result<File> {
    let root = std::fs::canonicalize(dir)
        .with_context(|| format!("--shared-disk-dir {}", dir.display()))?;
    let rel = Path::new(path).strip_prefix(&root).map_err(|_| {
        anyhow!(
            "the sender's shared disk {path} is not beneath --shared-disk-dir {}",
            root.display()
        )
    })?;
    let d = File::open(&root).with_context(|| format!("opening {}", root.display()))?;
    let f = openat::open_beneath(&d, rel).with_context(|| {
        format!(
            "opening the shared disk {path} beneath {} (no symlinks allowed)",
            root.display()
        )
    })?;
    let m = f.metadata().context("stat of a shared disk")?;
    if !m.file_type().is_file() {
        bail!("the shared disk {path} is not a regular file");
    }
    if m.len() != size {
        bail!(
            "the shared disk {path} is {} bytes here, the sender says {size}",
            m.len()
        );
    }
    Ok(f)
}

/// The sender's shared disks, opened (see [`open_shared`]); none unless
/// START says so; refused without `--shared-disk-dir`.
pub(crate) fn shared_disks(start: &Start, opts: &Options) -> Result<Vec<File>> {
    let mut files = Vec::new();
    if start.shared_disk {
        let dir = opts.shared_disk_dir.as_ref().ok_or_else(|| {
            anyhow!("the sender has shared disks; this receiver takes them only with --shared-disk-dir DIR")
        })?;
        for d in &start.disks {
            files.push(open_shared(dir, &d.path, d.size)?);
        }
    }
    Ok(files)
}

fn prepare(
    start: Start,
    rx: &mut Rx,
    tx: &mut Tx,
    opts: &Options,
    stop: &AtomicBool,
    acked: &mut bool,
) -> Result<Prepared> {
    // Check everything the sender claims before any VM data moves.
    let shared_files = shared_disks(&start, opts)?;
    // The receiver's fixed share of the pause window, measured now: the
    // median of three VM setups like the restore's (see fixed_us below).
    let vcpus = u8::try_from(start.vcpus).unwrap_or(u8::MAX);
    let mut setups = Vec::new();
    for _ in 0..3 {
        setups.push(
            kimberley_vmm::probe::vm_setup_cost(start.memory_size, vcpus)
                .map_err(|e| anyhow!("this host cannot run the VM: {e}"))?,
        );
    }
    setups.sort();
    let fixed = setups[1];
    let name = opts
        .out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    let zero = |kind, size| Component {
        kind,
        size,
        digest: [0; 32],
        trimmed: false,
    };
    let mut components = vec![zero(Kind::Memory, start.memory_size)];
    components.extend(start.disks.iter().map(|d| zero(Kind::Disk, d.size)));
    components.push(zero(Kind::State, 0));
    let skeleton = Manifest {
        name,
        vcpus: start.vcpus,
        components,
        machine: None,
    };
    let mut w = VmDirWriter::create(&opts.out)?;
    // Committed without fsync before the guest runs (the pause window);
    // made durable right after the hand-over.
    w.set_sync(false);
    let t = Instant::now();
    let mem = w.create_file(&skeleton.file_name(0))?;
    mem.set_len(start.memory_size)
        .context("sizing guest memory")?;
    let mut targets = vec![Target {
        file: mem,
        chunks: start.memory_size / CHUNK as u64,
        shared: false,
        digests: BlockDigests::zeros(start.memory_size),
    }];
    let mut shared_files = shared_files.into_iter();
    for (i, d) in start.disks.iter().enumerate() {
        let dst = w.path().join(skeleton.file_name(1 + i));
        let t = if let Some(f) = shared_files.next() {
            openat::link_open_file(&f, &dst).with_context(|| {
                format!("linking the shared disk {} into the VM directory (it must be on the output's file system)", d.path)
            })?;
            // Its digest covers what it holds now; rounds mark what the
            // guest changes in place.
            let mut digests = BlockDigests::zeros(d.size);
            digests.mark_all();
            digests.rehash(&f).context("hashing a shared disk")?;
            Target {
                file: f,
                chunks: d.size.div_ceil(CHUNK as u64),
                shared: true,
                digests,
            }
        } else {
            let f = w.create_file(&skeleton.file_name(1 + i))?;
            f.set_len(d.size).context("sizing a disk")?;
            Target {
                file: f,
                chunks: d.size.div_ceil(CHUNK as u64),
                shared: false,
                digests: BlockDigests::zeros(d.size),
            }
        };
        targets.push(t);
    }
    // The receiver's fixed share of the pause window: VM setup, plus
    // writing the state and manifest and renaming (measured on this
    // directory's file system now).
    let fixed_us = (fixed + t.elapsed()).as_micros() as u64 + 1000;
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut state = None;
    let (mut rounds, mut bytes) = (0u32, 0u64);
    loop {
        let m = next(rx, stop)?;
        match m {
            Message::Chunks(b) => {
                bytes += b.len() as u64;
                pending.push(b);
                if pending.len() >= APPLY_BATCH {
                    apply(&mut targets, &mut pending)?;
                }
            }
            Message::RoundEnd(n) => {
                let t = Instant::now();
                apply(&mut targets, &mut pending)?;
                let apply_us = t.elapsed().as_micros() as u64;
                let t = Instant::now();
                let blocks_hashed = rehash(&mut targets)?;
                rounds += 1;
                tx.send(Message::RoundAck(RoundAck {
                    round: n,
                    apply_us,
                    blocks_hashed,
                    hash_us: t.elapsed().as_micros() as u64,
                    fixed_us,
                }))?;
                *acked = true;
            }
            Message::State(b) => {
                kimberley_vmm::validate_state(&b)
                    .map_err(|e| anyhow!("the received state is unusable: {e}"))?;
                state = Some(b);
            }
            Message::Commit => {
                let t_commit = Instant::now();
                apply(&mut targets, &mut pending)?;
                let state = state.ok_or_else(|| anyhow!("protocol error: COMMIT before STATE"))?;
                return Ok(Prepared {
                    w,
                    skeleton,
                    targets,
                    state,
                    apply_us: t_commit.elapsed().as_micros() as u64,
                    rounds,
                    bytes,
                });
            }
            Message::Abort => return Err(SenderAborted.into()),
            other => bail!("protocol error: unexpected {}", other.ty().name()),
        }
    }
}

/// Writes the queued bodies (decoded and written in parallel; a chunk
/// appears at most once per round) and marks the digest blocks they touch.
pub(crate) fn apply(targets: &mut [Target], bodies: &mut Vec<Vec<u8>>) -> Result<()> {
    let touched: Vec<Vec<(usize, u64)>> = {
        let targets = &*targets;
        bodies
            .par_drain(..)
            .map(|b| apply_one(targets, &b))
            .collect::<Result<_>>()?
    };
    for (t, off) in touched.into_iter().flatten() {
        targets[t].digests.mark(off);
    }
    Ok(())
}

fn apply_one(targets: &[Target], body: &[u8]) -> Result<Vec<(usize, u64)>> {
    let d = chunks::decode(body).context("protocol error")?;
    let ti = d.target as usize;
    let t = targets
        .get(ti)
        .ok_or_else(|| anyhow!("protocol error: CHUNKS for unknown target {}", d.target))?;
    let mut touched = Vec::with_capacity(d.entries.len());
    for (idx, e) in &d.entries {
        if *idx >= t.chunks {
            bail!(
                "protocol error: chunk {idx} beyond the end of target {}",
                d.target
            );
        }
        let off = idx * CHUNK as u64;
        match (e, t.shared) {
            (Entry::Data(r), false) => t.file.write_all_at(&d.plain[r.clone()], off),
            (Entry::Zero, false) => punch(&t.file, off),
            (Entry::Shared, true) => Ok(()),
            _ => bail!(
                "protocol error: chunk kind does not match target {} (shared: {})",
                d.target,
                t.shared
            ),
        }
        .context("writing received data")?;
        touched.push((ti, off));
    }
    Ok(touched)
}

fn punch(f: &File, off: u64) -> std::io::Result<()> {
    kimberley_formats::sys::punch::punch_hole(f, off, CHUNK as u64)
        .or_else(|_| f.write_all_at(&[0u8; CHUNK], off))
}

fn rehash(targets: &mut [Target]) -> Result<u64> {
    let mut n = 0;
    for t in targets.iter_mut() {
        n += t.digests.rehash(&t.file).context("hashing received data")?;
    }
    Ok(n)
}

/// Commits the directory, resumes the guest from it, answers RUNNING and
/// waits for the hand-over's confirmation.
fn start(l: &Listener, id: [u8; SESSION_ID_LEN], p: Prepared, tx: Tx, rx: Rx) -> Result<Received> {
    let mut r = Running {
        apply_us: p.apply_us,
        ..Running::default()
    };
    let (rounds, bytes) = (p.rounds, p.bytes);
    let committed = match commit(p, &mut r) {
        Ok(c) => c,
        Err(e) => {
            l.set_phase(Phase::Aborted(id));
            send_error(tx, rx, &e);
            return Err(e.context("the migration failed; what was received is discarded"));
        }
    };
    let (vm, dir) = match resume(&committed, &mut r) {
        Ok(v) => v,
        Err(e) => {
            l.set_phase(Phase::Aborted(id));
            discard(&committed);
            send_error(tx, rx, &e);
            return Err(e.context("the migration failed; what was received is discarded"));
        }
    };
    hand_over(l, id, vm, dir, committed, r, (tx, rx), (rounds, bytes))
}

/// The guest runs here from the committed directory: answers RUNNING and
/// waits for DONE (an ABORT discards this copy; anything else keeps it).
#[allow(clippy::too_many_arguments)]
pub(crate) fn hand_over(
    l: &Listener,
    id: [u8; SESSION_ID_LEN],
    vm: Vm,
    dir: VmDir,
    committed: PathBuf,
    mut r: Running,
    (mut tx, mut rx): (Tx, Rx),
    (rounds, bytes): (u32, u64),
) -> Result<Received> {
    let first = vm.first_run().unwrap_or_else(Instant::now);
    r.delay_us = first.elapsed().as_micros() as u64;
    if let Err(e) = tx.send(Message::Running(r)) {
        // The source may or may not hear RUNNING; having sent COMMIT, it
        // does not resume its copy on its own: keep this one.
        let st = stats(rounds, bytes, &r);
        return Ok(in_doubt(vm, dir, format!("sending RUNNING: {e:#}"), st));
    }
    // The source stops for good once it has RUNNING; DONE confirms it.
    let wait = wait_done(&mut rx);
    let st = stats(rounds, bytes, &r);
    match wait {
        Ok(Message::Done) => {
            make_durable(&committed);
            Ok(Received {
                vm,
                dir,
                stats: st,
                in_doubt: None,
            })
        }
        Ok(Message::Abort) => {
            // The source resumes its copy: this one must not run on.
            l.set_phase(Phase::Aborted(id));
            drop(vm);
            discard(&committed);
            bail!("the sender cancelled the migration after the guest started here; this copy is discarded")
        }
        Ok(other) => Ok(in_doubt(
            vm,
            dir,
            format!("protocol error: {} instead of DONE", other.ty().name()),
            st,
        )),
        Err(e) => Ok(in_doubt(vm, dir, format!("{e:#}"), st)),
    }
}

fn wait_done(rx: &mut Rx) -> Result<Message> {
    if !poll::readable_one(rx.stream().as_raw_fd(), Some(DONE_WAIT))? {
        bail!(
            "no confirmation from the sender within {} s",
            DONE_WAIT.as_secs()
        );
    }
    rx.recv()
}

/// No DONE came: the source, having sent COMMIT, suspends its copy rather
/// than resume it, so this one runs on.
fn in_doubt(vm: Vm, dir: VmDir, why: String, stats: serde_json::Value) -> Received {
    make_durable(&dir.path);
    Received {
        vm,
        dir,
        stats,
        in_doubt: Some(why),
    }
}

pub(crate) fn stats(rounds: u32, bytes: u64, r: &Running) -> serde_json::Value {
    let ms = |us: u64| us as f64 / 1000.0;
    json!({
        "rounds": rounds,
        "bytes_received": bytes,
        "apply_ms": ms(r.apply_us),
        "hash_ms": ms(r.hash_us),
        "digest_blocks_rehashed": r.blocks_hashed,
        "commit_ms": ms(r.commit_us),
        "restore_ms": ms(r.restore_us),
    })
}

/// Re-hashes the last blocks, writes state.bin and the manifest (digests
/// of exactly the handed-over state) and renames the directory into place.
fn commit(p: Prepared, r: &mut Running) -> Result<PathBuf> {
    let Prepared {
        w,
        mut skeleton,
        mut targets,
        state,
        ..
    } = p;
    let t = Instant::now();
    r.blocks_hashed = rehash(&mut targets)?;
    r.hash_us = t.elapsed().as_micros() as u64;
    let t = Instant::now();
    let si = skeleton.components.len() - 1;
    let f = w.create_file(&skeleton.file_name(si))?;
    f.write_all_at(&state, 0).context("writing the state")?;
    for (c, t) in skeleton.components.iter_mut().zip(&targets) {
        c.digest = t.digests.digest();
    }
    skeleton.components[si] = Component {
        kind: Kind::State,
        size: state.len() as u64,
        digest: digest_bytes(&state),
        trimmed: false,
    };
    let out = w.commit(&skeleton)?;
    r.commit_us = t.elapsed().as_micros() as u64;
    Ok(out)
}

/// Restores the guest from the committed directory and waits for its
/// first instruction.
fn resume(dir: &Path, r: &mut Running) -> Result<(Vm, VmDir)> {
    let t = Instant::now();
    let d = VmDir::open(dir)?;
    let vm = kimberley_cli::machines::restore(&d, RestoreOptions::in_place())
        .context("resuming the guest")?;
    let first = vm.first_run().unwrap_or_else(Instant::now);
    r.restore_us = first.saturating_duration_since(t).as_micros() as u64;
    Ok((vm, d))
}

/// Removes a committed directory whose guest must not run (moved to a
/// temporary name first, so nothing half-removed keeps the name).
pub(crate) fn discard(dir: &Path) {
    let tmp = kimberley_formats::fsutil::temp_sibling(dir);
    if std::fs::rename(dir, &tmp).is_ok() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
}

/// fsyncs the directory's files, itself and its parent.
pub(crate) fn make_durable(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(f) = File::open(e.path()) {
                let _ = f.sync_all();
            }
        }
    }
    let _ = sync_dir(dir);
    let _ = sync_dir(&parent_of(dir));
}
