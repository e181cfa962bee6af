//! Reads frames on one thread, opens segments on worker threads, and hands
//! them over in stream order, checking order and the index on the way.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::bounded;

use super::open::Opened;
use crate::error::{Error, Result};
use crate::overlay::frame::SegmentKind;
use crate::overlay::io::Frame;
use crate::overlay::map::Coverage;
use crate::overlay::record::{self, Geometry, Record};
use crate::overlay::segment::{Index, IndexEntry};
use crate::overlay::Pos;
use crate::progress::Progress;

/// An opened data segment.
#[derive(Debug)]
pub struct Segment {
    /// STREAM counter.
    pub counter: u64,
    /// Decompressed body.
    pub body: Vec<u8>,
    /// Parsed records (byte ranges index `body`).
    pub records: Vec<Record>,
    /// Carries the working set (version 2): its records may be in any
    /// position order and are applied where they are.
    pub working_set: bool,
}

enum Opened_ {
    Data(Segment, IndexEntry),
    /// The index body, decoded in order (it needs the map's mark).
    Index(Vec<u8>),
}

/// Totals of a decode run.
#[derive(Debug)]
pub struct DecodeStats {
    /// Overlay bytes read.
    pub bytes: u64,
    /// Data segments.
    pub segments: u64,
    /// The (checked) index.
    pub index: Index,
    /// When the last byte was read.
    pub receive_done: Instant,
    /// Worker time spent opening segments.
    pub decode_cpu_ms: u64,
}

/// Counters of the working-set segments: `[2, ws_end)` (empty in version 1).
fn open_frame(
    frame: Frame,
    sealer: &crate::crypto::Sealer,
    geo: &Geometry,
    ws_end: u64,
) -> Result<Opened_> {
    let (counter, kind, offset, frame_len) =
        (frame.counter, frame.header.kind, frame.offset, frame.len());
    let body = frame.open(sealer)?;
    match kind {
        SegmentKind::Data => {
            let working_set = counter < ws_end;
            let after = (!working_set).then_some((0, 0));
            let records = record::parse(&body, geo, after)
                .map_err(|e| Error::Corrupt(format!("segment {counter}: {e}")))?;
            // The span: the first record's start and last record's end,
            // which in position order are the smallest and largest.
            let first = records.iter().map(|r| r.start_pos()).min();
            let end = records.iter().map(|r| r.end_pos()).max();
            let (Some(first), Some(end)) = (first, end) else {
                return Err(Error::Corrupt(format!("segment {counter} has no records")));
            };
            let entry = IndexEntry {
                counter,
                offset,
                frame_len: frame_len as u32,
                body_len: body.len() as u32,
                first,
                end,
                records: records.len() as u32,
            };
            Ok(Opened_::Data(
                Segment {
                    counter,
                    body,
                    records,
                    working_set,
                },
                entry,
            ))
        }
        SegmentKind::Index => Ok(Opened_::Index(body)),
        SegmentKind::Manifest | SegmentKind::Map => Err(Error::Corrupt(format!(
            "segment {counter}: a second manifest or map"
        ))),
    }
}

