//! Compression and sealing on worker threads, one ordered writer. A
//! version-2 overlay's segments are compressed (and, without a working
//! set, sealed) as they come, kept in a private spool file, and copied to
//! the output once the coverage map (which must precede them and list
//! their lengths) is known: FORMAT.md section 10.5 says why.

use std::collections::BTreeMap;
use std::io::Write;

use crossbeam_channel::{bounded, Sender};

use super::DiffOptions;
use crate::crypto::Sealer;
use crate::error::{Error, Result};
use crate::overlay::frame::{SegmentKind, FRAME_HEADER_LEN};
use crate::overlay::header::{HEADER_LEN, VERSION_MAP};
use crate::overlay::io::{compress, seal_frame, FrameWriter};
use crate::overlay::map::{CoverageMap, SegmentInfo, MAX_SEGMENTS};
use crate::overlay::segment::MAX_BODY;
use crate::overlay::segment::{ChunkStats, Index, IndexEntry};
use crate::overlay::Pos;

/// Index facts of a data segment, known when it is cut.
#[derive(Debug, Clone)]
struct Meta {
    first: Pos,
    end: Pos,
    records: u32,
    body_len: u32,
    /// Record runs (position, count, zero), for the coverage map.
    runs: Vec<(Pos, u32, bool)>,
    /// Carries the working set (goes first).
    ws: bool,
}

struct Job {
    counter: u64,
    kind: SegmentKind,
    body: Vec<u8>,
    meta: Option<Meta>,
}

/// Where the encoder sends segment bodies.
pub struct Sink {
    tx: Sender<Job>,
    counter: u64,
    /// One ticket per segment between here and the writer.
    tickets: crossbeam_channel::Receiver<()>,
}

fn stopped() -> Error {
    Error::io(
        "writing the overlay",
        std::io::Error::other("the writer stopped"),
    )
}

impl Sink {
    /// Sends the manifest body (must be first).
    pub fn send_manifest(&mut self, body: Vec<u8>) -> Result<()> {
        debug_assert_eq!(self.counter, 0);
        self.send(SegmentKind::Manifest, body, None)
    }

    /// Sends a data segment body: the span of its records, their number,
    /// their runs (position, count, zero) and whether it carries the
    /// working set.
    pub fn send_data(
        &mut self,
        body: Vec<u8>,
        first: Pos,
        end: Pos,
        records: u32,
        runs: Vec<(Pos, u32, bool)>,
        ws: bool,
    ) -> Result<()> {
        let body_len = body.len() as u32;
        self.send(
            SegmentKind::Data,
            body,
            Some(Meta {
                first,
                end,
                records,
                body_len,
                runs,
                ws,
            }),
        )
    }

    fn send(&mut self, kind: SegmentKind, body: Vec<u8>, meta: Option<Meta>) -> Result<()> {
        let job = Job {
            counter: self.counter,
            kind,
            body,
            meta,
        };
        self.counter += 1;
        // Wait until the writer has room: bounds the segments in flight
        // (and the writer's reorder buffer) whatever the workers' pace.
        self.tickets.recv().map_err(|_| stopped())?;
        self.tx.send(job).map_err(|_| stopped())
    }
}

/// Totals of what was written.
#[derive(Debug, Clone, Copy, Default)]
pub struct WriterStats {
    /// Overlay bytes.
    pub bytes: u64,
    /// Data segments.
    pub segments: u64,
    /// Uncompressed data segment bodies.
    pub body_bytes: u64,
}

