//! Compression and sealing on worker threads, one ordered writer.

use std::collections::BTreeMap;
use std::io::Write;

use crossbeam_channel::{bounded, Sender};

use super::DiffOptions;
use crate::crypto::Sealer;
use crate::error::{Error, Result};
use crate::overlay::frame::SegmentKind;
use crate::overlay::header::HEADER_LEN;
use crate::overlay::io::{compress, seal_frame, FrameWriter};
use crate::overlay::segment::{ChunkStats, Index, IndexEntry};
use crate::overlay::Pos;

/// Index facts of a data segment, known when it is cut.
#[derive(Debug, Clone, Copy)]
struct Meta {
    first: Pos,
    end: Pos,
    records: u32,
    body_len: u32,
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

    /// Sends a data segment body.
    pub fn send_data(&mut self, body: Vec<u8>, first: Pos, end: Pos, records: u32) -> Result<()> {
        let body_len = body.len() as u32;
        self.send(
            SegmentKind::Data,
            body,
            Some(Meta {
                first,
                end,
                records,
                body_len,
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
        let (mut fw, entries, body_bytes) = written?;
        let stats = produced?;
        let segments = entries.len() as u64;
        let idx = Index { entries, stats };
        let body = idx.encode();
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
    })
}
