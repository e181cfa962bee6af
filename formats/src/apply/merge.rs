//! Builds the output components in one sequential pass: the base's data
//! extents are copied (holes stay holes), records replace chunks, and every
//! byte of the result is hashed and checked against the launch digest.
//! The working-set segments of a version-2 overlay come first and out of
//! position order: their records are written where they belong at once,
//! and the sequential pass later hashes those ranges from the output
//! instead of copying the base over them.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;

use super::decode::Segment;
use crate::chunk::{chunk_len, CHUNK, CHUNK_SIZE};
use crate::diff::classify::paired;
use crate::digest::SparseHasher;
use crate::error::{Error, IoContext, Result};
use crate::fsutil::read_at_zero_padded;
use crate::overlay::delta;
use crate::overlay::record::{run_bytes, Op, Record};
use crate::overlay::segment::{ChunkStats, ManifestSegment};
use crate::progress::Progress;
use crate::sparse::{data_extents, ExtentMap};
use crate::vmdir::{Component, VmDir};

/// Coalesced output writes.
const WRITE_BUF: usize = 8 << 20;
/// Reference runs are copied in pieces of this many chunks.
const COPY_PIECE: u64 = 256;

/// Adds a record's chunks to the statistics.
pub fn count(s: &mut ChunkStats, r: &Record) {
    let n = u64::from(r.count);
    match r.op {
        Op::Zero => s.zero += n,
        Op::Literal(_) => s.literal += n,
        Op::RefBase { .. } => s.ref_base += n,
        Op::RefSelf { .. } => s.ref_self += n,
        Op::Delta(_) => s.delta += n,
    }
}

/// Totals of a merge.
#[derive(Debug, Default)]
pub struct MergeStats {
    /// Chunk statistics derived from the records.
    pub chunks: ChunkStats,
    /// Bytes written (holes excluded).
    pub written_bytes: u64,
}

/// The sequential applier.
pub struct Merge<'a> {
    base_files: Vec<File>,
    base_sizes: Vec<u64>,
    base_ext: Vec<ExtentMap>,
    launch: Vec<Component>,
    paired: Vec<Option<usize>>,
    out: Vec<File>,
    /// Component being produced, and bytes of it finished.
    cur: usize,
    pos: u64,
    hasher: Option<SparseHasher>,
    /// Pending contiguous write: (offset, bytes) in component `cur`.
    wbuf_off: u64,
    wbuf: Vec<u8>,
    scratch: Vec<u8>,
    stats: MergeStats,
    progress: &'a Progress,
    /// Start writeback every this many bytes (0: never).
    writeback_every: u64,
    unsynced: u64,
    /// Byte ranges already written by working-set records:
    /// (component, start) → end.
    done: BTreeMap<(usize, u64), u64>,
}

/// Writeback is started after this many bytes, so the final fsync finds
/// little left to do and the disk works while records are applied.
const WRITEBACK_EVERY: u64 = 64 << 20;

impl<'a> Merge<'a> {
    /// Prepares to build `manifest`'s launch components into `out` (created,
    /// sized, empty) from `base`.
    pub fn new(
        base: &VmDir,
        manifest: &ManifestSegment,
        out: Vec<File>,
        progress: &'a Progress,
    ) -> Result<Self> {
        let mut base_files = Vec::new();
        let mut base_ext = Vec::new();
        let mut base_sizes = Vec::new();
        for (i, c) in base.manifest.components.iter().enumerate() {
            let f = base.open_component(i)?;
            base_ext
                .push(ExtentMap::new(data_extents(&f, c.size).ctx(|| {
                    format!("reading {}", base.component_path(i).display())
                })?));
            base_files.push(f);
            base_sizes.push(c.size);
        }
        let lm = manifest.launch_manifest();
        let paired = (0..lm.components.len())
            .map(|i| paired(&base.manifest, &lm, i))
            .collect();
        let launch = manifest.launch.clone();
        let hasher = launch.first().map(|c| SparseHasher::new(c.size));
        Ok(Merge {
            base_files,
            base_sizes,
            base_ext,
            launch,
            paired,
            out,
            cur: 0,
            pos: 0,
            hasher,
            wbuf_off: 0,
            wbuf: Vec::with_capacity(WRITE_BUF),
            scratch: vec![0u8; COPY_PIECE as usize * CHUNK_SIZE],
            stats: MergeStats::default(),
            progress,
            writeback_every: 0,
            unsynced: 0,
            done: BTreeMap::new(),
        })
    }

    /// Starts the kernel's writeback of written data as the merge goes
    /// (when the result will be fsynced anyway).
    pub fn start_writeback(&mut self, on: bool) {
        self.writeback_every = if on { WRITEBACK_EVERY } else { 0 };
    }

    /// Applies one segment's records.
    pub fn segment(&mut self, seg: Segment) -> Result<()> {
        if seg.working_set {
            for r in &seg.records {
                count(&mut self.stats.chunks, r);
                self.apply_in_place(r, &seg.body)?;
            }
            return Ok(());
        }
        for r in &seg.records {
            count(&mut self.stats.chunks, r);
            self.advance(usize::from(r.comp), r.start * CHUNK)?;
            self.apply(r, &seg.body)?;
        }
        Ok(())
    }

