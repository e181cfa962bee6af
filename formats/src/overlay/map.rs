//! The coverage map (FORMAT.md section 10.5): which data segment carries
//! each changed launch range, where each segment starts, and where the
//! working set ends; and the check that the segments deliver exactly that.

use std::collections::BTreeMap;

use super::frame::{FRAME_HEADER_LEN, MAX_SEALED};
use super::record::{Op, Record};
use super::segment::MAX_BODY;
use super::Pos;
use crate::chunk::chunk_count;
use crate::error::{Error, Result};
use crate::le::{Reader, Writer};

/// Most data segments an overlay may have (what one index can list).
pub const MAX_SEGMENTS: u32 = ((MAX_BODY - 52) / 46) as u32;
/// Encoded length of a segment entry.
pub const SEGMENT_ENTRY_LEN: usize = 12;
/// Encoded length of a range entry.
pub const RANGE_ENTRY_LEN: usize = 18;
/// Most ranges a map body (at most [`MAX_BODY`] bytes) can hold.
pub const MAX_RANGES: usize = (MAX_BODY - 12) / RANGE_ENTRY_LEN;

fn corrupt(why: impl std::fmt::Display) -> Error {
    Error::Corrupt(format!("coverage map: {why}"))
}

/// What the map says about one data segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentInfo {
    /// Frame header + sealed bytes.
    pub frame_len: u32,
    /// Decompressed body length.
    pub body_len: u32,
    /// Number of records.
    pub records: u32,
}

/// A run of changed chunks of one component, all carried by one segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRange {
    /// Launch component index.
    pub comp: u8,
    /// First chunk.
    pub start: u64,
    /// Number of chunks.
    pub count: u32,
    /// Ordinal of the data segment carrying it (counter − 2).
    pub segment: u32,
    /// Covered by ZERO records: servable as zeros before it arrives.
    pub zero: bool,
}

impl MapRange {
    /// Position just after the range.
    pub fn end_pos(&self) -> Pos {
        (self.comp, self.start + u64::from(self.count))
    }
}

/// Where a launch chunk's content comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Location {
    /// Equal to the reference image (the base): servable now.
    Unchanged,
    /// All zero: servable now (its record still arrives and is checked).
    Zero,
    /// Carried by the data segment of this ordinal (counter − 2).
    InSegment(u32),
}

/// A data segment's place in the overlay, for a reader that seeks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSpan {
    /// Its STREAM counter.
    pub counter: u64,
    /// Offset of its frame header from the start of the overlay.
    pub offset: u64,
    /// Frame header + sealed bytes.
    pub frame_len: u32,
}

/// The decoded coverage map.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CoverageMap {
    /// Data segments before the working-set mark.
    pub ws_segments: u32,
    /// One entry per data segment, in stream order.
    pub segments: Vec<SegmentInfo>,
    /// Changed ranges in position order.
    pub ranges: Vec<MapRange>,
}

