//! Turns per-chunk decisions into records (coalescing runs) and cuts the
//! record stream into segments of about the target size (4 MiB by default).
//! With a working set (version 2), its chunks are held back (their bytes
//! in a spool file, not in memory) and written last into segments of
//! their own, in first-touch order; the writer puts those segments first
//! (FORMAT.md section 12.5).

use std::collections::HashMap;

use super::writer::Sink;
use crate::error::{Error, Result};
use crate::overlay::record::{Writer, MAX_RUN};
use crate::overlay::segment::ChunkStats;
use crate::overlay::Pos;
use crate::spool::Spool;

/// Longest literal run (keeps segments near their target size).
const MAX_LITERAL_RUN: u32 = 256;

/// How one changed chunk is encoded.
#[derive(Debug, Clone, Copy)]
pub enum Enc<'a> {
    /// All zero.
    Zero,
    /// Equal to a base chunk (`is_self == false`) or an earlier launch chunk.
    Ref {
        /// Self or base.
        is_self: bool,
        /// Source component.
        comp: u8,
        /// Source chunk.
        chunk: u64,
    },
    /// Patch against the base chunk at the same position.
    Delta(&'a [u8]),
    /// The chunk's bytes.
    Literal(&'a [u8]),
}

#[derive(Debug)]
enum Run {
    None,
    Zero {
        comp: u8,
        start: u64,
        count: u32,
    },
    Literal {
        comp: u8,
        start: u64,
        count: u32,
        data: Vec<u8>,
    },
    Ref {
        comp: u8,
        start: u64,
        count: u32,
        is_self: bool,
        src_comp: u8,
        src: u64,
    },
}

/// Where held bytes are in the spool: offset and length.
type Span = (u64, u32);

/// A working-set chunk's decision, held until the working set is written.
#[derive(Debug)]
enum Held {
    Zero,
    Ref {
        is_self: bool,
        comp: u8,
        chunk: u64,
        /// The chunk's bytes, for a self reference that must become a
        /// literal (its source comes later in the stream).
        bytes: Option<Span>,
    },
    Delta(Span),
    Literal(Span),
}

/// The working set's chunks in first-touch order, what was decided for
/// each changed one, and the spool holding their bytes.
#[derive(Debug)]
struct Held_ {
    order: HashMap<Pos, usize>,
    held: Vec<(Pos, Option<Held>)>,
    spool: Spool,
}

impl Held_ {
    fn keep(&mut self, bytes: &[u8]) -> Result<Span> {
        let at = self
            .spool
            .append(bytes)
            .map_err(|e| Error::io("writing the working set's spool file", e))?;
        Ok((at, bytes.len() as u32))
    }
}

/// Reads held bytes back from the spool into `buf`.
fn read_held<'b>(spool: &mut Spool, (at, len): Span, buf: &'b mut Vec<u8>) -> Result<&'b [u8]> {
    buf.resize(len as usize, 0);
    spool
        .read_at(buf, at)
        .map_err(|e| Error::io("reading the working set's spool file", e))?;
    Ok(buf)
}

/// Builds segments from chunk decisions given in position order.
pub struct SegmentBuilder<'s> {
    sink: &'s mut Sink,
    body: Writer,
    first: Option<Pos>,
    end: Pos,
    /// Record runs of the current body: (position, count, zero).
    runs: Vec<(Pos, u32, bool)>,
    run: Run,
    stats: ChunkStats,
    target: usize,
    /// Sending working-set segments.
    in_ws: bool,
    ws: Option<Held_>,
}

impl<'s> SegmentBuilder<'s> {
    /// Starts with an empty segment.
    pub fn new(sink: &'s mut Sink, target: usize) -> Self {
        SegmentBuilder {
            sink,
            body: Writer::default(),
            first: None,
            end: (0, 0),
            runs: Vec::new(),
            run: Run::None,
            stats: ChunkStats::default(),
            target,
            in_ws: false,
            ws: None,
        }
    }