    /// Finishes every remaining component and checks its digest.
    pub fn finish(mut self) -> Result<MergeStats> {
        let n = self.launch.len();
        if n > 0 {
            self.advance(n - 1, self.launch[n - 1].size)?;
            self.end_component()?;
        }
        let total: u64 = self
            .launch
            .iter()
            .map(|c| crate::chunk::chunk_count(c.size))
            .sum();
        self.stats.chunks.unchanged = total.saturating_sub(self.stats.chunks.total());
        Ok(self.stats)
    }

    /// Completes everything before byte `off` of component `comp`.
    fn advance(&mut self, comp: usize, off: u64) -> Result<()> {
        while self.cur < comp {
            let size = self.launch[self.cur].size;
            self.copy_base(size)?;
            self.end_component()?;
            self.cur += 1;
            self.pos = 0;
            self.hasher = Some(SparseHasher::new(self.launch[self.cur].size));
        }
        self.copy_base(off)
    }

    /// Completes `[self.pos, to)`: base data, except where working-set
    /// records already wrote the result, which is hashed from the output.
    fn copy_base(&mut self, to: u64) -> Result<()> {
        let cur = self.cur;
        let ranges: Vec<(u64, u64)> = self
            .done
            .range((cur, 0)..(cur, to))
            .map(|(&(_, a), &b)| (a, b))
            .filter(|&(_, b)| b > self.pos)
            .collect();
        for (a, b) in ranges {
            self.copy_base_only(a.max(self.pos))?;
            let b = b.min(to);
            self.hash_written(self.pos, b)?;
            self.progress.advance(b - self.pos);
            self.pos = b;
        }
        self.copy_base_only(to)
    }

    /// Hashes result bytes `[a, b)` of the current component that are
    /// already in the output file.
    fn hash_written(&mut self, a: u64, b: u64) -> Result<()> {
        let size = self.launch[self.cur].size;
        let mut at = a;
        while at < b {
            let n = ((b - at) as usize).min(self.scratch.len());
            let mut buf = std::mem::take(&mut self.scratch);
            let rd = read_at_zero_padded(&self.out[self.cur], &mut buf[..n], at, size)
                .ctx(|| "reading back the launch VM".into());
            if rd.is_ok() {
                if let Some(h) = self.hasher.as_mut() {
                    h.feed(at, &buf[..n]);
                }
            }
            self.scratch = buf;
            rd?;
            at += n as u64;
        }
        Ok(())
    }

    /// Applies a working-set record where it belongs, now (its output
    /// range is hashed when the sequential pass reaches it).
    fn apply_in_place(&mut self, r: &Record, body: &[u8]) -> Result<()> {
        let comp = usize::from(r.comp);
        let size = self.launch[comp].size;
        let end_chunk = r.start + u64::from(r.count);
        let (start, end) = (r.start * CHUNK, (end_chunk * CHUNK).min(size));
        let file = &self.out[comp];
        let write = |data: &[u8], off: u64| {
            file.write_all_at(data, off)
                .ctx(|| "writing the launch VM".into())
        };
        match &r.op {
            // The output is a fresh sparse file: zeros are a hole.
            Op::Zero => {}
            Op::Literal(range) => write(&body[range.clone()], start)?,
            Op::Delta(range) => {
                let len = chunk_len(size, r.start);
                let mut chunk = vec![0u8; len];
                if let Some(p) = self.paired[comp] {
                    read_at_zero_padded(&self.base_files[p], &mut chunk, start, self.base_sizes[p])
                        .ctx(|| "reading the base".into())?;
                }
                delta::apply(&body[range.clone()], &mut chunk);
                write(&chunk, start)?;
            }
            &Op::RefBase { comp: sc, chunk } | &Op::RefSelf { comp: sc, chunk } => {
                // A self reference copies chunks written earlier in the
                // stream (the coverage check made sure of it).
                let (src, ssize) = if matches!(r.op, Op::RefSelf { .. }) {
                    (
                        &self.out[usize::from(sc)],
                        self.launch[usize::from(sc)].size,
                    )
                } else {
                    (
                        &self.base_files[usize::from(sc)],
                        self.base_sizes[usize::from(sc)],
                    )
                };
                let mut buf = vec![0u8; (end - start) as usize];
                read_at_zero_padded(src, &mut buf, chunk * CHUNK, ssize)
                    .ctx(|| "reading a copy source".into())?;
                write(&buf, start)?;
            }
        }
        self.stats.written_bytes += if r.op == Op::Zero { 0 } else { end - start };
        self.done.insert((comp, start), end);
        Ok(())
    }

