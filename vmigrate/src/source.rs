//! The sending side, run inside the process that runs the VM (`vmigrate
//! run`, `vmigrate recv`) as the control socket's `migrate` handler:
//! pre-copy rounds over the dirty log, auto-converge, stop-and-copy, and
//! the hand-over that leaves exactly one running copy.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kimberley_formats::chunk::is_zero;
use kimberley_formats::sparse::data_extents;
use kimberley_formats::sys::poll;
use kimberley_machine::{Bitmap, Machine, Migratable, MigrateError, MigrateIo};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::channel::{self, seal_at, Frame, Rx, Tx};
use crate::chunks::{self, BATCH, CHUNK};
use crate::params::Params;
use crate::policy::{self, Costs, Decision, Estimate, Limits, Observation, StopReason};
use crate::protocol::{DiskInfo, Message, Outcome, RoundAck, Running, Start, SESSION_ID_LEN};
use crate::writer::Writer;

/// Chunks per 1 MiB digest block.
const CHUNKS_PER_BLOCK: u64 = (kimberley_formats::digest::BLOCK_SIZE / CHUNK) as u64;
/// Batches compressed and sealed in parallel at a time.
const WINDOW: usize = 32;

/// How long the sender waits, after DONE, for the receiver to close.
const DONE_LINGER: Duration = Duration::from_secs(2);
/// How long the source waits for RUNNING after COMMIT before it declares
/// the hand-over in doubt.
pub const RUNNING_WAIT: Duration = Duration::from_secs(60);

/// How a migration that did not complete ended.
#[derive(Debug)]
pub enum Failure {
    /// Nothing was handed over: the guest was resumed here (if it ran).
    Kept(anyhow::Error),
    /// COMMIT went out and no answer came back: the receiver may run the
    /// guest. It stays paused here; the caller suspends it and must not
    /// resume it.
    InDoubt(anyhow::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Kept(e) => write!(f, "{e:#}"),
            Failure::InDoubt(e) => write!(f, "{e:#}"),
        }
    }
}

/// Counters of one round.
#[derive(Default, Debug, Clone)]
struct Round {
    pages: u64,
    zero_pages: u64,
    disk_blocks: u64,
    data_chunks: u64,
    bytes: u64,
    ms: f64,
    dirty_rate: f64,
    throttle: u32,
    ack: RoundAck,
}

impl Round {
    fn json(&self, n: u32) -> Value {
        json!({
            "round": n,
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "disk_blocks": self.disk_blocks,
            "bytes": self.bytes,
            "ms": r3(self.ms),
            "dirty_rate": self.dirty_rate.round() as u64,
            "throttle": self.throttle,
        })
    }
}

pub(crate) fn r3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

pub(crate) fn ms_since(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// Where chunks come from.
pub(crate) enum Source<'a> {
    Memory(&'a dyn Migratable),
    Disk(&'a File),
}

impl Source<'_> {
    fn read(&self, idx: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Memory(m) => m
                .read_memory(idx * CHUNK as u64, buf)
                .map_err(|e| anyhow!("reading guest memory: {e}")),
            Source::Disk(f) => {
                buf.fill(0);
                let mut done = 0;
                while done < buf.len() {
                    let n = f
                        .read_at(&mut buf[done..], idx * CHUNK as u64 + done as u64)
                        .context("reading a disk")?;
                    if n == 0 {
                        break;
                    }
                    done += n;
                }
                Ok(())
            }
        }
    }
}

/// What a round sends from one target.
pub(crate) struct Sent {
    pub(crate) data: u64,
    pub(crate) zero: u64,
}

/// The source's share of a migration's pause, in ms (`downtime_parts`).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct SourceParts {
    pub pause_ms: f64,
    pub state_ms: f64,
    pub dirty_fetch_ms: f64,
    pub final_pages_ms: f64,
    pub state_send_ms: f64,
}

pub(crate) struct Session<'a, 'b> {
    pub(crate) tx: Tx,
    pub(crate) rx: Rx,
    pub(crate) writer: Writer,
    pub(crate) io: &'a mut MigrateIo<'b>,
    pub(crate) deadline: Instant,
    round: u32,
    pub(crate) rtt_ms: f64,
    pub(crate) key: [u8; 32],
}

impl Session<'_, '_> {
    /// Fails on a cancel request, the deadline or a writer error. Only
    /// called before COMMIT.
    pub(crate) fn check(&mut self) -> Result<()> {
        if self.io.cancelled() {
            bail!("cancelled");
        }
        if Instant::now() > self.deadline {
            bail!("the migration did not finish within --timeout");
        }
        self.writer.check()
    }