impl CoverageMap {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer::with_capacity(
            12 + self.segments.len() * SEGMENT_ENTRY_LEN + self.ranges.len() * RANGE_ENTRY_LEN,
        );
        w.u32(self.segments.len() as u32);
        w.u32(self.ws_segments);
        for s in &self.segments {
            w.u32(s.frame_len);
            w.u32(s.body_len);
            w.u32(s.records);
        }
        w.u32(self.ranges.len() as u32);
        for r in &self.ranges {
            w.u8(r.comp);
            w.u64(r.start);
            w.u32(r.count);
            w.u32(r.segment);
            w.u8(u8::from(r.zero));
        }
        w.into_inner()
    }

    /// Decodes and checks a body (reader obligations 1–6 of section 10.5)
    /// for launch components of `launch` sizes, sealed with a tag of
    /// `tag_len` bytes. Every allocation is bounded by the body's length.
    pub fn decode(body: &[u8], launch: &[u64], tag_len: usize) -> Result<CoverageMap> {
        let mut c = Reader::new(body, "coverage map");
        let short = |_| corrupt("truncated");
        let n = c.u32().map_err(short)?;
        let ws_segments = c.u32().map_err(short)?;
        if n > MAX_SEGMENTS {
            return Err(corrupt(format!("{n} segments exceed the cap")));
        }
        if ws_segments > n {
            return Err(corrupt("working-set mark past the last segment"));
        }
        let table = (n as usize) * SEGMENT_ENTRY_LEN;
        if c.remaining() < table + 4 {
            return Err(corrupt("segment table cut short"));
        }
        let min_frame = FRAME_HEADER_LEN + tag_len;
        let mut segments = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let s = SegmentInfo {
                frame_len: c.u32().map_err(short)?,
                body_len: c.u32().map_err(short)?,
                records: c.u32().map_err(short)?,
            };
            if (s.frame_len as usize) < min_frame
                || u64::from(s.frame_len) > FRAME_HEADER_LEN as u64 + u64::from(MAX_SEALED)
                || s.body_len == 0
                || s.body_len as usize > MAX_BODY
                || s.records == 0
            {
                return Err(corrupt("bad segment entry"));
            }
            segments.push(s);
        }
        let m = c.u32().map_err(short)? as usize;
        if m.checked_mul(RANGE_ENTRY_LEN) != Some(c.remaining()) {
            return Err(corrupt("range table length"));
        }
        let mut ranges: Vec<MapRange> = Vec::with_capacity(m);
        let mut named = vec![false; n as usize];
        for _ in 0..m {
            let r = MapRange {
                comp: c.u8().map_err(short)?,
                start: c.u64().map_err(short)?,
                count: c.u32().map_err(short)?,
                segment: c.u32().map_err(short)?,
                zero: match c.u8().map_err(short)? {
                    0 => false,
                    1 => true,
                    _ => return Err(corrupt("reserved range flags")),
                },
            };
            let size = *launch
                .get(usize::from(r.comp))
                .ok_or_else(|| corrupt("range in no component"))?;
            let end = r.start.checked_add(u64::from(r.count));
            if r.count == 0 || end.is_none_or(|e| e > chunk_count(size)) {
                return Err(corrupt("range outside its component"));
            }
            if r.segment >= n {
                return Err(corrupt("range names no segment"));
            }
            if let Some(p) = ranges.last() {
                if (r.comp, r.start) < p.end_pos() {
                    return Err(corrupt("ranges out of order or overlapping"));
                }
                if (r.comp, r.start) == p.end_pos() && r.segment == p.segment && r.zero == p.zero {
                    return Err(corrupt("touching ranges not merged"));
                }
            }
            named[r.segment as usize] = true;
            ranges.push(r);
        }
        if let Some(s) = named.iter().position(|&x| !x) {
            return Err(corrupt(format!("data segment {s} carries no range")));
        }
        Ok(CoverageMap {
            ws_segments,
            segments,
            ranges,
        })
    }

    /// Index of the range holding `(comp, chunk)`, if any.
    fn find(&self, comp: u8, chunk: u64) -> Option<usize> {
        let i = self
            .ranges
            .partition_point(|r| (r.comp, r.start) <= (comp, chunk));
        let r = self.ranges.get(i.checked_sub(1)?)?;
        (r.comp == comp && chunk < r.start + u64::from(r.count)).then_some(i - 1)
    }

    /// Where chunk `chunk` of launch component `comp` comes from.
    pub fn locate(&self, comp: u8, chunk: u64) -> Location {
        match self.find(comp, chunk).map(|i| self.ranges[i]) {
            None => Location::Unchanged,
            Some(r) if r.zero => Location::Zero,
            Some(r) => Location::InSegment(r.segment),
        }
    }

    /// Where byte `offset` of launch component `comp` comes from (a
    /// guest-physical address of the memory, a disk offset).
    pub fn locate_offset(&self, comp: u8, offset: u64) -> Location {
        self.locate(comp, offset / crate::chunk::CHUNK)
    }

    /// Where data segment `s` is, given `data_start`, the offset just
    /// after the map's frame (where the first data segment starts).
    pub fn segment_span(&self, s: u32, data_start: u64) -> Option<SegmentSpan> {
        let info = self.segments.get(s as usize)?;
        let before: u64 = self.segments[..s as usize]
            .iter()
            .map(|x| u64::from(x.frame_len))
            .sum();
        Some(SegmentSpan {
            counter: u64::from(s) + 2,
            offset: data_start + before,
            frame_len: info.frame_len,
        })
    }

    /// True when data segment `s` carries the working set.
    pub fn is_working_set(&self, s: u32) -> bool {
        s < self.ws_segments
    }

    /// Builds the map from each segment's info and runs (in stream
    /// order): `runs[s]` lists segment `s`'s record runs as
    /// `(position, count, zero)`. Touching runs of one segment and kind
    /// are merged; the ranges are sorted by position.
    pub fn build(
        ws_segments: u32,
        segments: Vec<SegmentInfo>,
        runs: &[Vec<(Pos, u32, bool)>],
    ) -> CoverageMap {
        let mut all: Vec<MapRange> = runs
            .iter()
            .enumerate()
            .flat_map(|(s, rs)| {
                rs.iter()
                    .map(move |&((comp, start), count, zero)| MapRange {
                        comp,
                        start,
                        count,
                        segment: s as u32,
                        zero,
                    })
            })
            .collect();
        all.sort_by_key(|r| (r.comp, r.start));
        let mut ranges: Vec<MapRange> = Vec::with_capacity(all.len());
        for r in all {
            if let Some(p) = ranges.last_mut() {
                if p.end_pos() == (r.comp, r.start)
                    && p.segment == r.segment
                    && p.zero == r.zero
                    && u64::from(p.count) + u64::from(r.count) <= u64::from(u32::MAX)
                {
                    p.count += r.count;
                    continue;
                }
            }
            ranges.push(r);
        }
        CoverageMap {
            ws_segments,
            segments,
            ranges,
        }
    }
}

