//! Turns per-chunk decisions into records (coalescing runs) and cuts the
//! record stream into segments of about the target size (4 MiB by default).

use super::writer::Sink;
use crate::error::Result;
use crate::overlay::record::{Writer, MAX_RUN};
use crate::overlay::segment::ChunkStats;
use crate::overlay::Pos;

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

/// Builds segments from chunk decisions given in position order.
pub struct SegmentBuilder<'s> {
    sink: &'s mut Sink,
    body: Writer,
    first: Option<Pos>,
    end: Pos,
    run: Run,
    stats: ChunkStats,
    target: usize,
}

impl<'s> SegmentBuilder<'s> {
    /// Starts with an empty segment.
    pub fn new(sink: &'s mut Sink, target: usize) -> Self {
        SegmentBuilder {
            sink,
            body: Writer::default(),
            first: None,
            end: (0, 0),
            run: Run::None,
            stats: ChunkStats::default(),
            target,
        }
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
                self.note(comp, chunk, 1);
                self.body.delta(comp, chunk, patch);
                return self.maybe_cut();
            }
        };
        Ok(())
    }

    fn note(&mut self, comp: u8, start: u64, count: u32) {
        if self.first.is_none() {
            self.first = Some((comp, start));
        }
        self.end = (comp, start + u64::from(count));
    }

    fn flush_run(&mut self) -> Result<()> {
        match std::mem::replace(&mut self.run, Run::None) {
            Run::None => return Ok(()),
            Run::Zero { comp, start, count } => {
                self.note(comp, start, count);
                self.body.zero(comp, start, count);
            }
            Run::Literal {
                comp,
                start,
                count,
                data,
            } => {
                self.note(comp, start, count);
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
                self.note(comp, start, count);
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
            self.sink
                .send_data(body.buf, first, self.end, body.records)?;
        }
        Ok(())
    }

    /// Flushes everything; returns the chunk statistics.
    pub fn finish(mut self) -> Result<ChunkStats> {
        self.flush_run()?;
        self.cut()?;
        Ok(self.stats)
    }
}