    /// Sends chunks `indices` of `src` as target `target`. With
    /// `skip_zero`, zero chunks are not sent at all (round 0: the receiver
    /// starts from zeros). With `shared`, no data travels: every index is
    /// sent as "changed in place" so the receiver re-hashes it.
    pub(crate) fn send_chunks(
        &mut self,
        src: &Source<'_>,
        target: u32,
        indices: &[u64],
        skip_zero: bool,
        progress: &mut dyn FnMut(&mut MigrateIo<'_>, u64),
    ) -> Result<Sent> {
        let mut sent = Sent { data: 0, zero: 0 };
        for window in indices.chunks(BATCH * WINDOW) {
            self.check()?;
            type Batch = (Option<Vec<u8>>, u64, u64);
            let bodies: Vec<Result<Batch>> = window
                .par_chunks(BATCH)
                .map(|batch| {
                    let mut buf = vec![0u8; batch.len() * CHUNK];
                    for (k, &i) in batch.iter().enumerate() {
                        src.read(i, &mut buf[k * CHUNK..(k + 1) * CHUNK])?;
                    }
                    let mut list: Vec<(u64, Option<&[u8]>)> = Vec::with_capacity(batch.len());
                    let (mut d, mut z) = (0, 0);
                    for (k, &i) in batch.iter().enumerate() {
                        let b = &buf[k * CHUNK..(k + 1) * CHUNK];
                        if is_zero(b) {
                            z += 1;
                            if !skip_zero {
                                list.push((i, None));
                            }
                        } else {
                            d += 1;
                            list.push((i, Some(b)));
                        }
                    }
                    let body = (!list.is_empty()).then(|| chunks::encode(target, &list));
                    Ok((body, d, z))
                })
                .collect();
            let mut plain = Vec::new();
            for b in bodies {
                let (body, d, z) = b?;
                sent.data += d;
                sent.zero += z;
                plain.extend(body);
            }
            self.push_chunks(plain)?;
            progress(self.io, window.len() as u64);
        }
        Ok(sent)
    }

    /// Tells the receiver which blocks of shared disk `target` changed in
    /// place (no data).
    fn send_shared(&mut self, target: u32, indices: &[u64]) -> Result<()> {
        let plain: Vec<Vec<u8>> = indices
            .chunks(BATCH)
            .map(|b| chunks::encode_shared(target, b))
            .collect();
        self.push_chunks(plain)
    }

    fn push_chunks(&mut self, plain: Vec<Vec<u8>>) -> Result<()> {
        let base = self.tx.reserve(plain.len() as u64);
        let sealer = self.tx.sealer().clone();
        let frames: Vec<Frame> = plain
            .into_par_iter()
            .enumerate()
            .map(|(k, body)| seal_at(&sealer, base + k as u64, Message::Chunks(body)))
            .collect();
        self.writer.push(frames)
    }

    /// Waits for the receiver's next message. With `cancellable`, a cancel
    /// request or the deadline ends the wait with an error. An ERROR from
    /// the receiver becomes [`ReceiverError`].
    /// After COMMIT: waits for the receiver's RUNNING and says DONE (the
    /// guest runs on the receiver: this side never resumes it again,
    /// whatever happens). Returns the downtime (pause start to RUNNING,
    /// less the receiver's reply delay), the `downtime_parts` of
    /// `--stats-json` (docs/MIGRATION.md) from `parts`, the source's share,
    /// the bytes sent, the receiver's answer and when it came (the end of
    /// `total_ms`: the wait for the receiver to close after DONE is not
    /// the migration's).
    pub(crate) fn hand_over(
        &mut self,
        t_pause: Instant,
        parts: &SourceParts,
    ) -> Result<(f64, Value, u64, Running, Instant)> {
        let running: Running = match self
            .wait_msg(RUNNING_WAIT, false)
            .context("waiting for the receiver to start the guest")?
        {
            Message::Running(r) => r,
            other => bail!(
                "protocol error: {} while waiting for RUNNING",
                other.ty().name()
            ),
        };
        let t_running = Instant::now();
        let _ = self.send_msg(Message::Done);
        let _ = self.writer.flush();
        self.rx.linger(DONE_LINGER);
        let total_pause = t_running.duration_since(t_pause).as_secs_f64() * 1000.0;
        let downtime = (total_pause - running.delay_us as f64 / 1000.0).max(0.0);
        let us = |v: u64| v as f64 / 1000.0;
        let accounted = parts.pause_ms
            + parts.state_ms
            + parts.dirty_fetch_ms
            + parts.final_pages_ms
            + parts.state_send_ms
            + us(running.to_first_run_us());
        let json = json!({
            "pause_ms": r3(parts.pause_ms),
            "state_ms": r3(parts.state_ms),
            "dirty_fetch_ms": r3(parts.dirty_fetch_ms),
            "final_pages_ms": r3(parts.final_pages_ms),
            "state_send_ms": r3(parts.state_send_ms),
            "receiver_apply_ms": r3(us(running.apply_us)),
            "receiver_hash_ms": r3(us(running.hash_us)),
            "receiver_commit_ms": r3(us(running.commit_us)),
            "restore_ms": r3(us(running.restore_us)),
            "network_ms": r3((downtime - accounted).max(0.0)),
        });
        Ok((downtime, json, self.writer.bytes(), running, t_running))
    }

    pub(crate) fn wait_msg(&mut self, limit: Duration, cancellable: bool) -> Result<Message> {
        let t0 = Instant::now();
        loop {
            if cancellable {
                self.check()?;
            }
            let fd = self.rx.stream().as_raw_fd();
            if poll::readable_one(fd, Some(Duration::from_millis(20)))
                .context("waiting for the receiver")?
            {
                return match self.rx.recv()? {
                    Message::Error(e) => Err(ReceiverError(e).into()),
                    m => Ok(m),
                };
            }
            if t0.elapsed() > limit {
                bail!("the receiver did not answer within {} s", limit.as_secs());
            }
        }
    }

    pub(crate) fn send_msg(&mut self, m: Message) -> Result<()> {
        let f = self.tx.seal(m)?;
        self.writer.push(vec![f])
    }
}

/// The receiver said it failed (it discards what it received).
#[derive(Debug)]
pub(crate) struct ReceiverError(pub(crate) String);

impl std::fmt::Display for ReceiverError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the receiver failed: {}", self.0)
    }
}