    /// Holds back the chunks of `working_set` (positions in first-touch
    /// order, no repeats) to write them first (version 2), their bytes in
    /// `spool` until then.
    pub fn with_working_set(mut self, working_set: &[Pos], spool: Spool) -> Self {
        let mut h = Held_ {
            order: HashMap::new(),
            held: Vec::new(),
            spool,
        };
        for &p in working_set {
            if let std::collections::hash_map::Entry::Vacant(e) = h.order.entry(p) {
                e.insert(h.held.len());
                h.held.push((p, None));
            }
        }
        self.ws = Some(h);
        self
    }

    /// One changed chunk with its bytes (kept only for a working-set
    /// chunk whose self reference may have to become a literal).
    pub fn push_chunk(&mut self, comp: u8, chunk: u64, enc: Enc<'_>, bytes: &[u8]) -> Result<()> {
        if let Some(h) = self.ws.as_mut() {
            if let Some(&i) = h.order.get(&(comp, chunk)) {
                let held = match enc {
                    Enc::Zero => Held::Zero,
                    Enc::Ref {
                        is_self,
                        comp,
                        chunk,
                    } => Held::Ref {
                        is_self,
                        comp,
                        chunk,
                        bytes: if is_self { Some(h.keep(bytes)?) } else { None },
                    },
                    Enc::Delta(d) => Held::Delta(h.keep(d)?),
                    Enc::Literal(d) => Held::Literal(h.keep(d)?),
                };
                h.held[i].1 = Some(held);
                return Ok(());
            }
        }
        self.push(comp, chunk, enc)
    }

    /// `n` chunks equal to the base at the same position.
    pub fn unchanged(&mut self, n: u64) -> Result<()> {
        self.stats.unchanged += n;
        self.flush_run()
    }

    /// One changed chunk.
    pub fn push(&mut self, comp: u8, chunk: u64, enc: Enc<'_>) -> Result<()> {
        let extends = match (&mut self.run, enc) {
            (
                Run::Zero {
                    comp: c,
                    start,
                    count,
                },
                Enc::Zero,
            ) => *c == comp && *start + u64::from(*count) == chunk && *count < MAX_RUN,
            (
                Run::Literal {
                    comp: c,
                    start,
                    count,
                    ..
                },
                Enc::Literal(_),
            ) => *c == comp && *start + u64::from(*count) == chunk && *count < MAX_LITERAL_RUN,
            (
                Run::Ref {
                    comp: c,
                    start,
                    count,
                    is_self,
                    src_comp,
                    src,
                },
                Enc::Ref {
                    is_self: s2,
                    comp: sc2,
                    chunk: k2,
                },
            ) => {
                *c == comp
                    && *start + u64::from(*count) == chunk
                    && *is_self == s2
                    && *src_comp == sc2
                    && *src + u64::from(*count) == k2
                    && *count < MAX_RUN
            }
            _ => false,
        };
        match enc {
            Enc::Zero => self.stats.zero += 1,
            Enc::Ref { is_self: true, .. } => self.stats.ref_self += 1,
            Enc::Ref { is_self: false, .. } => self.stats.ref_base += 1,
            Enc::Delta(_) => self.stats.delta += 1,
            Enc::Literal(_) => self.stats.literal += 1,
        }
        if extends {
            match &mut self.run {
                Run::Zero { count, .. } | Run::Ref { count, .. } => *count += 1,
                Run::Literal { count, data, .. } => {
                    *count += 1;
                    if let Enc::Literal(d) = enc {
                        data.extend_from_slice(d);
                    }
                }
                Run::None => unreachable!("a run was matched"),
            }
            return Ok(());
        }
        self.flush_run()?;
        self.run = match enc {
            Enc::Zero => Run::Zero {
                comp,
                start: chunk,
                count: 1,
            },
            Enc::Literal(d) => Run::Literal {
                comp,
                start: chunk,
                count: 1,
                data: d.to_vec(),
            },
            Enc::Ref {
                is_self,
                comp: src_comp,
                chunk: src,
            } => Run::Ref {
                comp,
                start: chunk,
                count: 1,
                is_self,
                src_comp,
                src,
            },
            Enc::Delta(patch) => {
                self.note(comp, chunk, 1, false);
                self.body.delta(comp, chunk, patch);
                return self.maybe_cut();
            }
        };
        Ok(())
    }