/// Checks, segment by segment in stream order, that the data segments
/// deliver exactly what the map says (section 10.5, obligations 7–12).
#[derive(Debug)]
pub struct Coverage<'m> {
    map: &'m CoverageMap,
    /// Delivered chunks: start position → end chunk, touching runs merged.
    delivered: BTreeMap<Pos, u64>,
    delivered_chunks: u64,
    next: u32,
}

impl<'m> Coverage<'m> {
    /// Starts with nothing delivered.
    pub fn new(map: &'m CoverageMap) -> Self {
        Coverage {
            map,
            delivered: BTreeMap::new(),
            delivered_chunks: 0,
            next: 0,
        }
    }

    /// True when the whole run `[(comp, start), (comp, end))` is delivered.
    fn is_delivered(&self, comp: u8, start: u64, end: u64) -> bool {
        self.delivered
            .range(..=(comp, start))
            .next_back()
            .is_some_and(|(&(c, s), &e)| c == comp && s <= start && end <= e)
    }

    /// Marks a run delivered; false when any of it already was.
    fn deliver(&mut self, comp: u8, start: u64, end: u64) -> bool {
        let mut a = start;
        let mut b = end;
        if let Some((&(c, s), &e)) = self.delivered.range(..=(comp, start)).next_back() {
            if c == comp && e > start {
                return false;
            }
            if c == comp && e == start {
                a = s;
            }
        }
        if let Some((&(c, s), &e)) = self.delivered.range((comp, start)..).next() {
            if c == comp && s < end {
                return false;
            }
            if c == comp && s == end {
                self.delivered.remove(&(c, s));
                b = e;
            }
        }
        self.delivered.insert((comp, a), b);
        self.delivered_chunks += end - start;
        true
    }

    /// Checks the next data segment (`frame_len` and `body_len` as read,
    /// `records` as parsed), then counts its records as delivered.
    pub fn segment(&mut self, frame_len: u64, body_len: usize, records: &[Record]) -> Result<()> {
        let s = self.next;
        let info = self
            .map
            .segments
            .get(s as usize)
            .ok_or_else(|| corrupt(format!("data segment {s} is not listed")))?;
        if u64::from(info.frame_len) != frame_len
            || info.body_len as usize != body_len
            || info.records as usize != records.len()
        {
            return Err(corrupt(format!(
                "data segment {s} differs from its entry (length or records)"
            )));
        }
        for r in records {
            let end = r.start + u64::from(r.count);
            let listed = self.map.find(r.comp, r.start).map(|i| self.map.ranges[i]);
            let ok = listed.is_some_and(|m| {
                m.segment == s && m.zero == (r.op == Op::Zero) && (r.comp, end) <= m.end_pos()
            });
            if !ok {
                return Err(corrupt(format!(
                    "data segment {s} carries chunks {}:{}..{} that the map does not list there",
                    r.comp, r.start, end
                )));
            }
            if let Op::RefSelf { comp, chunk } = r.op {
                if !self.is_delivered(comp, chunk, chunk + u64::from(r.count)) {
                    return Err(corrupt(format!(
                        "data segment {s}: a self reference to chunks {comp}:{chunk} not delivered earlier in the stream"
                    )));
                }
            }
            if !self.deliver(r.comp, r.start, end) {
                return Err(corrupt(format!(
                    "data segment {s} delivers chunks {}:{}..{} twice",
                    r.comp, r.start, end
                )));
            }
        }
        self.next += 1;
        Ok(())
    }

