//! The sending side for a machine whose hypervisor streams it (QEMU): the
//! boot files as round 0, then the hypervisor's own live-migration stream
//! (its pre-copy, auto-converge and switch-over), compressed and sealed
//! into STREAM messages, then the same hand-over as the microVM's.

use std::io::Read;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{anyhow, bail, Context, Result};
use kimberley_formats::sys::poll;
use kimberley_machine::{StreamLimits, StreamMigratable, StreamPhase, StreamStatus};
use serde_json::{json, Value};

use crate::channel::{Rx, Tx};
use crate::disk_refs::DiskIndex;
use crate::params::Params;
use crate::protocol::{
    MachineMsg, Message, Start, StreamRefs, MAX_STREAM_CHUNK, REF_PAGE, SUM_LEN,
};
use crate::source::{
    connect, disk_chunks, ms_since, r3, resolve, Failure, ReceiverError, Resolution, Session,
    Source, SourceParts,
};
use crate::stream_pages::{self, PageFinder};
use crate::writer::Writer;

/// zstd level of STREAM and STREAM_REFS messages (3 rather than 1: 0.9 MB
/// fewer of the benchmark's 62 MB, and the pump keeps up with the link).
const LEVEL: i32 = 3;
/// How long to wait for more stream bytes before sending what was read.
const GATHER: Duration = Duration::from_millis(2);
/// The most of the stream one STREAM message carries (at most
/// [`MAX_STREAM_CHUNK`]). Small enough that what waits for the wire (the
/// writer's queue holds 4 messages) drains quickly when QEMU pauses the
/// guest: QEMU measures its bandwidth by how fast this queue takes its
/// stream, and decides the switch-over by it.
const PIECE: usize = 128 << 10;
/// The link's reserve in the first pass ([`reserve`]): ~0.33 s of a
/// 100 Mbit/s link.
const RESERVE: u64 = 4 << 20;
/// Memory left in the first pass below which the reserve is not kept.
const RESERVE_UNTIL: u64 = 64 << 20;
/// How often the hypervisor's progress is asked while the stream flows.
const STATUS_EVERY: Duration = Duration::from_millis(20);
/// How long the hypervisor may take to report completion after the
/// stream's end.
const COMPLETION_WAIT: Duration = Duration::from_secs(30);

/// One round as the hypervisor reports it (between dirty-log syncs).
#[derive(Debug, Clone, Default)]
struct Round {
    pages: u64,
    zero_pages: u64,
    bytes: u64,
    ms: f64,
    dirty_rate: u64,
    throttle: u32,
}

impl Round {
    fn json(&self, n: usize) -> Value {
        json!({
            "round": n,
            "pages": self.pages,
            "zero_pages": self.zero_pages,
            "disk_blocks": 0,
            "bytes": self.bytes,
            "ms": r3(self.ms),
            "dirty_rate": self.dirty_rate,
            "throttle": self.throttle,
        })
    }
}

/// Migrates `vm` through its hypervisor's stream. `was_running`: the
/// guest ran when the request came. On [`Failure::Kept`] the hypervisor's
/// migration is cancelled and its settings are back (the caller resumes
/// the guest if it is paused and ran before); on [`Failure::InDoubt`] the
/// guest is paused and must be suspended, not resumed.
pub fn migrate(
    vm: &mut dyn StreamMigratable,
    p: &Params,
    io: &mut kimberley_machine::MigrateIo<'_>,
) -> Result<Value, Failure> {
    let t0 = Instant::now();
    let mut s = connect(p, io).map_err(Failure::Kept)?;
    let (mut started, mut committed) = (false, false);
    let r = stream_and_switch(vm, p, &mut s, t0, &mut started, &mut committed);
    let e = match r {
        Ok(v) => {
            let _ = vm.end_stream();
            return Ok(v);
        }
        Err(e) => e,
    };
    let whole = s.writer.cancel();
    if !committed && whole {
        let _ = s.send_msg(Message::Abort);
        let _ = s.writer.flush();
    }
    let _ = s.tx.stream().shutdown(std::net::Shutdown::Both);
    if started {
        // A migration that has not completed is cancelled (QEMU restarts
        // the guest if it ran); one that completed leaves it paused.
        if let Err(ce) = vm.cancel_stream() {
            return Err(Failure::Kept(
                e.context(format!("and cancelling QEMU's migration failed: {ce}")),
            ));
        }
        let _ = vm.end_stream();
    }
    if committed && e.downcast_ref::<ReceiverError>().is_none() {
        s.io.progress(json!({"in_doubt": format!("{e:#}")}));
        return match resolve(&p.to, &s.key, s.tx.session_id()) {
            Resolution::Committed => Ok(json!({
                "to": p.to,
                "total_ms": r3(ms_since(t0)),
                "hand_over": "confirmed by QUERY after the connection was lost",
                "error": format!("{e:#}"),
            })),
            Resolution::NotCommitted(why) => Err(Failure::Kept(e.context(why))),
            Resolution::Unknown(why) => Err(Failure::InDoubt(e.context(format!(
                "the hand-over is in doubt: the receiver may be running the guest, and asking it failed ({why})"
            )))),
        };
    }
    Err(Failure::Kept(e))
}

