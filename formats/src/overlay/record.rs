//! Chunk records: what a data segment's body is made of.

use std::ops::Range;

use super::{delta, Pos};
use crate::chunk::{chunk_count, chunk_len};
use crate::le::Reader;

/// Record opcodes (0 is invalid).
pub mod op {
    /// A run of all-zero chunks.
    pub const ZERO: u8 = 1;
    /// A run of chunks given in full.
    pub const LITERAL: u8 = 2;
    /// A run equal to a run of base chunks.
    pub const REF_BASE: u8 = 3;
    /// A run equal to an earlier run of launch chunks.
    pub const REF_SELF: u8 = 4;
    /// One chunk patched from the base chunk at the same position.
    pub const DELTA: u8 = 5;
}

/// Longest run one record may describe (64 MiB of chunks).
pub const MAX_RUN: u32 = 16384;

/// What a record does; byte ranges index the segment body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Chunks are zero.
    Zero,
    /// Chunk bytes, concatenated.
    Literal(Range<usize>),
    /// Copy base component `comp`, chunks from `chunk`.
    RefBase {
        /// Base component index.
        comp: u8,
        /// First source chunk.
        chunk: u64,
    },
    /// Copy launch component `comp`, chunks from `chunk` (strictly earlier).
    RefSelf {
        /// Launch component index.
        comp: u8,
        /// First source chunk.
        chunk: u64,
    },
    /// Patches against the base chunk at the same position.
    Delta(Range<usize>),
}

/// One record: a run of `count` launch chunks starting at `(comp, start)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Launch component index.
    pub comp: u8,
    /// First chunk.
    pub start: u64,
    /// Number of chunks (1 for a delta).
    pub count: u32,
    /// What to put there.
    pub op: Op,
}

impl Record {
    /// Position of the first chunk.
    pub fn start_pos(&self) -> Pos {
        (self.comp, self.start)
    }
    /// Position just after the last chunk.
    pub fn end_pos(&self) -> Pos {
        (self.comp, self.start + u64::from(self.count))
    }
}

/// Component sizes that records are checked against.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Geometry {
    /// Launch component sizes, by index.
    pub launch: Vec<u64>,
    /// Base component sizes, by index.
    pub base: Vec<u64>,
}

/// Why records do not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad record at byte {at}: {why}")]
pub struct RecordError {
    /// Offset in the body.
    pub at: usize,
    /// What is wrong.
    pub why: &'static str,
}

/// Parses and checks every record of a body. `after` is the position the
/// first record must not precede (the end of the previous segment's last
/// record, or `(0, 0)`), records then following in position order; `None`
/// for a working-set segment of a version-2 overlay, whose records may
/// come in any position order (FORMAT.md section 10.2 rule 6; their
/// overlaps are the coverage map's check, `overlay::map::Coverage`).
pub fn parse(body: &[u8], geo: &Geometry, after: Option<Pos>) -> Result<Vec<Record>, RecordError> {
    let mut c = Reader::new(body, "record");
    let pos = |c: &Reader<'_>| body.len() - c.remaining();
    let mut out = Vec::new();
    let ordered = after.is_some();
    let mut prev_end = after.unwrap_or((0, 0));
    while c.remaining() > 0 {
        let at = pos(&c);
        let err = |why| RecordError { at, why };
        let truncated = |_| err("truncated");
        let code = c.u8().map_err(truncated)?;
        let comp = c.u8().map_err(truncated)?;
        let start = c.u64().map_err(truncated)?;
        let size = *geo
            .launch
            .get(usize::from(comp))
            .ok_or(err("no such component"))?;
        let count = if code == op::DELTA {
            1
        } else {
            c.u32().map_err(truncated)?
        };
        if count == 0 || count > MAX_RUN {
            return Err(err("bad run length"));
        }
        let end = start
            .checked_add(u64::from(count))
            .ok_or(err("run out of range"))?;
        if end > chunk_count(size) {
            return Err(err("run past the end of its component"));
        }
        if ordered && (comp, start) < prev_end {
            return Err(err("records out of order"));
        }
        let op = match code {
            op::ZERO => Op::Zero,
            op::LITERAL => {
                let len = run_bytes(size, start, end);
                let from = pos(&c);
                c.take(len).map_err(|_| err("truncated literal"))?;
                Op::Literal(from..pos(&c))
            }
            op::REF_BASE | op::REF_SELF => {
                let src_comp = c.u8().map_err(truncated)?;
                let src = c.u64().map_err(truncated)?;
                let sizes = if code == op::REF_BASE {
                    &geo.base
                } else {
                    &geo.launch
                };
                let src_size = *sizes
                    .get(usize::from(src_comp))
                    .ok_or(err("no such source component"))?;
                let src_end = src
                    .checked_add(u64::from(count))
                    .ok_or(err("source out of range"))?;
                if src_end > chunk_count(src_size) {
                    return Err(err("source past the end of its component"));
                }
                if chunk_len(src_size, src_end - 1) != chunk_len(size, end - 1) {
                    return Err(err("source and target chunk lengths differ"));
                }
                if code == op::REF_SELF {
                    if (src_comp, src_end) > (comp, start) {
                        return Err(err("self reference is not strictly earlier"));
                    }
                    Op::RefSelf {
                        comp: src_comp,
                        chunk: src,
                    }
                } else {
                    Op::RefBase {
                        comp: src_comp,
                        chunk: src,
                    }
                }
            }
            op::DELTA => {
                let from = pos(&c);
                let n = delta::validate(c.rest(), chunk_len(size, start)).map_err(|e| err(e.0))?;
                c.take(n).map_err(truncated)?;
                Op::Delta(from..pos(&c))
            }
            _ => return Err(err("unknown record type")),
        };
        let r = Record {
            comp,
            start,
            count,
            op,
        };
        prev_end = r.end_pos();
        out.push(r);
    }
    Ok(out)
}