impl std::error::Error for ReceiverError {}

/// Chunk indices of the data extents of a disk (every chunk if the file
/// system cannot tell).
pub(crate) fn disk_chunks(f: &File, size: u64) -> Vec<u64> {
    let extents = data_extents(f, size).unwrap_or_else(|_| vec![(0, size)]);
    let mut out: Vec<u64> = Vec::new();
    for (a, b) in extents {
        let first = a / CHUNK as u64;
        let last = b.div_ceil(CHUNK as u64);
        let from = out.last().map_or(first, |&l| first.max(l + 1));
        out.extend(from..last);
    }
    out
}

/// Dirty pages and per-disk dirty blocks since the last fetch.
fn fetch_dirty(vm: &mut dyn Migratable, ndisks: usize) -> Result<(Vec<u64>, Vec<Vec<u64>>)> {
    let bm: Bitmap = vm.dirty_pages().map_err(|e| anyhow!("{e}"))?;
    let pages = bm.iter_set().map(|i| i as u64).collect();
    let mut blocks = Vec::new();
    for i in 0..ndisks {
        let b = vm.dirty_disk_blocks(i).map_err(|e| anyhow!("{e}"))?;
        blocks.push(b.iter_set().map(|i| i as u64).collect());
    }
    Ok((pages, blocks))
}

/// Reads the migration key (either form of docs/FORMAT.md "Key files"),
/// refusing anything but a regular file (no symlink is followed).
fn read_key_file(p: &Params) -> Result<[u8; 32]> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(&p.key_file)
        .with_context(|| format!("migrate: opening key_file {}", p.key_file.display()))?;
    if !f.metadata()?.file_type().is_file() {
        bail!(
            "migrate: key_file {} is not a regular file",
            p.key_file.display()
        );
    }
    let mut b = Vec::new();
    // A key file is at most 75 bytes (docs/FORMAT.md "Key files").
    f.take(1024).read_to_end(&mut b)?;
    kimberley_formats::crypto::keyfile::parse(&b)
        .map_err(|e| anyhow!("migrate: key_file {}: {e}", p.key_file.display()))
}

/// The measured state of the link and the receiver, updated per round.
struct Meter {
    costs: Costs,
    /// `--max-bandwidth`, bytes per second.
    cap_bps: Option<f64>,
    /// Milliseconds of CPU per data chunk (read, compress, seal), round 0.
    cpu_chunk_ms: f64,
}