/// The link's reserve: sealed bytes the writer may queue beyond its 4
/// pieces while QEMU's first pass has more than [`RESERVE_UNTIL`] of
/// memory left, so that the link stays busy while the pump turns a run of
/// pages sent as references into little on the wire; none near the end of
/// the pass, so that the guest pauses with little queued.
fn reserve(st: &StreamStatus) -> u64 {
    let first_pass = matches!(st.phase, StreamPhase::Active) && st.dirty_syncs <= 1;
    if first_pass && st.remaining > RESERVE_UNTIL {
        RESERVE
    } else {
        0
    }
}

/// Reads what the stream has now into `buf` (up to [`PIECE`] bytes in
/// all, waiting [`GATHER`] for more after each read); `None` at its end,
/// else whether the buffer is full.
fn gather(sock: &mut UnixStream, buf: &mut Vec<u8>) -> Result<Option<bool>> {
    const _: () = assert!(PIECE + stream_pages::PAGE + 300 <= MAX_STREAM_CHUNK);
    let mut n = buf.len();
    let had = n;
    buf.resize(PIECE.max(n), 0);
    let end = buf.len();
    while n < end {
        match sock.read(&mut buf[n..]) {
            Ok(0) => {
                buf.truncate(n);
                return Ok(if n == 0 { None } else { Some(false) });
            }
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if n == had || !poll::readable_one(sock.as_raw_fd(), Some(GATHER))? {
                    break;
                }
            }
            Err(e) => return Err(e).context("reading QEMU's migration stream"),
        }
    }
    buf.truncate(n);
    Ok(Some(n >= PIECE))
}

/// Instant of a wall-clock time reported by the hypervisor (its pause).
fn instant_of(t: SystemTime) -> Instant {
    let now = Instant::now();
    match SystemTime::now().duration_since(t) {
        Ok(ago) => now.checked_sub(ago).unwrap_or(now),
        Err(_) => now,
    }
}

/// What the stream's carrier counted of the shared-disk references.
#[derive(Debug, Default)]
struct RefStats {
    /// Pages sent as references.
    refs: u64,
}

/// The shared-disk references of one stream, on the sender: the index of
/// the disks (built on a thread, used as it grows) and the parse of the
/// stream.
struct Refs {
    index: std::sync::Arc<DiskIndex>,
    finder: PageFinder,
    stats: RefStats,
    scratch: Box<[u8; REF_PAGE]>,
}

impl Refs {
    /// Starts indexing `disks` on a thread, for a guest of `memory_size`
    /// bytes. (Not of the lowest priority: the stream's first pages need
    /// it.)
    fn start(disks: Vec<std::fs::File>, memory_size: u64) -> Refs {
        let index = std::sync::Arc::new(DiskIndex::new(disks));
        let ix = index.clone();
        // A failed build only means fewer references.
        std::thread::spawn(move || ix.build());
        Refs {
            index,
            finder: PageFinder::new(memory_size),
            stats: RefStats::default(),
            scratch: Box::new([0; REF_PAGE]),
        }
    }