/// Runs the decode pipeline over the rest of `o`, calling `on_segment` for
/// each data segment in order. Returns once the index and footer checked.
pub fn run(
    o: Opened,
    geo: Geometry,
    threads: usize,
    progress: Option<&Progress>,
    mut on_segment: impl FnMut(Segment) -> Result<()>,
) -> Result<DecodeStats> {
    let threads = threads.max(1);
    let Opened {
        sealer,
        mut reader,
        map,
        ..
    } = o;
    // Version 2: data segments start at counter 2, the working set's first.
    let (first_counter, ws_end, ws) = match &map {
        Some(m) => (2u64, 2 + u64::from(m.ws_segments), m.ws_segments as usize),
        None => (1, 0, 0),
    };
    let mut coverage = map.as_ref().map(Coverage::new);
    let sealer = Arc::new(sealer);
    let geo = Arc::new(geo);
    let (ftx, frx) = bounded::<(u64, Result<Frame>)>(threads * 2);
    let (dtx, drx) = bounded::<(u64, Result<Opened_>, u64, u64)>(threads * 2);
    let (done_tx, done_rx) = bounded::<(Instant, u64)>(1);
    // Tickets bound the frames between the reader and the in-order
    // consumer, so memory stays bounded even when one segment is slow.
    let depth = threads * 4;
    let (ticket_tx, ticket_rx) = bounded::<()>(depth);
    for _ in 0..depth {
        ticket_tx.send(()).expect("room for every ticket");
    }
    // Threads are detached: on an error the consumer returns at once, even
    // if the reader is blocked on a slow pipe; dropped channels stop them.
    std::thread::spawn(move || loop {
        if ticket_rx.recv().is_err() {
            return;
        }
        match reader.next_frame() {
            Ok(Some(f)) => {
                let (c, last) = (f.counter, f.header.last);
                if ftx.send((c, Ok(f))).is_err() {
                    return;
                }
                if last {
                    // next_frame already checked the footer and the end.
                    let _ = done_tx.send((Instant::now(), reader.bytes_read));
                    return;
                }
            }
            Ok(None) => return,
            Err(e) => {
                // Delivered in order: after every frame read before it.
                let _ = ftx.send((reader.next_counter(), Err(e)));
                return;
            }
        }
    });
    for _ in 0..threads {
        let (frx, dtx, sealer, geo) = (frx.clone(), dtx.clone(), sealer.clone(), geo.clone());
        std::thread::spawn(move || {
            for (counter, item) in frx {
                let t = Instant::now();
                let len = item.as_ref().map(|f| f.len()).unwrap_or(0);
                let r = item.and_then(|f| open_frame(f, &sealer, &geo, ws_end));
                if dtx
                    .send((counter, r, len, t.elapsed().as_micros() as u64))
                    .is_err()
                {
                    return;
                }
            }
        });
    }
    drop(dtx);
    drop(frx);

    let mut pending: BTreeMap<u64, (Result<Opened_>, u64)> = BTreeMap::new();
    let mut next = first_counter;
    let mut prev_end: Pos = (0, 0);
    let mut seen: Vec<IndexEntry> = Vec::new();
    let mut cpu_us = 0u64;
    let index = 'outer: loop {
        let Ok((counter, r, len, us)) = drx.recv() else {
            return Err(Error::Truncated("the stream ended early".into()));
        };
        cpu_us += us;
        pending.insert(counter, (r, len));
        while let Some((r, len)) = pending.remove(&next) {
            next += 1;
            let _ = ticket_tx.send(());
            if let Some(p) = progress {
                p.advance(len);
            }
            match r? {
                Opened_::Data(seg, entry) => {
                    if !seg.working_set {
                        if entry.first < prev_end {
                            return Err(Error::Corrupt(format!(
                                "segment {} overlaps the previous one",
                                seg.counter
                            )));
                        }
                        prev_end = entry.end;
                    }
                    if let Some(c) = coverage.as_mut() {
                        c.segment(entry.frame_len.into(), seg.body.len(), &seg.records)?;
                    }
                    seen.push(entry);
                    on_segment(seg)?;
                }
                Opened_::Index(body) => {
                    if let Some(c) = &coverage {
                        c.finish()?;
                    }
                    break 'outer Index::decode_with(&body, ws)?;
                }
            }
        }
    };
    let (receive_done, total_bytes) = done_rx
        .recv()
        .map_err(|_| Error::Truncated("the stream ended early".into()))?;
    if index.entries != seen {
        return Err(Error::Corrupt(
            "the index does not match the segments".into(),
        ));
    }
    Ok(DecodeStats {
        bytes: total_bytes,
        segments: seen.len() as u64,
        index,
        receive_done,
        decode_cpu_ms: cpu_us / 1000,
    })
}