impl Meter {
    /// Learns from a finished round (`first`: round 0, whose zero pages
    /// were skipped rather than sent). The model of a round's streaming
    /// time is `fixed + chunks x per_chunk`, where a chunk costs the slower
    /// of the CPU (measured on round 0's data chunks) and the link (the
    /// wire bytes a chunk of the latest round took, at the link's rate).
    fn after_round(&mut self, r: &Round, first: bool) {
        // The round's time without the receiver's work after the last
        // chunk and the ROUND_END/ROUND_ACK round trip: streaming only.
        let ack_ms = (r.ack.apply_us + r.ack.hash_us) as f64 / 1000.0;
        let streaming = (r.ms - ack_ms - self.costs.rtt_ms).max(r.ms * 0.1);
        let chunks = if first {
            r.data_chunks
        } else {
            r.pages + r.disk_blocks
        };
        if first {
            self.cpu_chunk_ms = streaming / r.data_chunks.max(1) as f64;
            self.costs.link_bps = self
                .cap_bps
                .unwrap_or(r.bytes as f64 / (streaming / 1000.0).max(1e-6));
        }
        if chunks > 0 {
            let wire_ms = r.bytes as f64 / chunks as f64 / self.costs.link_bps * 1000.0;
            self.costs.chunk_ms = self.cpu_chunk_ms.max(wire_ms);
            self.costs.round_fixed_ms = (streaming - chunks as f64 * self.costs.chunk_ms).max(0.0);
        }
        if r.ack.blocks_hashed > 0 {
            self.costs.hash_block_ms = r.ack.hash_us as f64 / 1000.0 / r.ack.blocks_hashed as f64;
        }
        self.costs.receiver_fixed_ms = r.ack.fixed_us as f64 / 1000.0;
    }
}

/// Migrates `vm`. On [`Failure::Kept`] the guest runs here as it did;
/// on [`Failure::InDoubt`] it is paused and must be suspended, not resumed.
pub fn migrate(
    vm: &mut dyn Migratable,
    p: &Params,
    io: &mut MigrateIo<'_>,
) -> Result<Value, Failure> {
    let t0 = Instant::now();
    let was_running = !vm.is_paused();
    let mut s = connect(p, io).map_err(Failure::Kept)?;
    let mut committed = false;
    let r = precopy_and_switch(vm, p, &mut s, t0, was_running, &mut committed);
    let e = match r {
        Ok(v) => return Ok(v),
        Err(e) => e,
    };
    // What is still queued is not worth waiting for on a slow link.
    let whole = s.writer.cancel();
    if !committed && whole {
        // Tell the receiver to discard (best effort); otherwise the closed
        // connection tells it.
        let _ = s.send_msg(Message::Abort);
        let _ = s.writer.flush();
    }
    let _ = s.tx.stream().shutdown(std::net::Shutdown::Both);
    vm.set_throttle(0);
    let e = if committed && e.downcast_ref::<ReceiverError>().is_none() {
        // COMMIT may have reached the receiver, which then runs the guest:
        // ask it (on a new connection) before anything else.
        s.io.progress(json!({"in_doubt": format!("{e:#}")}));
        match resolve(&p.to, &s.key, s.tx.session_id()) {
            Resolution::Committed => {
                let _ = vm.set_dirty_logging(false);
                return Ok(json!({
                    "to": p.to,
                    "total_ms": r3(ms_since(t0)),
                    "hand_over": "confirmed by QUERY after the connection was lost",
                    "error": format!("{e:#}"),
                }));
            }
            Resolution::NotCommitted(why) => e.context(why),
            Resolution::Unknown(why) => {
                let _ = vm.set_dirty_logging(false);
                return Err(Failure::InDoubt(e.context(format!(
                    "the hand-over is in doubt: the receiver may be running the guest, and asking it failed ({why})"
                ))));
            }
        }
    } else {
        e
    };
    // The guest runs here as before: unthrottled before it resumes,
    // dirty-log teardown after.
    if was_running && vm.is_paused() {
        if let Err(re) = vm.resume() {
            return Err(Failure::Kept(anyhow!(
                "{e:#}; and the guest could not be resumed: {re}"
            )));
        }
    }
    let _ = vm.set_dirty_logging(false);
    Err(Failure::Kept(e))
}

/// How long a sender in doubt keeps asking the receiver how the hand-over
/// ended (the receiver answers for `dest::QUERY_WINDOW` after it).
pub const RESOLVE_FOR: Duration = Duration::from_secs(20);

/// What the receiver said of a session whose hand-over is in doubt.
pub(crate) enum Resolution {
    /// It took COMMIT: the guest runs there.
    Committed,
    /// It did not and never will (it said so, or its process is gone).
    NotCommitted(String),
    /// No answer.
    Unknown(String),
}