/// Runs `produce` with a [`Sink`], compressing and writing what it sends;
/// then writes the index and footer. Nothing final is written if `produce`
/// fails.
pub fn run<W, F>(
    out: W,
    header: &[u8; HEADER_LEN],
    sealer: &Sealer,
    opts: &DiffOptions,
    produce: F,
) -> Result<(W, WriterStats)>
where
    W: Write + Send,
    F: FnOnce(&mut Sink) -> Result<ChunkStats>,
{
    if opts.version >= VERSION_MAP {
        return run_mapped(out, header, sealer, opts, produce);
    }
    let threads = opts.threads.max(1);
    let level = opts.level;
    std::thread::scope(|s| {
        let (job_tx, job_rx) = bounded::<Job>(threads * 2);
        let (frame_tx, frame_rx) = bounded::<(u64, Vec<u8>, Option<Meta>)>(threads * 2);
        let depth = threads * 4;
        let (ticket_tx, ticket_rx) = bounded::<()>(depth);
        for _ in 0..depth {
            ticket_tx.send(()).expect("room for every ticket");
        }
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let frame_tx = frame_tx.clone();
            s.spawn(move || {
                for job in job_rx {
                    let frame = seal_frame(
                        sealer,
                        job.counter,
                        job.kind,
                        false,
                        compress(&job.body, level),
                    );
                    if frame_tx.send((job.counter, frame, job.meta)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(frame_tx);
        drop(job_rx);
        let writer = s.spawn(move || -> Result<(FrameWriter<W>, Vec<IndexEntry>, u64)> {
            let mut fw = FrameWriter::new(out, header)?;
            let mut pending = BTreeMap::new();
            let mut entries = Vec::new();
            let mut body_bytes = 0u64;
            for (counter, frame, meta) in frame_rx {
                pending.insert(counter, (frame, meta));
                while let Some((frame, meta)) = pending.remove(&fw.next_counter()) {
                    let counter = fw.next_counter();
                    let offset = fw.write_frame(&frame)?;
                    let _ = ticket_tx.send(());
                    if let Some(m) = meta {
                        body_bytes += u64::from(m.body_len);
                        entries.push(IndexEntry {
                            counter,
                            offset,
                            frame_len: frame.len() as u32,
                            body_len: m.body_len,
                            first: m.first,
                            end: m.end,
                            records: m.records,
                        });
                    }
                }
            }
            Ok((fw, entries, body_bytes))
        });
        let mut sink = Sink {
            tx: job_tx,
            counter: 0,
            tickets: ticket_rx,
        };
        let produced = produce(&mut sink);
        drop(sink);
        let written = writer
            .join()
            .map_err(|_| Error::Invalid("the overlay writer panicked".into()))?;
        // A writer error (broken pipe, full disk) explains a producer error.
        let (fw, entries, body_bytes) = written?;
        let stats = produced?;
        finish_with_index(fw, sealer, level, entries, stats, body_bytes)
    })
}

/// A data segment in the spool: where its frame (sealed) or compressed
/// body (to be sealed) is, and its index facts.
struct Spooled {
    offset: u64,
    len: usize,
    meta: Meta,
}

/// [`run`] for a version-2 overlay: every segment is compressed on the
/// workers as it comes and appended to a [`crate::spool::Spool`] (a
/// private nameless file in `opts.spool_dir` or `$TMPDIR`), so memory
/// holds only the segments in flight; then the header, manifest, coverage
/// map (with every segment's length), the working-set segments, the others
/// (copied from the spool), the index and the footer are written in that
/// order.
fn run_mapped<W, F>(
    out: W,
    header: &[u8; HEADER_LEN],
    sealer: &Sealer,
    opts: &DiffOptions,
    produce: F,
) -> Result<(W, WriterStats)>
where
    W: Write + Send,
    F: FnOnce(&mut Sink) -> Result<ChunkStats>,
{
    let threads = opts.threads.max(1);
    let level = opts.level;
    // Without a working set the data segments keep the order they are
    // made in, so each one's stream counter is known at once (the map
    // takes counter 1): the workers seal them too, and only the writing
    // waits for the map. A working set's segments are made last and go
    // first, so then every data segment is sealed as it leaves the spool.
    let seal_early = opts.working_set.is_empty();
    let mut spool = super::spool(opts, "the compressed segments")?;
    type Done = (u64, SegmentKind, Vec<u8>, Option<Meta>);
    let (spooled, produced) = std::thread::scope(|s| {
        let (job_tx, job_rx) = bounded::<Job>(threads * 2);
        let (done_tx, done_rx) = bounded::<Done>(threads * 2);
        let depth = threads * 4;
        let (ticket_tx, ticket_rx) = bounded::<()>(depth);
        for _ in 0..depth {
            ticket_tx.send(()).expect("room for every ticket");
        }
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let done_tx = done_tx.clone();
            s.spawn(move || {
                for job in job_rx {
                    let mut c = compress(&job.body, level);
                    if seal_early && job.kind == SegmentKind::Data {
                        c = seal_frame(sealer, job.counter + 1, job.kind, false, c);
                    }
                    if done_tx.send((job.counter, job.kind, c, job.meta)).is_err() {
                        break;
                    }
                }
            });
        }
        drop(done_tx);
        drop(job_rx);
        let spool = &mut spool;
        // Appends in counter order (a ticket back for each), so the spool
        // is read back sequentially; the segments waiting for an earlier
        // one are bounded by the tickets.
        let collector = s.spawn(move || -> Result<(Option<Vec<u8>>, Vec<Spooled>)> {
            let mut pending = BTreeMap::new();
            let mut next = 0u64;
            let mut manifest = None;
            let mut spooled = Vec::new();
            for (counter, kind, c, meta) in done_rx {
                pending.insert(counter, (kind, c, meta));
                while let Some((kind, c, meta)) = pending.remove(&next) {
                    match (kind, meta) {
                        (SegmentKind::Manifest, None) if next == 0 => manifest = Some(c),
                        (SegmentKind::Data, Some(meta)) => {
                            let offset = spool
                                .append(&c)
                                .map_err(|e| Error::io("writing the overlay's spool file", e))?;
                            spooled.push(Spooled {
                                offset,
                                len: c.len(),
                                meta,
                            });
                        }
                        _ => {
                            return Err(Error::Invalid(
                                "the manifest segment must come first, then data segments".into(),
                            ))
                        }
                    }
                    next += 1;
                    let _ = ticket_tx.send(());
                }
            }
            Ok((manifest, spooled))
        });
        let mut sink = Sink {
            tx: job_tx,
            counter: 0,
            tickets: ticket_rx,
        };
        let produced = produce(&mut sink);
        drop(sink);
        (collector.join(), produced)
    });
    let spooled = spooled.map_err(|_| Error::Invalid("the overlay writer panicked".into()))?;
    // A spool error (full disk) explains a producer error.
    let (manifest, spooled) = spooled?;
    let stats = produced?;
    let Some(manifest) = manifest else {
        return Err(Error::Invalid(
            "the manifest segment must come first".into(),
        ));
    };
    // The working set's segments first, each group in the order made.
    let (ws, rest): (Vec<Spooled>, Vec<Spooled>) = spooled.into_iter().partition(|d| d.meta.ws);
    let mut data: Vec<Spooled> = ws.into_iter().chain(rest).collect();
    if data.len() > MAX_SEGMENTS as usize {
        return Err(Error::Invalid(format!(
            "overlay too large: {} data segments do not fit one index",
            data.len()
        )));
    }
    let ws_segments = data.iter().filter(|d| d.meta.ws).count() as u32;
    let infos: Vec<SegmentInfo> = data
        .iter()
        .map(|d| SegmentInfo {
            frame_len: if seal_early {
                d.len
            } else {
                FRAME_HEADER_LEN + d.len + sealer.overhead()
            } as u32,
            body_len: d.meta.body_len,
            records: d.meta.records,
        })
        .collect();
    let runs: Vec<Vec<(Pos, u32, bool)>> = data
        .iter_mut()
        .map(|d| std::mem::take(&mut d.meta.runs))
        .collect();
    let map = CoverageMap::build(ws_segments, infos, &runs).encode();
    drop(runs);
    if map.len() > MAX_BODY {
        return Err(Error::Invalid(format!(
            "the coverage map ({} bytes) exceeds one segment: write overlay version 1 (--overlay-version 1), or use larger segments",
            map.len()
        )));
    }
    let mut fw = FrameWriter::new(out, header)?;
    fw.write_frame(&seal_frame(
        sealer,
        0,
        SegmentKind::Manifest,
        false,
        manifest,
    ))?;
    fw.write_frame(&seal_frame(
        sealer,
        1,
        SegmentKind::Map,
        false,
        compress(&map, level),
    ))?;
    drop(map);
    let mut entries = Vec::with_capacity(data.len());
    let mut body_bytes = 0u64;
    let mut buf = Vec::new();
    for d in data {
        let counter = fw.next_counter();
        buf.resize(d.len, 0);
        spool
            .read_at(&mut buf, d.offset)
            .map_err(|e| Error::io("reading the overlay's spool file", e))?;
        if !seal_early {
            buf = seal_frame(sealer, counter, SegmentKind::Data, false, buf);
        }
        let offset = fw.write_frame(&buf)?;
        body_bytes += u64::from(d.meta.body_len);
        entries.push(IndexEntry {
            counter,
            offset,
            frame_len: buf.len() as u32,
            body_len: d.meta.body_len,
            first: d.meta.first,
            end: d.meta.end,
            records: d.meta.records,
        });
    }
    drop(spool);
    finish_with_index(fw, sealer, level, entries, stats, body_bytes)
}

/// Writes the index of `entries` (refused past one segment's body) and the
/// footer: the end of every overlay, whatever its version.
fn finish_with_index<W: Write>(
    mut fw: FrameWriter<W>,
    sealer: &Sealer,
    level: i32,
    entries: Vec<IndexEntry>,
    stats: ChunkStats,
    body_bytes: u64,
) -> Result<(W, WriterStats)> {
    let segments = entries.len() as u64;
    let body = Index { entries, stats }.encode();
    if body.len() > crate::overlay::segment::MAX_BODY {
        return Err(Error::Invalid(format!(
            "overlay too large: {segments} data segments do not fit one index"
        )));
    }
    let frame = seal_frame(
        sealer,
        fw.next_counter(),
        SegmentKind::Index,
        true,
        compress(&body, level),
    );
    let index_offset = fw.write_frame(&frame)?;
    let (out, bytes) = fw.finish(index_offset)?;
    Ok((
        out,
        WriterStats {
            bytes,
            segments,
            body_bytes,
        },
    ))
}