/// Bytes of chunks `[start, end)` of a component of `size` bytes.
pub fn run_bytes(size: u64, start: u64, end: u64) -> usize {
    let a = start * crate::chunk::CHUNK;
    let b = (end * crate::chunk::CHUNK).min(size);
    (b - a) as usize
}

/// Appends records to a body.
#[derive(Debug, Default)]
pub struct Writer {
    /// The encoded body.
    pub buf: Vec<u8>,
    /// Records written.
    pub records: u32,
}

impl Writer {
    fn head(&mut self, code: u8, comp: u8, start: u64) {
        self.buf.push(code);
        self.buf.push(comp);
        self.buf.extend_from_slice(&start.to_le_bytes());
        self.records += 1;
    }

    /// A run of zero chunks.
    pub fn zero(&mut self, comp: u8, start: u64, count: u32) {
        self.head(op::ZERO, comp, start);
        self.buf.extend_from_slice(&count.to_le_bytes());
    }

    /// A run of literal chunks (`data` holds all of them).
    pub fn literal(&mut self, comp: u8, start: u64, count: u32, data: &[u8]) {
        self.head(op::LITERAL, comp, start);
        self.buf.extend_from_slice(&count.to_le_bytes());
        self.buf.extend_from_slice(data);
    }

    /// A run copied from the base (`is_self == false`) or from earlier
    /// launch chunks (`is_self == true`).
    pub fn reference(
        &mut self,
        comp: u8,
        start: u64,
        count: u32,
        is_self: bool,
        src_comp: u8,
        src: u64,
    ) {
        self.head(
            if is_self { op::REF_SELF } else { op::REF_BASE },
            comp,
            start,
        );
        self.buf.extend_from_slice(&count.to_le_bytes());
        self.buf.push(src_comp);
        self.buf.extend_from_slice(&src.to_le_bytes());
    }

    /// A delta (as made by [`delta::encode`]).
    pub fn delta(&mut self, comp: u8, chunk: u64, patch: &[u8]) {
        self.head(op::DELTA, comp, chunk);
        self.buf.extend_from_slice(patch);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo() -> Geometry {
        Geometry {
            launch: vec![5 * 4096, 4096 + 10],
            base: vec![8192],
        }
    }

    #[test]
    fn round_trip_every_kind() {
        let mut w = Writer::default();
        w.zero(0, 0, 1);
        w.reference(0, 1, 2, false, 0, 0);
        w.delta(
            0,
            3,
            &delta::encode(
                &[0; 4096],
                &[1; 4096]
                    .map(|_| 0)
                    .iter()
                    .enumerate()
                    .map(|(i, _)| (i == 9) as u8)
                    .collect::<Vec<_>>(),
                4096,
            )
            .unwrap(),
        );
        w.literal(0, 4, 1, &[7; 4096]);
        w.reference(1, 0, 1, true, 0, 4);
        w.literal(1, 1, 1, &[1; 10]);
        let rs = parse(&w.buf, &geo(), Some((0, 0))).unwrap();
        assert_eq!(rs.len(), 6);
        assert_eq!(rs[5].op, Op::Literal(w.buf.len() - 10..w.buf.len()));
        assert_eq!(rs[4].op, Op::RefSelf { comp: 0, chunk: 4 });
    }

    #[test]
    fn refuses_bad_records() {
        let bad = |f: &dyn Fn(&mut Writer)| {
            let mut w = Writer::default();
            f(&mut w);
            parse(&w.buf, &geo(), Some((0, 0))).is_err()
        };
        assert!(bad(&|w| w.zero(2, 0, 1)));
        assert!(bad(&|w| w.zero(0, 4, 2)));
        assert!(bad(&|w| w.zero(0, 0, 0)));
        assert!(bad(&|w| {
            w.zero(0, 2, 1);
            w.zero(0, 1, 1)
        }));
        assert!(bad(&|w| w.reference(0, 0, 3, false, 0, 0)));
        assert!(bad(&|w| w.reference(0, 0, 1, true, 0, 0)));
        assert!(bad(&|w| w.reference(1, 1, 1, false, 0, 1)));
        assert!(bad(&|w| w.literal(0, 0, 1, &[1; 100])));
        assert!(parse(&[9], &geo(), Some((0, 0))).is_err());
        assert!(parse(&[], &geo(), Some((0, 0))).unwrap().is_empty());
    }
}