    /// Records a run of the body: the index entry's span (the smallest
    /// start and the largest end: records may be out of position order in
    /// working-set segments) and the coverage map's runs.
    fn note(&mut self, comp: u8, start: u64, count: u32, zero: bool) {
        let end = (comp, start + u64::from(count));
        match self.first {
            None => {
                self.first = Some((comp, start));
                self.end = end;
            }
            Some(f) => {
                self.first = Some(f.min((comp, start)));
                self.end = self.end.max(end);
            }
        }
        self.runs.push(((comp, start), count, zero));
    }

    fn flush_run(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.run, Run::None) {
            Run::None => return Ok(()),
            Run::Zero { comp, start, count } => {
                self.note(comp, start, count, true);
                self.body.zero(comp, start, count);
            }
            Run::Literal {
                comp,
                start,
                count,
                data,
            } => {
                self.note(comp, start, count, false);
                self.body.literal(comp, start, count, &data);
            }
            Run::Ref {
                comp,
                start,
                count,
                is_self,
                src_comp,
                src,
            } => {
                self.note(comp, start, count, false);
                self.body
                    .reference(comp, start, count, is_self, src_comp, src);
            }
        }
        self.maybe_cut()
    }

    fn maybe_cut(&mut self) -> Result<()> {
        if self.body.buf.len() >= self.target {
            self.cut()?;
        }
        Ok(())
    }

    fn cut(&mut self) -> Result<()> {
        if let Some(first) = self.first.take() {
            let body = std::mem::take(&mut self.body);
            let runs = std::mem::take(&mut self.runs);
            self.sink
                .send_data(body.buf, first, self.end, body.records, runs, self.in_ws)?;
        }
        Ok(())
    }

    /// Flushes everything, then writes the held working-set chunks in
    /// first-touch order; returns the chunk statistics.
    pub fn finish(mut self) -> Result<ChunkStats> {
        self.flush_run()?;
        self.cut()?;
        if let Some(h) = self.ws.take() {
            self.in_ws = true;
            // Chunks written so far in the working set: a self reference
            // may only copy those (FORMAT.md section 10.2 rule 8).
            let mut sent: std::collections::HashSet<Pos> = std::collections::HashSet::new();
            let mut buf = Vec::new();
            let Held_ {
                order,
                held,
                mut spool,
            } = h;
            drop(order);
            for ((comp, chunk), one) in held {
                let Some(one) = one else { continue };
                let enc = match one {
                    Held::Zero => Enc::Zero,
                    Held::Ref {
                        is_self: true,
                        comp: sc,
                        chunk: sk,
                        bytes: Some(span),
                    } if !sent.contains(&(sc, sk)) => {
                        Enc::Literal(read_held(&mut spool, span, &mut buf)?)
                    }
                    Held::Ref {
                        is_self,
                        comp,
                        chunk,
                        ..
                    } => Enc::Ref {
                        is_self,
                        comp,
                        chunk,
                    },
                    Held::Delta(span) => Enc::Delta(read_held(&mut spool, span, &mut buf)?),
                    Held::Literal(span) => Enc::Literal(read_held(&mut spool, span, &mut buf)?),
                };
                self.push(comp, chunk, enc)?;
                sent.insert((comp, chunk));
            }
            self.flush_run()?;
            self.cut()?;
        }
        Ok(self.stats)
    }
}