    /// After the last data segment: every listed segment and chunk came.
    pub fn finish(&self) -> Result<()> {
        if self.next as usize != self.map.segments.len() {
            return Err(corrupt(format!(
                "lists {} data segments, the overlay has {}",
                self.map.segments.len(),
                self.next
            )));
        }
        let listed: u64 = self.map.ranges.iter().map(|r| u64::from(r.count)).sum();
        if listed != self.delivered_chunks {
            return Err(corrupt("a listed range was never delivered"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::overlay::record::{parse, Geometry, Writer as RecWriter};

    fn info() -> SegmentInfo {
        SegmentInfo {
            frame_len: 100,
            body_len: 50,
            records: 1,
        }
    }

    fn sample() -> CoverageMap {
        CoverageMap::build(
            1,
            vec![info(), info()],
            &[
                vec![((0, 5), 2, false), ((0, 7), 1, false)],
                vec![((0, 0), 3, true), ((1, 0), 1, false)],
            ],
        )
    }

    #[test]
    fn round_trip_and_queries() {
        let m = sample();
        assert_eq!(m.ranges.len(), 3, "touching runs of one segment merge");
        let launch = [10 * 4096, 4096];
        assert_eq!(CoverageMap::decode(&m.encode(), &launch, 16).unwrap(), m);
        assert_eq!(m.locate(0, 0), Location::Zero);
        assert_eq!(m.locate(0, 3), Location::Unchanged);
        assert_eq!(m.locate(0, 7), Location::InSegment(0));
        assert_eq!(m.locate_offset(0, 7 * 4096 + 4095), Location::InSegment(0));
        assert_eq!(m.locate_offset(0, 8 * 4096), Location::Unchanged);
        assert_eq!(m.locate(1, 0), Location::InSegment(1));
        assert_eq!(m.locate(2, 0), Location::Unchanged);
        let sp = m.segment_span(1, 1000).unwrap();
        assert_eq!((sp.counter, sp.offset, sp.frame_len), (3, 1100, 100));
        assert!(m.segment_span(2, 0).is_none());
        assert!(m.is_working_set(0) && !m.is_working_set(1));
    }

    #[test]
    fn refuses_bad_maps() {
        let launch = [10 * 4096, 4096];
        let bad = |m: &CoverageMap| CoverageMap::decode(&m.encode(), &launch, 16).is_err();
        let mut m = sample();
        m.ranges[0].count = 9;
        assert!(bad(&m), "overlapping ranges");
        let mut m = sample();
        m.ranges[2].comp = 2;
        assert!(bad(&m), "no such component");
        let mut m = sample();
        m.ranges[1].segment = 5;
        assert!(bad(&m), "no such segment");
        let mut m = sample();
        m.ws_segments = 3;
        assert!(bad(&m), "mark past the end");
        let mut m = sample();
        m.ranges.remove(1);
        assert!(bad(&m), "a segment without ranges");
        let b = sample().encode();
        for cut in [0, 7, 20, b.len() - 1] {
            assert!(CoverageMap::decode(&b[..cut], &launch, 16).is_err());
        }
        // A count over the cap is refused before anything is allocated.
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(CoverageMap::decode(&huge, &launch, 16).is_err());
    }

    #[test]
    fn coverage_checks_what_segments_deliver() {
        let geo = Geometry {
            launch: vec![10 * 4096, 4096],
            base: vec![],
        };
        let seg0 = {
            let mut w = RecWriter::default();
            w.literal(0, 7, 1, &[1; 4096]);
            w.literal(0, 5, 2, &[2; 8192]);
            w.buf
        };
        let seg1 = {
            let mut w = RecWriter::default();
            w.zero(0, 0, 3);
            w.reference(1, 0, 1, true, 0, 7);
            w.buf
        };
        let mut m = sample();
        m.segments[0].records = 2;
        m.segments[1].records = 2;
        let recs0 = parse(&seg0, &geo, None).unwrap();
        let recs1 = parse(&seg1, &geo, Some((0, 0))).unwrap();
        let mut c = Coverage::new(&m);
        c.segment(100, 50, &recs0).unwrap();
        c.segment(100, 50, &recs1).unwrap();
        c.finish().unwrap();
        // Never delivered.
        let mut c = Coverage::new(&m);
        c.segment(100, 50, &recs0).unwrap();
        assert!(c.finish().is_err());
        // Delivered in the wrong segment.
        let mut c = Coverage::new(&m);
        assert!(c.segment(100, 50, &recs1).is_err());
    }
}