    /// Seals `piece` (guest pages at `pages`, found by the parse) as
    /// STREAM, or as STREAM_REFS with the pages that are blocks of the
    /// shared disks.
    fn seal(
        &mut self,
        piece: &[u8],
        pages: &[usize],
        z: &mut zstd::bulk::Compressor<'_>,
    ) -> Result<Message> {
        let mut found = Vec::new();
        if !pages.is_empty() {
            let ix = &self.index;
            for &pos in pages {
                if let Some(r) = ix.find(&piece[pos..pos + REF_PAGE], pos as u32, &mut self.scratch)
                {
                    found.push(r);
                }
            }
        }
        if found.is_empty() {
            return plain(piece, z);
        }
        self.stats.refs += found.len() as u64;
        Ok(Message::StreamRefs(
            StreamRefs::seal(piece, &found, z).context("compressing")?,
        ))
    }
}

impl Drop for Refs {
    /// However the stream ended, the index's thread stops reading.
    fn drop(&mut self) {
        self.index.stop();
    }
}

/// Seals `piece` as STREAM.
fn plain(piece: &[u8], z: &mut zstd::bulk::Compressor<'_>) -> Result<Message> {
    Ok(Message::Stream(z.compress(piece).context("compressing")?))
}

/// Handles what the receiver sent while the stream flows: its ROUND_ACK 0
/// (recorded in `acked`, ms since `t0`, once) or its ERROR.
fn from_receiver(rx: &mut Rx, acked: &std::sync::Mutex<Option<f64>>, t0: Instant) -> Result<()> {
    match rx.recv()? {
        Message::RoundAck(a) if a.round == 0 => {
            let mut got = acked.lock().unwrap_or_else(|p| p.into_inner());
            if got.is_some() {
                bail!("protocol error: a second ROUND_ACK 0");
            }
            *got = Some(ms_since(t0));
            Ok(())
        }
        Message::Error(e) => Err(ReceiverError(e).into()),
        other => bail!(
            "protocol error: {} while the stream flows",
            other.ty().name()
        ),
    }
}

/// Carries the stream: reads it, compresses and seals each piece into a
/// STREAM (or, with `refs`, STREAM_REFS) message and queues it for the
/// wire, until its end or `halt`; a receiver's ERROR ends it.
fn pump(
    mut sock: UnixStream,
    (tx, rx): (&mut Tx, &mut Rx),
    writer: &Writer,
    halt: &AtomicBool,
    raw: &AtomicU64,
    mut refs: Option<Refs>,
    (acked, t0): (&std::sync::Mutex<Option<f64>>, Instant),
) -> Result<Option<Refs>> {
    sock.set_nonblocking(true)
        .context("configuring the migration socket")?;
    // One context for every piece: a new one per piece would set up and
    // clear its tables each time.
    let mut z = zstd::bulk::Compressor::new(LEVEL).context("compressing")?;
    let mut buf = Vec::new();
    // Bytes of `buf` parsed, and the pages found in them.
    let mut parsed = 0usize;
    let mut pages: Vec<usize> = Vec::new();
    let fds = [sock.as_raw_fd(), rx.stream().as_raw_fd()];
    loop {
        if halt.load(Ordering::SeqCst) {
            return Ok(refs);
        }
        let ready = poll::readable(&fds, Some(Duration::from_millis(20)))
            .context("waiting for QEMU's migration stream")?;
        if ready[1] {
            from_receiver(rx, acked, t0)?;
        }
        if !ready[0] {
            continue;
        }
        let full = match gather(&mut sock, &mut buf)? {
            None if buf.is_empty() => return Ok(refs),
            None => None,
            Some(full) => Some(full),
        };
        let cut = match refs.as_mut().map(|r| &mut r.finder).filter(|f| !f.done()) {
            None => buf.len(),
            Some(f) => {
                let sc = f.scan(&buf, parsed);
                pages.extend(sc.pages);
                parsed = sc.end;
                match full {
                    // The end: everything goes.
                    None => buf.len(),
                    // Full: what is parsed goes, the item it stopped
                    // before waits for the rest of its bytes.
                    Some(true) if parsed > 0 => parsed,
                    Some(true) => {
                        f.lose();
                        buf.len()
                    }
                    // The stream paused: a page begun goes too.
                    Some(false) if f.at_page() => {
                        f.sent_part_of_page(buf.len() - parsed);
                        buf.len()
                    }
                    Some(false) => parsed,
                }
            }
        };
        if cut == 0 {
            continue;
        }
        raw.fetch_add(cut as u64, Ordering::SeqCst);
        let m = match refs.as_mut() {
            Some(r) => r.seal(&buf[..cut], &pages, &mut z)?,
            None => plain(&buf[..cut], &mut z)?,
        };
        writer.push(vec![tx.seal(m)?])?;
        buf.drain(..cut);
        parsed = parsed.saturating_sub(cut);
        pages.clear();
        if full.is_none() {
            return Ok(refs);
        }
    }
}