    /// Copies base data (same position) from `self.pos` up to `to`.
    fn copy_base_only(&mut self, to: u64) -> Result<()> {
        let from = self.pos;
        if to <= from {
            return Ok(());
        }
        if let Some(p) = self.paired[self.cur] {
            let bsize = self.base_sizes[p];
            let ranges: Vec<(u64, u64)> = self.base_ext[p].data_in(from, to.min(bsize)).collect();
            for (a, b) in ranges {
                let mut at = a;
                while at < b {
                    let n = ((b - at) as usize).min(self.scratch.len());
                    let mut buf = std::mem::take(&mut self.scratch);
                    read_at_zero_padded(&self.base_files[p], &mut buf[..n], at, bsize)
                        .ctx(|| "reading the base".into())?;
                    self.emit(at, &buf[..n])?;
                    self.scratch = buf;
                    at += n as u64;
                }
            }
        }
        self.progress.advance(to - from);
        self.pos = to;
        Ok(())
    }

    /// Writes (coalesced) and hashes result bytes at `off` of the current
    /// component.
    fn emit(&mut self, off: u64, data: &[u8]) -> Result<()> {
        if let Some(h) = self.hasher.as_mut() {
            h.feed(off, data);
        }
        if self.wbuf.is_empty() {
            self.wbuf_off = off;
        } else if self.wbuf_off + self.wbuf.len() as u64 != off
            || self.wbuf.len() + data.len() > WRITE_BUF
        {
            self.flush()?;
            self.wbuf_off = off;
        }
        if data.len() >= WRITE_BUF {
            self.write_out(off, data)?;
        } else {
            self.wbuf.extend_from_slice(data);
        }
        Ok(())
    }

    fn write_out(&mut self, off: u64, data: &[u8]) -> Result<()> {
        self.out[self.cur]
            .write_all_at(data, off)
            .ctx(|| "writing the launch VM".into())?;
        self.stats.written_bytes += data.len() as u64;
        self.unsynced += data.len() as u64;
        if self.writeback_every > 0 && self.unsynced >= self.writeback_every {
            self.unsynced = 0;
            use std::os::fd::AsRawFd;
            crate::sys::file::start_writeback(self.out[self.cur].as_raw_fd());
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if !self.wbuf.is_empty() {
            let buf = std::mem::take(&mut self.wbuf);
            self.write_out(self.wbuf_off, &buf)?;
            self.wbuf = buf;
            self.wbuf.clear();
        }
        Ok(())
    }

    fn end_component(&mut self) -> Result<()> {
        self.flush()?;
        let h = self.hasher.take().expect("a component is open");
        if h.finish() != self.launch[self.cur].digest {
            return Err(Error::Mismatch(format!(
                "launch component {} does not match its digest (the base differs from the one the overlay was made from, or the overlay is wrong)",
                self.cur
            )));
        }
        Ok(())
    }

    fn apply(&mut self, r: &Record, body: &[u8]) -> Result<()> {
        let size = self.launch[self.cur].size;
        let start = r.start * CHUNK;
        let end_chunk = r.start + u64::from(r.count);
        let end = (end_chunk * CHUNK).min(size);
        match &r.op {
            Op::Zero => {
                // The output is a fresh sparse file: leaving the range
                // unwritten makes it zero (a hole), and gaps hash as zeros.
            }
            Op::Literal(range) => {
                let data = &body[range.clone()];
                debug_assert_eq!(data.len(), run_bytes(size, r.start, end_chunk));
                self.emit(start, data)?;
            }
            Op::Delta(range) => {
                let len = chunk_len(size, r.start);
                let mut buf = std::mem::take(&mut self.scratch);
                let chunk = &mut buf[..len];
                match self.paired[self.cur] {
                    Some(p) => {
                        read_at_zero_padded(&self.base_files[p], chunk, start, self.base_sizes[p])
                            .ctx(|| "reading the base".into())?
                    }
                    None => chunk.fill(0),
                }
                delta::apply(&body[range.clone()], chunk);
                let res = self.emit(start, chunk);
                self.scratch = buf;
                res?;
            }
            &Op::RefBase { comp, chunk } | &Op::RefSelf { comp, chunk } => {
                let is_self = matches!(r.op, Op::RefSelf { .. });
                if is_self {
                    self.flush()?;
                }
                let mut k = 0u64;
                while k < u64::from(r.count) {
                    let piece = (u64::from(r.count) - k).min(COPY_PIECE);
                    let dst = (r.start + k) * CHUNK;
                    let n = run_bytes(size, r.start + k, r.start + k + piece);
                    let mut buf = std::mem::take(&mut self.scratch);
                    let (file, fsize) = if is_self {
                        (
                            &self.out[usize::from(comp)],
                            self.launch[usize::from(comp)].size,
                        )
                    } else {
                        (
                            &self.base_files[usize::from(comp)],
                            self.base_sizes[usize::from(comp)],
                        )
                    };
                    let rd = read_at_zero_padded(file, &mut buf[..n], (chunk + k) * CHUNK, fsize)
                        .ctx(|| "reading a copy source".into());
                    let res = rd.and_then(|_| self.emit(dst, &buf[..n]));
                    self.scratch = buf;
                    res?;
                    k += piece;
                }
            }
        }
        self.progress.advance(end - start);
        self.pos = end;
        Ok(())
    }
}