/// Asks the receiver at `to`, on new connections for up to
/// [`RESOLVE_FOR`], whether session `id` committed. Only an authenticated
/// answer counts: a refused connection may come from a firewall or a
/// proxy in front of a receiver that runs the guest.
pub(crate) fn resolve(to: &str, key: &[u8; 32], id: [u8; SESSION_ID_LEN]) -> Resolution {
    let deadline = Instant::now() + RESOLVE_FOR;
    let mut last;
    loop {
        match ask(to, key, id) {
            Ok(Outcome::Committed) => return Resolution::Committed,
            Ok(Outcome::Aborted) => {
                return Resolution::NotCommitted(
                    "the receiver says it did not take the hand-over and discarded its copy".into(),
                )
            }
            Ok(Outcome::Unknown) => {
                return Resolution::NotCommitted(
                    "the receiver no longer knows the session (it was restarted)".into(),
                )
            }
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            return Resolution::Unknown(last);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn ask(to: &str, key: &[u8; 32], id: [u8; SESSION_ID_LEN]) -> Result<Outcome> {
    let addr = std::net::ToSocketAddrs::to_socket_addrs(to)?
        .next()
        .ok_or_else(|| anyhow!("{to} resolves to no address"))?;
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_write_timeout(Some(Duration::from_secs(5))).ok();
    let (mut tx, mut rx) = channel::handshake_sender(stream, key)?;
    tx.send(Message::Query(id))?;
    rx.stream()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .ok();
    match rx.recv()? {
        Message::Outcome(o) => Ok(o),
        Message::Error(e) => bail!("the receiver answered: {e}"),
        other => bail!("protocol error: {} instead of OUTCOME", other.ty().name()),
    }
}

/// Unsent bytes the migration connection may hold (`TCP_NOTSENT_LOWAT`).
const NOTSENT_LOWAT: u32 = 128 << 10;

pub(crate) fn connect<'a, 'b>(p: &Params, io: &'a mut MigrateIo<'b>) -> Result<Session<'a, 'b>> {
    let key = read_key_file(p)?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&p.to)
        .with_context(|| format!("resolving {}", p.to))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", p.to))?;
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {}", p.to))?;
    stream.set_write_timeout(Some(Duration::from_secs(60))).ok();
    // At most NOTSENT_LOWAT bytes wait in the socket unsent (instead of up
    // to the autotuned send buffer, 4 MiB by default: 0.3 s of a 100 Mbit/s
    // link): what is queued when the guest pauses is on the wire sooner,
    // and a cancel has less to drop. The writer blocks until the kernel
    // wants more, so the link stays as busy.
    socket2::SockRef::from(&stream)
        .set_tcp_notsent_lowat(NOTSENT_LOWAT)
        .context("setting TCP_NOTSENT_LOWAT on the migration connection")?;
    // The handshake is one and a half round trips: an upper bound of one.
    let t = Instant::now();
    let (tx, rx) = channel::handshake_sender(stream, &key)?;
    let rtt_ms = ms_since(t);
    let writer = Writer::start(
        tx.stream().try_clone().context("duplicating the socket")?,
        p.max_bandwidth,
    );
    Ok(Session {
        tx,
        rx,
        writer,
        io,
        deadline: Instant::now() + p.timeout(),
        round: 0,
        rtt_ms,
        key,
    })
}

#[allow(clippy::too_many_arguments)]
fn send_round(
    vm: &dyn Migratable,
    s: &mut Session<'_, '_>,
    disks: &[File],
    shared: bool,
    pages: &[u64],
    blocks: &[Vec<u64>],
    skip_zero: bool,
    dirty_rate: f64,
    final_round: bool,
) -> Result<Round> {
    let t = Instant::now();
    let b0 = s.writer.bytes();
    let total = pages.len() as u64 + blocks.iter().map(|b| b.len() as u64).sum::<u64>();
    let n = s.round;
    let mut done = 0u64;
    let mut last_report = Instant::now();
    let mut progress = |io: &mut MigrateIo<'_>, k: u64| {
        done += k;
        if last_report.elapsed() >= Duration::from_millis(100) || done == total {
            last_report = Instant::now();
            io.progress(json!({"round": n, "done": done, "total": total}));
        }
    };
    let mem = Source::Memory(vm);
    let m = s.send_chunks(&mem, 0, pages, skip_zero, &mut progress)?;
    let (mut blk, mut data) = (0, m.data);
    for (i, b) in blocks.iter().enumerate() {
        let target = 1 + i as u32;
        if shared {
            if !b.is_empty() {
                s.send_shared(target, b)?;
            }
            continue;
        }
        let d = s.send_chunks(
            &Source::Disk(&disks[i]),
            target,
            b,
            skip_zero,
            &mut progress,
        )?;
        blk += d.data + d.zero;
        data += d.data;
    }
    let mut ack = RoundAck::default();
    if !final_round {
        // The round ends when the receiver has written and hashed it: its
        // duration is what the whole pipeline takes.
        s.send_msg(Message::RoundEnd(n))?;
        s.writer.flush()?;
        match s.wait_msg(Duration::from_secs(60), true)? {
            Message::RoundAck(a) if a.round == n => ack = a,
            other => bail!(
                "protocol error: {} instead of ROUND_ACK {n}",
                other.ty().name()
            ),
        }
    }
    Ok(Round {
        pages: m.data + m.zero,
        zero_pages: m.zero,
        disk_blocks: blk,
        data_chunks: data,
        bytes: s.writer.bytes() - b0,
        ms: ms_since(t),
        dirty_rate,
        throttle: vm.throttle(),
        ack,
    })
}

/// Pauses the guest, saves its state and resumes it (when it ran), three
/// times 5 ms apart: the median cost of the pause window's first parts on
/// this host now (pause, state with disks flushed) and the state's size.
fn probe(vm: &mut dyn Migratable, was_running: bool) -> Result<(f64, f64, u64)> {
    let (mut pauses, mut states, mut size) = (Vec::new(), Vec::new(), 0);
    for i in 0..3 {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let t = Instant::now();
        vm.pause().map_err(|e| anyhow!("pausing the guest: {e}"))?;
        pauses.push(ms_since(t));
        let t = Instant::now();
        let state = vm
            .save_state()
            .map_err(|e| anyhow!("saving the vCPU and device state: {e}"))?;
        states.push(ms_since(t));
        size = state.len() as u64;
        if was_running {
            vm.resume()
                .map_err(|e| anyhow!("resuming the guest: {e}"))?;
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    Ok((median(pauses), median(states), size))
}

fn precopy_and_switch(
    vm: &mut dyn Migratable,
    p: &Params,
    s: &mut Session<'_, '_>,
    t0: Instant,
    was_running: bool,
    committed: &mut bool,
) -> Result<Value> {
    let disks: Vec<File> = vm
        .disk_paths()
        .iter()
        .map(|d| {
            kimberley_formats::fsutil::open_regular(d, false)
                .with_context(|| format!("opening {}", d.display()))
        })
        .collect::<Result<_>>()?;
    let disk_sizes: Vec<u64> = disks
        .iter()
        .map(|f| f.metadata().map(|m| m.len()))
        .collect::<std::io::Result<_>>()
        .context("stat of a disk")?;
    let infos = disk_sizes
        .iter()
        .zip(vm.disk_paths())
        .map(|(&size, path)| disk_info(&path, size, p.shared_disk))
        .collect::<Result<Vec<_>>>()?;
    s.send_msg(Message::Start(Start {
        memory_size: vm.memory_size(),
        vcpus: vm.vcpus(),
        shared_disk: p.shared_disk,
        stream: false,
        disks: infos,
    }))?;
    let (pause_ms, state_ms, state_bytes) = probe(vm, was_running)?;
    let mut meter = Meter {
        costs: Costs {
            pause_ms,
            state_ms,
            state_bytes,
            rtt_ms: s.rtt_ms,
            ..Costs::default()
        },
        cap_bps: p.max_bandwidth.map(|b| b as f64),
        cpu_chunk_ms: 0.0,
    };
    let npages = vm.memory_size() / CHUNK as u64;
    // Round 0: everything populated. Logging starts first, so whatever the
    // guest writes while round 0 reads is sent again in round 1.
    vm.set_dirty_logging(true).map_err(|e| anyhow!("{e}"))?;
    for i in 0..disks.len() {
        vm.dirty_disk_blocks(i).map_err(|e| anyhow!("{e}"))?;
    }
    let mut last_fetch = Instant::now();
    let all: Vec<u64> = (0..npages).collect();
    let blocks0: Vec<Vec<u64>> = if p.shared_disk {
        vec![Vec::new(); disks.len()]
    } else {
        disks
            .iter()
            .zip(&disk_sizes)
            .map(|(f, &sz)| disk_chunks(f, sz))
            .collect()
    };
    let r0 = send_round(
        vm,
        s,
        &disks,
        p.shared_disk,
        &all,
        &blocks0,
        true,
        0.0,
        false,
    )?;
    // The first ROUND_ACK's wait is the best round-trip figure we have
    // for a loaded receiver; the handshake's is a floor.
    meter.after_round(&r0, true);
    s.io.progress(json!({"round_done": r0.json(0)}));
    let mut rounds = vec![r0];
    let limits = Limits {
        downtime_ms: p.downtime_ms as f64,
        max_rounds: p.max_rounds,
    };
    let mut throttle = 0u32;
    let mut throttled = false;
    loop {
        let t_fetch = Instant::now();
        let (dirty, dblocks) = fetch_dirty(vm, disks.len())?;
        meter.costs.fetch_ms = ms_since(t_fetch);
        let since = last_fetch.elapsed().as_secs_f64().max(1e-6);
        last_fetch = Instant::now();
        let copied: u64 = if p.shared_disk {
            0
        } else {
            dblocks.iter().map(|b| b.len() as u64).sum()
        };
        let dirty_n = dirty.len() as u64 + copied;
        let all_dirty = dirty_n + dblocks.iter().map(|b| b.len() as u64).sum::<u64>() - copied;
        let touched = policy::touched_blocks(&dirty, CHUNKS_PER_BLOCK)
            + dblocks
                .iter()
                .map(|b| policy::touched_blocks(b, CHUNKS_PER_BLOCK))
                .sum::<u64>();
        let dirty_rate = (all_dirty * CHUNK as u64) as f64 / since;
        let last = rounds.last().expect("round 0");
        let carry_rate = if last.ms > 0.0 {
            ((last.pages + last.disk_blocks) * CHUNK as u64) as f64 / (last.ms / 1000.0)
        } else {
            f64::INFINITY
        };
        let obs = Observation {
            round: s.round,
            dirty_chunks: dirty_n,
            touched_blocks: touched,
            dirty_rate,
            carry_rate,
            prev_dirty_rate: last.dirty_rate,
            throttle,
        };
        let (d, est) = policy::decide(&limits, &meter.costs, &obs);
        match d {
            Decision::Stop(reason) => {
                s.round += 1;
                return stop_and_copy(
                    vm,
                    p,
                    s,
                    &disks,
                    (dirty, dblocks),
                    rounds,
                    t0,
                    throttled,
                    reason,
                    (meter.costs, est),
                    committed,
                );
            }
            Decision::Continue { throttle: t } => {
                if t != throttle {
                    throttle = t;
                    vm.set_throttle(t);
                    throttled = true;
                    s.io.progress(json!({"throttle": t}));
                }
            }
        }
        s.round += 1;
        let r = send_round(
            vm,
            s,
            &disks,
            p.shared_disk,
            &dirty,
            &dblocks,
            false,
            dirty_rate,
            false,
        )?;
        meter.after_round(&r, false);
        s.io.progress(json!({"round_done": r.json(s.round)}));
        rounds.push(r);
    }
}

#[allow(clippy::too_many_arguments)]
fn stop_and_copy(
    vm: &mut dyn Migratable,
    p: &Params,
    s: &mut Session<'_, '_>,
    disks: &[File],
    pending: (Vec<u64>, Vec<Vec<u64>>),
    rounds: Vec<Round>,
    t0: Instant,
    throttled: bool,
    reason: StopReason,
    (costs, est): (Costs, Estimate),
    committed: &mut bool,
) -> Result<Value> {
    s.io.progress(json!({"stop_and_copy": reason.as_str()}));
    let t_pause = Instant::now();
    vm.pause().map_err(|e| anyhow!("pausing the guest: {e}"))?;
    let pause_ms = ms_since(t_pause);
    let t = Instant::now();
    let state = vm
        .save_state()
        .map_err(|e| anyhow!("saving the vCPU and device state: {e}"))?;
    let state_ms = ms_since(t);
    // Taking the state can write guest memory (completing in-flight I/O):
    // fetch the dirty log after it, and send the union with what was
    // pending.
    let t = Instant::now();
    let (more, more_blocks) = fetch_dirty(vm, disks.len())?;
    let fetch_ms = ms_since(t);
    let (mut pages, pre_blocks) = pending;
    pages.extend(more);
    pages.sort_unstable();
    pages.dedup();
    let blocks: Vec<Vec<u64>> = pre_blocks
        .into_iter()
        .zip(more_blocks)
        .map(|(mut a, b)| {
            a.extend(b);
            a.sort_unstable();
            a.dedup();
            a
        })
        .collect();
    let t = Instant::now();
    let fin = send_round(
        vm,
        s,
        disks,
        p.shared_disk,
        &pages,
        &blocks,
        false,
        0.0,
        true,
    )?;
    s.writer.flush()?;
    let final_ms = ms_since(t);
    let t = Instant::now();
    let state_len = state.len();
    s.send_msg(Message::State(state))?;
    s.check()?;
    s.send_msg(Message::Commit)?;
    // The writer stops at its first failed write, so a failed flush means
    // COMMIT never left whole: nothing was handed over yet.
    s.writer.flush()?;
    // From here the receiver may run the guest: no cancel, no resume here
    // unless it says ERROR or answers a QUERY with "aborted".
    *committed = true;
    let state_send_ms = ms_since(t);
    let (downtime, parts, wire_bytes, running, t_running) = s.hand_over(
        t_pause,
        &SourceParts {
            pause_ms,
            state_ms,
            dirty_fetch_ms: fetch_ms,
            final_pages_ms: final_ms,
            state_send_ms,
        },
    )?;
    let mut per_round: Vec<Value> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| r.json(i as u32))
        .collect();
    per_round.push(fin.json(s.round));
    Ok(json!({
        "to": p.to,
        "total_ms": r3(t_running.duration_since(t0).as_secs_f64() * 1000.0),
        "downtime_ms": r3(downtime),
        "downtime_target_ms": p.downtime_ms,
        "downtime_parts": parts,
        "downtime_estimate": {
            "source_ms": r3(est.source_ms),
            "final_pages_ms": r3(est.final_chunks_ms),
            "state_send_ms": r3(est.state_send_ms),
            "receiver_hash_ms": r3(est.hash_ms),
            "receiver_ms": r3(est.receiver_ms),
            "round_trip_ms": r3(est.rtt_ms),
            "total_ms": r3(est.total_ms),
        },
        "measured_costs": costs,
        "bytes_on_wire": wire_bytes,
        "rounds": per_round.len(),
        "stop_reason": reason.as_str(),
        "throttled": throttled,
        "max_throttle_pct": rounds.iter().map(|r| r.throttle).chain([fin.throttle]).max().unwrap_or(0),
        "state_bytes": state_len,
        "final_pages": fin.pages,
        "final_digest_blocks": running.blocks_hashed,
        "per_round": per_round,
    }))
}

/// The control socket's `migrate` hook.
pub fn handler() -> kimberley_machine::MigrateFn {
    Box::new(
        |m: &mut dyn Machine, params: &Value, io: &mut MigrateIo<'_>| {
            let backend = m.info().backend;
            let p =
                Params::from_json(params).map_err(|e| MigrateError::Failed(format!("{e:#}")))?;
            let was_running = !m.is_paused();
            let r = if let Some(vm) = m.stream_migratable() {
                let r = crate::stream_source::migrate(vm, &p, io);
                // Its guest runs here again unless the hand-over is done
                // or in doubt.
                match r {
                    Err(Failure::Kept(e)) if was_running && m.is_paused() => match m.resume() {
                        Ok(()) => Err(Failure::Kept(e)),
                        Err(re) => Err(Failure::Kept(anyhow!(
                            "{e:#}; and the guest could not be resumed: {re}"
                        ))),
                    },
                    r => r,
                }
            } else {
                let vm = m.migratable().ok_or_else(|| {
                    MigrateError::Failed(format!(
                        "live migration of {backend} VMs is not supported"
                    ))
                })?;
                migrate(vm, &p, io)
            };
            r.map_err(|f| match f {
                Failure::Kept(e) => MigrateError::Failed(format!("{e:#}")),
                Failure::InDoubt(e) => MigrateError::InDoubt(format!("{e:#}")),
            })
        },
    )
}

/// START's entry for a disk of `size` bytes at `path`: only a shared disk
/// is named (the receiver opens the same file, by its canonical path).
pub(crate) fn disk_info(path: &std::path::Path, size: u64, shared: bool) -> Result<DiskInfo> {
    let path = if shared {
        std::fs::canonicalize(path)
            .context("resolving a shared disk's path")?
            .to_str()
            .ok_or_else(|| anyhow!("a shared disk's path is not UTF-8"))?
            .to_string()
    } else {
        String::new()
    };
    Ok(DiskInfo { size, path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_receiver_answers_longer_than_a_sender_asks() {
        // A sender in doubt asks until RUNNING_WAIT + RESOLVE_FOR after its
        // COMMIT; a receiver that took COMMIT answers until QUERY_WINDOW
        // after its session ended (at DONE_WAIT after RUNNING at the
        // latest), so a refused connection within the sender's window
        // can only mean the receiver's process is gone.
        assert!(RUNNING_WAIT + RESOLVE_FOR < crate::dest::QUERY_WINDOW);
    }
}