/// What following the hypervisor's migration found.
struct Watched {
    /// Its final status.
    fin: StreamStatus,
    /// The rounds before the last.
    rounds: Vec<Round>,
    /// `--max-rounds` made it switch over.
    forced: bool,
    /// When the guest was paused.
    t_pause: Option<Instant>,
    max_throttle: u32,
    /// Pages, zero pages, wire bytes and time at the start of the last
    /// round.
    round_start: (u64, u64, u64, Instant),
    /// The status before the last.
    cur: StreamStatus,
}

/// Follows the hypervisor's migration until the stream's carrier is done
/// (`done`) and the migration completed: reports rounds, applies
/// `--max-rounds`, lets it switch over, and ends it on a cancel, the
/// deadline or a writer error.
fn watch(
    vm: &mut dyn StreamMigratable,
    p: &Params,
    io: &mut kimberley_machine::MigrateIo<'_>,
    writer: &Writer,
    deadline: Instant,
    done: &dyn Fn() -> bool,
    paused: &std::sync::mpsc::Sender<()>,
) -> Result<Watched> {
    let mut rounds: Vec<Round> = Vec::new();
    let mut cur = StreamStatus {
        phase: StreamPhase::Active,
        transferred: 0,
        remaining: 0,
        dirty_syncs: 0,
        dirty_rate: 0,
        throttle_pct: 0,
        pages: 0,
        zero_pages: 0,
    };
    let mut round_start = (0u64, 0u64, writer.bytes(), Instant::now());
    let mut forced = false;
    let mut t_pause: Option<Instant> = None;
    let mut max_throttle = 0u32;
    let mut switched = false;
    let mut signalled = false;
    let mut ended: Option<Instant> = None;
    loop {
        let finished = done();
        if finished {
            ended.get_or_insert_with(Instant::now);
        }
        if !switched {
            if io.cancelled() {
                bail!("cancelled");
            }
            if Instant::now() > deadline {
                bail!("the migration did not finish within --timeout");
            }
        }
        writer.check()?;
        let st = vm.stream_status().map_err(|e| anyhow!("{e}"))?;
        writer.set_depth(reserve(&st));
        if st.dirty_syncs > cur.dirty_syncs && cur.dirty_syncs > 0 {
            // A round ended: what went since the last sync.
            let r = Round {
                pages: st.pages.saturating_sub(round_start.0),
                zero_pages: st.zero_pages.saturating_sub(round_start.1),
                bytes: writer.bytes() - round_start.2,
                ms: ms_since(round_start.3),
                dirty_rate: cur.dirty_rate,
                throttle: cur.throttle_pct,
            };
            io.progress(json!({"round_done": r.json(rounds.len())}));
            rounds.push(r);
            round_start = (st.pages, st.zero_pages, writer.bytes(), Instant::now());
        }
        if st.throttle_pct != cur.throttle_pct {
            io.progress(json!({"throttle": st.throttle_pct}));
        }
        max_throttle = max_throttle.max(st.throttle_pct);
        if !forced && st.dirty_syncs > u64::from(p.max_rounds) + 1 {
            vm.force_switch_over().map_err(|e| anyhow!("{e}"))?;
            forced = true;
        }
        if let Some(at) = vm.stream_paused_at() {
            t_pause = Some(instant_of(at));
        }
        if !matches!(st.phase, StreamPhase::Active | StreamPhase::Failed(_)) {
            t_pause.get_or_insert_with(Instant::now);
        }
        if t_pause.is_some() && !signalled {
            // The guest is paused: its memory is final from now on.
            let _ = paused.send(());
            signalled = true;
        }
        match &st.phase {
            StreamPhase::Active => {}
            StreamPhase::SwitchOver => {
                if !switched {
                    t_pause.get_or_insert_with(Instant::now);
                    let reason = if forced { "max_rounds" } else { "converged" };
                    io.progress(json!({"stop_and_copy": reason}));
                    // The last point a cancel or the deadline still counts
                    // before QEMU finishes the stream.
                    if io.cancelled() {
                        bail!("cancelled");
                    }
                    vm.switch_over().map_err(|e| anyhow!("{e}"))?;
                    switched = true;
                }
            }
            StreamPhase::Device => {
                t_pause.get_or_insert_with(Instant::now);
            }
            StreamPhase::Completed => {
                t_pause.get_or_insert_with(Instant::now);
                if finished {
                    return Ok(Watched {
                        fin: st,
                        rounds,
                        forced,
                        t_pause,
                        max_throttle,
                        round_start,
                        cur,
                    });
                }
            }
            StreamPhase::Failed(why) => bail!("QEMU's migration failed: {why}"),
        }
        if ended.is_some_and(|t| t.elapsed() > COMPLETION_WAIT) {
            bail!("QEMU's migration stream ended but the migration did not complete");
        }
        cur = st;
        std::thread::sleep(if t_pause.is_some() {
            Duration::from_millis(2)
        } else {
            STATUS_EVERY
        });
    }
}

