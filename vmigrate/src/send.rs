//! The sending side, run inside the process that runs the VM (`vmigrate
//! run`, `vmigrate recv`) as the control socket's `migrate` handler:
//! pre-copy rounds over the dirty log, auto-converge, stop-and-copy, and
//! the hand-over that leaves exactly one running copy.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kimberley_vmm::{Bitmap, MigrateIo, Vm};
use rayon::prelude::*;
use serde_json::{json, Value};

use crate::chunks::{self, BATCH, CHUNK};
use crate::wire::{self, msg, seal_at, Frame, Rx, Tx};

/// What `vmigrate send` asks for (the `params` of the migrate request).
#[derive(Debug, Clone)]
pub struct Params {
    /// Receiver address (host:port).
    pub to: String,
    /// Key file (absolute path).
    pub key_file: PathBuf,
    /// Downtime target.
    pub downtime: Duration,
    /// Cap on bytes per second on the wire.
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds after round 0.
    pub max_rounds: u32,
    /// Limit for the whole migration.
    pub timeout: Duration,
    /// Disks are on storage both hosts share: do not copy them.
    pub shared_disk: bool,
}

impl Params {
    /// To the request's JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "to": self.to,
            "key_file": self.key_file,
            "downtime_ms": self.downtime.as_millis() as u64,
            "max_bandwidth": self.max_bandwidth,
            "max_rounds": self.max_rounds,
            "timeout_ms": self.timeout.as_millis() as u64,
            "shared_disk": self.shared_disk,
        })
    }

    /// From the request's JSON.
    pub fn from_json(v: &Value) -> Result<Params> {
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let u = |k: &str| v.get(k).and_then(Value::as_u64);
        Ok(Params {
            to: s("to").ok_or_else(|| anyhow!("migrate: no \"to\""))?,
            key_file: s("key_file")
                .ok_or_else(|| anyhow!("migrate: no \"key_file\""))?
                .into(),
            downtime: Duration::from_millis(u("downtime_ms").unwrap_or(50)),
            max_bandwidth: u("max_bandwidth"),
            max_rounds: u("max_rounds").unwrap_or(30) as u32,
            timeout: Duration::from_millis(u("timeout_ms").unwrap_or(600_000)),
            shared_disk: v
                .get("shared_disk")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        })
    }
}

/// The control socket handler: migrates `vm` as `params` say. On success
/// the guest runs on the receiver and the result holds the statistics; on
/// failure the guest runs here as before.
pub fn handler() -> kimberley_vmm::MigrateFn {
    Box::new(|vm, params, io| {
        let p = Params::from_json(params).map_err(|e| format!("{e:#}"))?;
        migrate(vm, &p, io).map_err(|e| format!("{e:#}"))
    })
}

enum Item {
    Frames(Vec<Frame>),
    Flush(SyncSender<()>),
}

/// Writes frames on its own thread (so compression overlaps the network),
/// with an optional bandwidth cap.
struct Writer {
    tx: Option<SyncSender<Item>>,
    thread: Option<JoinHandle<()>>,
    bytes: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
}

impl Writer {
    fn start(mut out: std::net::TcpStream, max_bw: Option<u64>) -> Writer {
        let (tx, rx): (SyncSender<Item>, Receiver<Item>) = sync_channel(4);
        let bytes = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let (b, e) = (bytes.clone(), error.clone());
        let thread = std::thread::spawn(move || {
            // Token bucket: `next` is when the link is free again; at most
            // 20 ms of unused capacity carries over.
            let mut next = Instant::now();
            for item in rx {
                match item {
                    Item::Frames(fs) => {
                        for f in fs {
                            if let Err(err) = std::io::Write::write_all(&mut out, &f) {
                                *e.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(format!("the connection failed: {err}"));
                                return;
                            }
                            b.fetch_add(f.len() as u64, Ordering::SeqCst);
                            if let Some(bw) = max_bw {
                                let now = Instant::now();
                                let floor =
                                    now.checked_sub(Duration::from_millis(20)).unwrap_or(now);
                                next = next.max(floor)
                                    + Duration::from_secs_f64(f.len() as f64 / bw as f64);
                                if next > now {
                                    std::thread::sleep(next - now);
                                }
                            }
                        }
                    }
                    Item::Flush(ack) => {
                        let _ = ack.send(());
                    }
                }
            }
        });
        Writer {
            tx: Some(tx),
            thread: Some(thread),
            bytes,
            error,
        }
    }

    fn check(&self) -> Result<()> {
        if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            bail!("sending to the receiver failed: {e}");
        }
        Ok(())
    }

    fn push(&self, frames: Vec<Frame>) -> Result<()> {
        self.check()?;
        let tx = self.tx.as_ref().expect("writer open");
        if tx.send(Item::Frames(frames)).is_err() {
            self.check()?;
            bail!("sending to the receiver failed");
        }
        Ok(())
    }

    /// Waits until everything queued is written.
    fn flush(&self) -> Result<()> {
        let (a, r) = sync_channel(1);
        let tx = self.tx.as_ref().expect("writer open");
        if tx.send(Item::Frames(Vec::new())).is_err() || tx.send(Item::Flush(a)).is_err() {
            self.check()?;
            bail!("sending to the receiver failed");
        }
        if r.recv().is_err() {
            self.check()?;
            bail!("sending to the receiver failed");
        }
        self.check()
    }

    fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counters of one round.
#[derive(Default, Debug, Clone)]
struct Round {
    pages: u64,
    zero_pages: u64,
    disk_blocks: u64,
    bytes: u64,
    ms: f64,
    dirty_rate: f64,
    throttle: u32,
}

/// Where chunks come from.
enum Source<'a> {
    Memory(&'a kimberley_vmm::vstate::memory::Memory),
    Disk(&'a File),
}

impl Source<'_> {
    fn read(&self, idx: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Source::Memory(m) => m
                .read(idx * CHUNK as u64, buf)
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

struct Session<'a, 'b> {
    tx: Tx,
    rx: Rx,
    writer: Writer,
    io: &'a mut MigrateIo<'b>,
    deadline: Instant,
    round: u32,
}

/// A compressed batch (None if nothing to send), its data and zero chunk counts.
type Batch = (Option<Vec<u8>>, u64, u64);

/// Batches processed (compressed and sealed in parallel) at a time.
const WINDOW: usize = 32;

impl Session<'_, '_> {
    fn check(&mut self) -> Result<()> {
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
    /// starts from zeros). Returns (data chunks, zero chunks sent or skipped).
    fn send_chunks(
        &mut self,
        src: &Source<'_>,
        target: u32,
        indices: &[u64],
        skip_zero: bool,
        progress: &mut dyn FnMut(&mut MigrateIo<'_>, u64),
    ) -> Result<(u64, u64)> {
        let (mut data, mut zero) = (0u64, 0u64);
        for window in indices.chunks(BATCH * WINDOW) {
            self.check()?;
            let bodies: Vec<Result<Batch>> = window
                .par_chunks(BATCH)
                .map(|batch| {
                    let mut buf = vec![0u8; batch.len() * CHUNK];
                    let mut list: Vec<(u64, Option<&[u8]>)> = Vec::with_capacity(batch.len());
                    for (k, &i) in batch.iter().enumerate() {
                        src.read(i, &mut buf[k * CHUNK..(k + 1) * CHUNK])?;
                    }
                    let (mut d, mut z) = (0, 0);
                    for (k, &i) in batch.iter().enumerate() {
                        let b = &buf[k * CHUNK..(k + 1) * CHUNK];
                        if chunks::is_zero(b) {
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
                data += d;
                zero += z;
                if let Some(body) = body {
                    plain.push(body);
                }
            }
            let base = self.tx.reserve(plain.len() as u64);
            let sealer = self.tx.sealer().clone();
            let frames: Vec<Frame> = plain
                .into_par_iter()
                .enumerate()
                .map(|(k, body)| seal_at(&sealer, base + k as u64, msg::CHUNKS, body))
                .collect();
            self.writer.push(frames)?;
            progress(self.io, window.len() as u64);
        }
        Ok((data, zero))
    }

    /// Waits for the receiver's next message, watching for a cancel. An
    /// ERROR from the receiver becomes an error.
    fn wait_msg(&mut self, limit: Duration) -> Result<(u8, Vec<u8>)> {
        let t0 = Instant::now();
        loop {
            self.check()?;
            let mut fd = libc::pollfd {
                fd: self.rx.stream().as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            let n = unsafe { libc::poll(&mut fd, 1, 20) };
            if n > 0 {
                let (t, body) = self.rx.recv()?;
                if t == msg::ERROR {
                    bail!("the receiver failed: {}", String::from_utf8_lossy(&body));
                }
                return Ok((t, body));
            }
            if t0.elapsed() > limit {
                bail!("the receiver did not answer within {} s", limit.as_secs());
            }
        }
    }

    fn send_msg(&mut self, t: u8, body: Vec<u8>) -> Result<()> {
        let c = self.tx.reserve(1);
        let f = seal_at(self.tx.sealer(), c, t, body);
        self.writer.push(vec![f])
    }
}

fn disk_extents(f: &File, size: u64) -> Vec<u64> {
    // Data extents via SEEK_DATA/SEEK_HOLE; every block if unsupported.
    let fd = f.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let size = size as i64;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break;
            }
            return (0..(size as u64).div_ceil(CHUNK as u64)).collect();
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { hole.min(size) };
        let first = data as u64 / CHUNK as u64;
        let last = (hole as u64).div_ceil(CHUNK as u64);
        out.extend(first..last);
        pos = hole;
    }
    out.dedup();
    out
}

/// Migrates `vm` (see [`handler`]).
pub fn migrate(vm: &mut Vm, p: &Params, io: &mut MigrateIo<'_>) -> Result<Value> {
    let t0 = Instant::now();
    let was_running = !vm.is_paused();
    let key = wire::read_key(&p.key_file)?;
    let addr = std::net::ToSocketAddrs::to_socket_addrs(&p.to)
        .with_context(|| format!("resolving {}", p.to))?
        .next()
        .ok_or_else(|| anyhow!("{} resolves to no address", p.to))?;
    let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connecting to {}", p.to))?;
    stream.set_read_timeout(Some(Duration::from_secs(30))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(60))).ok();
    let (tx, rx) = wire::handshake_sender(stream, &key)?;
    let disks: Vec<File> = vm
        .disk_paths()
        .iter()
        .map(|d| File::open(d).with_context(|| format!("opening {}", d.display())))
        .collect::<Result<_>>()?;
    let disk_sizes: Vec<u64> = disks
        .iter()
        .map(|f| f.metadata().map(|m| m.len()))
        .collect::<std::io::Result<_>>()
        .context("stat of a disk")?;
    let mut start = Vec::new();
    start.extend_from_slice(&vm.memory_size().to_le_bytes());
    start.extend_from_slice(&u32::from(vm.vcpus()).to_le_bytes());
    start.extend_from_slice(&(disks.len() as u32).to_le_bytes());
    start.push(u8::from(p.shared_disk));
    start.extend_from_slice(&[0; 3]);
    for (i, s) in disk_sizes.iter().enumerate() {
        start.extend_from_slice(&s.to_le_bytes());
        let path = if p.shared_disk {
            std::fs::canonicalize(&vm.disk_paths()[i])
                .context("resolving a shared disk's path")?
                .to_string_lossy()
                .into_owned()
        } else {
            String::new()
        };
        start.extend_from_slice(&(path.len() as u32).to_le_bytes());
        start.extend_from_slice(path.as_bytes());
    }
    let mut tx = tx;
    let c = tx.reserve(1);
    let first = seal_at(tx.sealer(), c, msg::START, start);
    let writer = Writer::start(
        // The writer thread owns a clone of the sending half.
        tx.stream().try_clone().context("duplicating the socket")?,
        p.max_bandwidth,
    );
    let mut s = Session {
        tx,
        rx,
        writer,
        io,
        deadline: t0 + p.timeout,
        round: 0,
    };
    s.writer.push(vec![first])?;
    let r = precopy_and_switch(vm, p, &mut s, &disks, &disk_sizes, t0);
    match r {
        Ok(v) => Ok(v),
        Err(e) => {
            // Tell the receiver to discard (best effort), then make sure the
            // guest runs here as before.
            let _ = s.send_msg(msg::ABORT, Vec::new());
            let _ = s.writer.flush();
            let _ = s.tx.stream().shutdown(std::net::Shutdown::Both);
            // Unthrottled before it resumes; dirty-log teardown after.
            vm.set_throttle(0);
            if was_running && vm.is_paused() {
                vm.resume()
                    .map_err(|re| anyhow!("{e:#}; and the guest could not be resumed: {re}"))?;
            }
            let _ = vm.set_dirty_logging(false);
            Err(e)
        }
    }
}

fn round_json(r: &Round, n: u32) -> Value {
    json!({
        "round": n,
        "pages": r.pages,
        "zero_pages": r.zero_pages,
        "disk_blocks": r.disk_blocks,
        "bytes": r.bytes,
        "ms": (r.ms * 1000.0).round() / 1000.0,
        "dirty_rate": r.dirty_rate.round() as u64,
        "throttle": r.throttle,
    })
}

#[allow(clippy::too_many_arguments)]
fn send_round(
    vm: &Vm,
    s: &mut Session<'_, '_>,
    disks: &[File],
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
    let mem = Source::Memory(vm.memory());
    let (d, z) = s.send_chunks(&mem, 0, pages, skip_zero, &mut progress)?;
    let mut blk = 0;
    for (i, b) in blocks.iter().enumerate() {
        let (bd, bz) = s.send_chunks(
            &Source::Disk(&disks[i]),
            1 + i as u32,
            b,
            skip_zero,
            &mut progress,
        )?;
        blk += bd + bz;
    }
    if !final_round {
        // The round ends when the receiver has written it: its bandwidth
        // is what the whole pipeline carries.
        s.send_msg(msg::ROUND_END, n.to_le_bytes().to_vec())?;
        s.writer.flush()?;
        let (t, body) = s.wait_msg(Duration::from_secs(60))?;
        if t != msg::ROUND_ACK || body != n.to_le_bytes() {
            bail!("protocol error: {} instead of ROUND_ACK {n}", msg::name(t));
        }
    }
    Ok(Round {
        pages: d + z,
        zero_pages: z,
        disk_blocks: blk,
        bytes: s.writer.bytes() - b0,
        ms: t.elapsed().as_secs_f64() * 1000.0,
        dirty_rate,
        throttle: vm.throttle(),
    })
}

fn precopy_and_switch(
    vm: &mut Vm,
    p: &Params,
    s: &mut Session<'_, '_>,
    disks: &[File],
    disk_sizes: &[u64],
    t0: Instant,
) -> Result<Value> {
    let npages = vm.memory_size() / CHUNK as u64;
    let copy_disks = !p.shared_disk;
    // Round 0: everything populated. Logging starts first, so whatever the
    // guest writes while round 0 reads is sent again in round 1.
    vm.set_dirty_logging(true).map_err(|e| anyhow!("{e}"))?;
    for i in 0..disks.len() {
        vm.dirty_disk_blocks(i).map_err(|e| anyhow!("{e}"))?;
    }
    let mut last_fetch = Instant::now();
    let all: Vec<u64> = (0..npages).collect();
    let blocks0: Vec<Vec<u64>> = if copy_disks {
        disks
            .iter()
            .zip(disk_sizes)
            .map(|(f, &sz)| disk_extents(f, sz))
            .collect()
    } else {
        vec![Vec::new(); disks.len()]
    };
    let mut rounds = vec![send_round(vm, s, disks, &all, &blocks0, true, 0.0, false)?];
    report_round(s, &rounds[0], 0);
    let mut throttle = 0u32;
    let mut throttled = false;
    let reason;
    loop {
        let (dirty, dblocks) = fetch_dirty(vm, disks.len(), copy_disks)?;
        let since = last_fetch.elapsed().as_secs_f64().max(1e-6);
        last_fetch = Instant::now();
        let dirty_n = dirty.len() as u64 + dblocks.iter().map(|b| b.len() as u64).sum::<u64>();
        let dirty_bytes = (dirty_n * CHUNK as u64) as f64;
        let dirty_rate = dirty_bytes / since;
        let last = rounds.last().expect("round 0");
        // Bandwidth of the last round, in chunk bytes per second (what a
        // dirty byte costs to send, compression included).
        let sent = ((last.pages + last.disk_blocks) * CHUNK as u64) as f64;
        let bw = if last.ms > 0.0 && sent > 0.0 {
            sent / (last.ms / 1000.0)
        } else {
            f64::INFINITY
        };
        let eta = dirty_bytes / bw;
        if eta <= p.downtime.as_secs_f64() {
            reason = "converged";
            s.round += 1;
            break stop_and_copy(
                vm, p, s, disks, dirty, dblocks, rounds, t0, throttled, reason,
            );
        }
        if s.round >= p.max_rounds {
            reason = "round limit";
            s.round += 1;
            break stop_and_copy(
                vm, p, s, disks, dirty, dblocks, rounds, t0, throttled, reason,
            );
        }
        // Auto-converge: a round that dirtied more than half of what the
        // link carried raises the throttle by at least a step (QEMU: 20%,
        // then +10%), and at once to what would bring the guest's own
        // (unthrottled) rate down to half the link when that is more.
        // Rounds last seconds on slow links, so waiting for two in a row
        // (as QEMU does per 1 s period) would take too long.
        let high = dirty_rate > 0.5 * bw;
        let prev_rate = last.dirty_rate;
        if high && throttle < 99 {
            let guest_rate = dirty_rate / (1.0 - f64::from(throttle) / 100.0);
            let needed = (100.0 * (1.0 - 0.5 * bw / guest_rate))
                .ceil()
                .clamp(0.0, 99.0) as u32;
            let step = if throttle == 0 { 20 } else { throttle + 10 };
            throttle = step.max(needed).min(99);
            vm.set_throttle(throttle);
            throttled = true;
            s.io.progress(json!({"throttle": throttle}));
        } else if throttle == 0
            && s.round >= 2
            && prev_rate > 0.0
            && dirty_rate >= prev_rate * 0.95
            && !high
        {
            // Dirtying stopped falling and the link keeps up: more rounds
            // would not shrink the final copy.
            reason = "dirty rate stopped falling";
            s.round += 1;
            break stop_and_copy(
                vm, p, s, disks, dirty, dblocks, rounds, t0, throttled, reason,
            );
        }
        s.round += 1;
        let r = send_round(vm, s, disks, &dirty, &dblocks, false, dirty_rate, false)?;
        report_round(s, &r, s.round);
        rounds.push(r);
    }
}

fn fetch_dirty(vm: &mut Vm, ndisks: usize, copy_disks: bool) -> Result<(Vec<u64>, Vec<Vec<u64>>)> {
    let bm: Bitmap = vm.dirty_pages().map_err(|e| anyhow!("{e}"))?;
    let pages = bm.iter_set().map(|i| i as u64).collect();
    let mut blocks = Vec::new();
    for i in 0..ndisks {
        let b = vm.dirty_disk_blocks(i).map_err(|e| anyhow!("{e}"))?;
        blocks.push(if copy_disks {
            b.iter_set().map(|i| i as u64).collect()
        } else {
            Vec::new()
        });
    }
    Ok((pages, blocks))
}

fn report_round(s: &mut Session<'_, '_>, r: &Round, n: u32) {
    s.io.progress(json!({"round_done": round_json(r, n)}));
}

#[allow(clippy::too_many_arguments)]
fn stop_and_copy(
    vm: &mut Vm,
    p: &Params,
    s: &mut Session<'_, '_>,
    disks: &[File],
    _pre_dirty: Vec<u64>,
    _pre_blocks: Vec<Vec<u64>>,
    rounds: Vec<Round>,
    t0: Instant,
    throttled: bool,
    reason: &str,
) -> Result<Value> {
    // The dirty set just fetched is sent with the guest paused, together
    // with whatever it dirtied since: re-fetching after the pause gives the
    // rest, so send both.
    s.io.progress(json!({"stop_and_copy": reason}));
    let t_pause = Instant::now();
    vm.pause().map_err(|e| anyhow!("pausing the guest: {e}"))?;
    let pause_ms = ms(t_pause);
    let t = Instant::now();
    let state = vm
        .save_state()
        .map_err(|e| anyhow!("saving the vCPU and device state: {e}"))?;
    let state_ms = ms(t);
    let t = Instant::now();
    // Taking the state can write guest memory (completing in-flight I/O):
    // fetch the dirty log after it.
    let (more, more_blocks) = fetch_dirty(vm, disks.len(), !p.shared_disk)?;
    let mut pages: Vec<u64> = _pre_dirty;
    pages.extend(more);
    pages.sort_unstable();
    pages.dedup();
    let blocks: Vec<Vec<u64>> = _pre_blocks
        .into_iter()
        .zip(more_blocks)
        .map(|(mut a, b)| {
            a.extend(b);
            a.sort_unstable();
            a.dedup();
            a
        })
        .collect();
    let fin = send_round(vm, s, disks, &pages, &blocks, false, 0.0, true)?;
    let final_ms = ms(t);
    let t = Instant::now();
    let state_len = state.len();
    s.send_msg(msg::STATE, state)?;
    s.send_msg(msg::COMMIT, Vec::new())?;
    s.writer.flush()?;
    let commit_ms = ms(t);
    // Wait for the receiver to run the guest, watching for a cancel.
    let (t, body) = s
        .wait_msg(Duration::from_secs(60))
        .context("waiting for the receiver to start the guest")?;
    let t_running = Instant::now();
    if t != msg::RUNNING {
        bail!("protocol error: {} while waiting for RUNNING", msg::name(t));
    }
    let mut c = wire::Cursor::new(&body, "RUNNING");
    let restore_us = c.u64()?;
    let delay_us = c.u64()?;
    c.finish()?;
    // From here on the guest runs on the receiver: this side never resumes
    // it again, whatever happens.
    let _ = s.send_msg(msg::DONE, Vec::new());
    let _ = s.writer.flush();
    let wire_bytes = s.writer.bytes();
    let total_pause = t_running.duration_since(t_pause).as_secs_f64() * 1000.0;
    let downtime = (total_pause - delay_us as f64 / 1000.0).max(0.0);
    let restore_ms = restore_us as f64 / 1000.0;
    let accounted = pause_ms + state_ms + final_ms + commit_ms + restore_ms;
    let mut per_round: Vec<Value> = rounds
        .iter()
        .enumerate()
        .map(|(i, r)| round_json(r, i as u32))
        .collect();
    per_round.push(round_json(&fin, s.round));
    let r3 = |x: f64| (x * 1000.0).round() / 1000.0;
    Ok(json!({
        "to": p.to,
        "total_ms": r3(t0.elapsed().as_secs_f64() * 1000.0),
        "downtime_ms": r3(downtime),
        "downtime_parts": {
            "pause_ms": r3(pause_ms),
            "state_ms": r3(state_ms),
            "final_pages_ms": r3(final_ms),
            "state_send_ms": r3(commit_ms),
            "restore_ms": r3(restore_ms),
            "network_ms": r3((downtime - accounted).max(0.0)),
        },
        "bytes_on_wire": wire_bytes,
        "rounds": per_round.len(),
        "stop_reason": reason,
        "throttled": throttled,
        "max_throttle_pct": rounds.iter().map(|r| r.throttle).chain([fin.throttle]).max().unwrap_or(0),
        "state_bytes": state_len,
        "final_pages": fin.pages,
        "per_round": per_round,
    }))
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}