fn stream_and_switch(
    vm: &mut dyn StreamMigratable,
    p: &Params,
    s: &mut Session<'_, '_>,
    t0: Instant,
    started: &mut bool,
    committed: &mut bool,
) -> Result<Value> {
    let paths = vm.disk_paths();
    let mut infos = Vec::new();
    let mut files = Vec::new();
    for d in &paths {
        let f = kimberley_formats::fsutil::open_regular(d, false)
            .with_context(|| format!("opening {}", d.display()))?;
        let size = f.metadata().context("stat of a disk")?.len();
        infos.push(crate::source::disk_info(d, size, p.shared_disk)?);
        files.push(f);
    }
    let ndisks = infos.len();
    // Pages of the stream that are blocks of the shared disks travel as
    // references to them: the disks are indexed while round 0 goes.
    let refs = (p.shared_disk && ndisks > 0).then(|| Refs::start(files, vm.memory_size()));
    s.send_msg(Message::Start(Start {
        memory_size: vm.memory_size(),
        vcpus: vm.vcpus(),
        shared_disk: p.shared_disk,
        stream: true,
        disks: infos,
    }))?;
    let boot = vm.boot_files().map_err(|e| anyhow!("{e}"))?;
    let sizes: Vec<u64> = boot
        .iter()
        .map(|f| f.metadata().map(|m| m.len()))
        .collect::<std::io::Result<_>>()
        .context("stat of a boot file")?;
    s.send_msg(Message::Machine(Box::new(MachineMsg {
        kernel_size: sizes[0],
        initrd_size: sizes.get(1).copied().unwrap_or(0),
        spec: vm.description(),
    })))?;
    // Round 0: the boot files (the receiver starts its QEMU on them):
    // with shared disks, where they are (they are shared as the disks
    // are); otherwise their bytes.
    let t = Instant::now();
    let b0 = s.writer.bytes();
    if p.shared_disk {
        let path = |f: &std::fs::File| -> Result<String> {
            let p = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
                .context("resolving a boot file's path")?;
            p.to_str()
                .filter(|p| p.starts_with('/') && !p.ends_with(" (deleted)"))
                .map(str::to_string)
                .ok_or_else(|| anyhow!("a boot file's path ({}) cannot be shared", p.display()))
        };
        s.send_msg(Message::BootFiles {
            kernel: path(&boot[0])?,
            initrd: boot.get(1).map(path).transpose()?.unwrap_or_default(),
        })?;
    } else {
        for (j, (f, &size)) in boot.iter().zip(&sizes).enumerate() {
            let idx = disk_chunks(f, size);
            s.send_chunks(
                &Source::Disk(f),
                (1 + ndisks + j) as u32,
                &idx,
                true,
                &mut |_, _| {},
            )?;
        }
    }
    s.send_msg(Message::RoundEnd(0))?;
    s.writer.flush()?;
    // QEMU's stream starts without waiting for ROUND_ACK 0: the receiver
    // starts its QEMU meanwhile, and the stream waits in the connection
    // until it reads on. The acknowledgement (or an ERROR) comes while the
    // stream flows.
    let boot_bytes = s.writer.bytes() - b0;
    let acked: std::sync::Mutex<Option<f64>> = std::sync::Mutex::new(None);

    // The stream: a thread carries it (QEMU holds its big lock while it
    // writes the last part, so QMP answers only once that is read) while
    // this one follows QEMU's progress.
    let sock = vm
        .start_stream(&StreamLimits {
            downtime_ms: p.downtime_ms,
            // Unshared disks travel in the stream, pre-copied.
            copy_disks: !p.shared_disk && ndisks > 0,
        })
        .map_err(|e| anyhow!("starting QEMU's migration: {e}"))?;
    *started = true;
    let halt = AtomicBool::new(false);
    let raw = AtomicU64::new(0);
    let deadline = s.deadline;
    let (tx, rx, writer, io) = (&mut s.tx, &mut s.rx, &s.writer, &mut *s.io);
    // The memory check's hashing of this side starts as soon as the guest
    // is paused (its memory is final then), while QEMU's last round and
    // device state still cross the link and the receiver loads them.
    let mem = vm.memory_file().map_err(|e| anyhow!("{e}"))?;
    let size = vm.memory_size();
    let (paused_tx, paused_rx) = std::sync::mpsc::channel::<()>();
    let (w, early, refs) = std::thread::scope(|sc| {
        let mem = &mem;
        let hasher = sc.spawn(move || {
            paused_rx.recv().ok()?;
            let t = Instant::now();
            Some((crate::sums::file_sums(mem, size), ms_since(t)))
        });
        let pump_thread = sc.spawn(|| pump(sock, (tx, rx), writer, &halt, &raw, refs, (&acked, t)));
        let paused_tx = paused_tx;
        let r = watch(
            vm,
            p,
            io,
            writer,
            deadline,
            &|| pump_thread.is_finished(),
            &paused_tx,
        );
        drop(paused_tx);
        if r.is_err() {
            // Stop the carrying: QEMU's migration cancelled closes its end;
            // a writer stuck on a slow link drops what is queued.
            halt.store(true, Ordering::SeqCst);
            let _ = vm.cancel_stream();
            let t = Instant::now();
            while !pump_thread.is_finished() {
                if t.elapsed() > Duration::from_secs(1) {
                    writer.cancel();
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let pumped = pump_thread
            .join()
            .unwrap_or_else(|_| Err(anyhow!("the stream's thread panicked")));
        // Joined only now: after a failure QEMU's migration is cancelled
        // first, and a hash already started is waited for afterwards.
        let early = hasher.join().ok().flatten();
        let w = r?;
        let refs = pumped?;
        Ok::<_, anyhow::Error>((w, early, refs))
    })?;
    let Watched {
        fin,
        rounds,
        forced,
        t_pause,
        max_throttle,
        round_start,
        cur,
    } = w;
    let raw = raw.load(Ordering::SeqCst);
    let (round_pages, round_zero, round_bytes, round_t) = round_start;
    let t_pause = t_pause.unwrap_or_else(Instant::now);
    let last = Round {
        pages: fin.pages.saturating_sub(round_pages),
        zero_pages: fin.zero_pages.saturating_sub(round_zero),
        bytes: s.writer.bytes() - round_bytes,
        ms: ms_since(round_t),
        dirty_rate: cur.dirty_rate,
        throttle: cur.throttle_pct,
    };
    // The stream is complete and the guest paused: what the receiver
    // loaded is checked against this memory, block by block, and blocks
    // that differ are sent again (QEMU 7.2 under TCG can miss guest writes
    // in its dirty log).
    s.send_msg(Message::RoundEnd(1))?;
    s.writer.flush()?;
    let t_check = Instant::now();
    let (ours, hash_ms) = match early {
        Some((sums, ms)) => (sums.context("hashing guest memory")?, ms),
        None => (
            crate::sums::file_sums(&mem, size).context("hashing guest memory")?,
            ms_since(t_check),
        ),
    };
    let mut theirs: Vec<[u8; SUM_LEN]> = Vec::with_capacity(ours.len());
    while theirs.len() < ours.len() {
        match s.wait_msg(Duration::from_secs(60), true)? {
            Message::Sums { first, sums } if first == theirs.len() as u64 => {
                theirs.extend(sums);
            }
            Message::RoundAck(a) if a.round == 0 && acked.lock().is_ok_and(|g| g.is_none()) => {
                *acked.lock().unwrap_or_else(|p| p.into_inner()) = Some(ms_since(t));
            }
            other => bail!("protocol error: {} instead of SUMS", other.ty().name()),
        }
    }
    if theirs.len() != ours.len() {
        bail!("protocol error: SUMS for more memory than the guest has");
    }
    let Some(acked_ms) = *acked.lock().unwrap_or_else(|p| p.into_inner()) else {
        bail!("protocol error: SUMS before ROUND_ACK 0");
    };
    let boot_round = json!({"boot_files_bytes": boot_bytes, "boot_files_ms": r3(acked_ms)});
    let repair = crate::sums::differing_pages(&ours, &theirs, size);
    if !repair.is_empty() {
        s.send_chunks(&Source::Disk(&mem), 0, &repair, false, &mut |_, _| {})?;
    }
    let check_ms = ms_since(t_check);
    s.writer.flush()?;
    let final_ms = ms_since(t_pause);
    let t = Instant::now();
    s.check()?;
    s.send_msg(Message::Commit)?;
    s.writer.flush()?;
    *committed = true;
    let state_send_ms = ms_since(t);
    let (downtime, parts, wire_bytes, running, t_running) = s.hand_over(
        t_pause,
        &SourceParts {
            final_pages_ms: final_ms,
            state_send_ms,
            ..SourceParts::default()
        },
    )?;
    let mut per_round: Vec<Value> = rounds.iter().enumerate().map(|(i, r)| r.json(i)).collect();
    per_round.push(last.json(rounds.len()));
    Ok(json!({
        "to": p.to,
        "total_ms": r3(t_running.duration_since(t0).as_secs_f64() * 1000.0),
        "downtime_ms": r3(downtime),
        "downtime_target_ms": p.downtime_ms,
        "downtime_parts": parts,
        "downtime_estimate": null,
        "measured_costs": {
            "stream_bytes": raw,
            "boot_files": boot_round,
            "memory_check_ms": r3(check_ms),
            "memory_hash_ms": r3(hash_ms),
            "repaired_pages": repair.len(),
            "disk_refs": refs.as_ref().map(|r| json!({
                "indexed_blocks": r.index.len(),
                "pages": r.stats.refs,
                "bytes": r.stats.refs * REF_PAGE as u64,
            })),
        },
        "bytes_on_wire": wire_bytes,
        "rounds": per_round.len(),
        "stop_reason": if forced { "max_rounds" } else { "converged" },
        "throttled": max_throttle > 0,
        "max_throttle_pct": max_throttle,
        "state_bytes": 0,
        "final_pages": last.pages,
        "final_digest_blocks": running.blocks_hashed,
        "per_round": per_round,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(phase: StreamPhase, dirty_syncs: u64, remaining: u64) -> StreamStatus {
        StreamStatus {
            phase,
            transferred: 0,
            remaining,
            dirty_syncs,
            dirty_rate: 0,
            throttle_pct: 0,
            pages: 0,
            zero_pages: 0,
        }
    }

    #[test]
    fn the_reserve_is_kept_only_early_in_the_first_pass() {
        let active = StreamPhase::Active;
        assert_eq!(reserve(&status(active.clone(), 0, 512 << 20)), RESERVE);
        assert_eq!(
            reserve(&status(active.clone(), 1, RESERVE_UNTIL + 1)),
            RESERVE
        );
        // Near the end of the pass, in a later round, or paused: none.
        assert_eq!(reserve(&status(active.clone(), 1, RESERVE_UNTIL)), 0);
        assert_eq!(reserve(&status(active, 2, 512 << 20)), 0);
        assert_eq!(reserve(&status(StreamPhase::SwitchOver, 1, 512 << 20)), 0);
        assert_eq!(reserve(&status(StreamPhase::Device, 1, 512 << 20)), 0);
    }
}
