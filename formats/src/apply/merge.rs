//! Builds the output components in one sequential pass: the base's data
//! extents are copied (holes stay holes), records replace chunks, and every
//! byte of the result is hashed and checked against the launch digest.
//! The working-set segments of a version-2 overlay come first and out of
//! position order: their records are held and applied when the pass
//! reaches their position (FORMAT.md section 10.5).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

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
use crate::vmdir::patched::{Patches, Piece};
use crate::vmdir::{Component, Kind, VmDir};

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
    /// The memory component's block hashes (for `memory.blocks`), when
    /// component 0 is memory.
    pub memory_blocks: Option<Vec<crate::digest::Digest>>,
}

/// Makes the output files of a merge in memory that outgrew its budget.
pub type Spill<'a> = Box<dyn FnOnce() -> Result<Vec<File>> + 'a>;

/// Where the result goes.
enum Out {
    /// Into these files (created, sized, empty).
    Files(Vec<File>),
    /// Only what differs from the base, kept in memory (the base's bytes
    /// are read and hashed, not copied).
    Memory(Vec<Patches>),
}

/// The sequential applier.
pub struct Merge<'a> {
    base_files: Vec<File>,
    base_sizes: Vec<u64>,
    base_ext: Vec<ExtentMap>,
    launch: Vec<Component>,
    paired: Vec<Option<usize>>,
    out: Out,
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
    /// In memory: at most this many bytes, then `spill`.
    budget: u64,
    spill: Option<Spill<'a>>,
    /// Records of working-set segments not applied yet, by launch
    /// position: the segment and the record's index in it.
    held: BTreeMap<(usize, u64), (Arc<Segment>, usize)>,
    /// Told what is written and held, for a VM that starts early.
    early: Option<super::early::Early>,
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
        Self::with_out(base, manifest, Out::Files(out), progress)
    }

    /// Prepares to build `manifest`'s launch components as [`Patches`] over
    /// `base`, in memory (see [`Merge::finish_patches`]). Once they would
    /// hold more than `budget` bytes, `spill` is called for the output
    /// files (created, sized, empty), what was built so far is written
    /// into them and the rest goes there too.
    pub fn in_memory(
        base: &VmDir,
        manifest: &ManifestSegment,
        progress: &'a Progress,
        budget: u64,
        spill: Spill<'a>,
    ) -> Result<Self> {
        let n = manifest.launch.len();
        let mut m = Self::with_out(
            base,
            manifest,
            Out::Memory(vec![Patches::default(); n]),
            progress,
        )?;
        m.budget = budget;
        m.spill = Some(spill);
        Ok(m)
    }

    fn with_out(
        base: &VmDir,
        manifest: &ManifestSegment,
        out: Out,
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
        let hasher = launch.first().map(|c| match c.kind {
            Kind::Memory => SparseHasher::keeping(c.size),
            _ => SparseHasher::new(c.size),
        });
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
            budget: u64::MAX,
            spill: None,
            held: BTreeMap::new(),
            early: None,
        })
    }

    /// Starts the kernel's writeback of written data as the merge goes
    /// (when the result will be fsynced anyway).
    pub fn start_writeback(&mut self, on: bool) {
        self.writeback_every = if on { WRITEBACK_EVERY } else { 0 };
    }

    /// Publishes what this merge writes and holds to `e` (a merge into
    /// files only): each segment's output is then written out as the
    /// segment ends, not coalesced across segments.
    pub fn set_early(&mut self, e: super::early::Early) -> Result<()> {
        let Out::Files(files) = &self.out else {
            return Err(Error::Invalid(
                "an early start needs a launch VM written to files".into(),
            ));
        };
        e.started(files)?;
        self.early = Some(e);
        Ok(())
    }

    /// Applies one segment's records.
    pub fn segment(&mut self, seg: Segment) -> Result<()> {
        self.segment_records(seg)?;
        if let Some(e) = self.early.clone() {
            self.flush()?;
            e.written(self.cur, self.pos);
        }
        Ok(())
    }

    fn segment_records(&mut self, seg: Segment) -> Result<()> {
        if seg.working_set {
            // Out of position order: applied when the pass gets there (the
            // coverage check made sure no two records cover one chunk).
            let seg = Arc::new(seg);
            for (i, r) in seg.records.iter().enumerate() {
                count(&mut self.stats.chunks, r);
                let at = (usize::from(r.comp), r.start);
                if at < (self.cur, self.pos.div_ceil(CHUNK)) {
                    return Err(Error::Corrupt(format!(
                        "segment {}: a working-set record behind the records already applied",
                        seg.counter
                    )));
                }
                self.held.insert(at, (Arc::clone(&seg), i));
            }
            if let Some(e) = &self.early {
                e.held(&seg);
            }
            return Ok(());
        }
        for r in &seg.records {
            count(&mut self.stats.chunks, r);
            self.apply_held((usize::from(r.comp), r.start))?;
            self.advance(usize::from(r.comp), r.start * CHUNK)?;
            self.apply(r, &seg.body)?;
        }
        Ok(())
    }

    /// Applies the held working-set records before launch position `to`.
    fn apply_held(&mut self, to: (usize, u64)) -> Result<()> {
        while let Some(e) = self.held.first_entry() {
            if *e.key() >= to {
                break;
            }
            let ((comp, start), (seg, i)) = e.remove_entry();
            self.advance(comp, start * CHUNK)?;
            self.apply(&seg.records[i], &seg.body)?;
        }
        Ok(())
    }

    /// Finishes every remaining component and checks its digest.
    pub fn finish(mut self) -> Result<MergeStats> {
        self.complete()?;
        Ok(self.stats)
    }

    /// [`Merge::finish`] for [`Merge::in_memory`]: also returns the
    /// patches, one list per launch component, checked like files are
    /// (`None` when the merge spilled into files).
    pub fn finish_patches(mut self) -> Result<(MergeStats, Option<Vec<Patches>>)> {
        self.complete()?;
        match self.out {
            Out::Memory(p) => Ok((self.stats, Some(p))),
            Out::Files(_) => Ok((self.stats, None)),
        }
    }

    /// In memory, before `n` more bytes are kept: spills into files when
    /// they would exceed the budget.
    fn keep(&mut self, n: usize) -> Result<()> {
        if matches!(self.out, Out::Memory(_))
            && self.stats.written_bytes + n as u64 > self.budget
            && self.spill.is_some()
        {
            self.spill_now()?;
        }
        Ok(())
    }

    /// Writes everything built so far (components before the current one,
    /// and the current one up to `pos`: the base's data with the patches
    /// over it) into the spill's files, which take the rest.
    fn spill_now(&mut self) -> Result<()> {
        let make = self.spill.take().expect("checked by keep");
        let files = make()?;
        let Out::Memory(patches) = std::mem::replace(&mut self.out, Out::Files(files)) else {
            unreachable!("only a merge in memory spills");
        };
        let Out::Files(files) = &self.out else {
            unreachable!("just set");
        };
        let what = || "writing the launch VM".to_string();
        // Not `self.scratch`: a caller of `emit` may hold it.
        let mut buf = vec![0u8; COPY_PIECE as usize * CHUNK_SIZE];
        for (c, list) in patches.iter().enumerate().take(self.cur + 1) {
            let limit = if c == self.cur {
                self.pos
            } else {
                self.launch[c].size
            };
            if let Some(b) = self.paired[c] {
                for (x, y) in self.base_ext[b].data_in(0, limit.min(self.base_sizes[b])) {
                    let mut at = x;
                    while at < y {
                        let n = ((y - at) as usize).min(buf.len());
                        let piece = &mut buf[..n];
                        read_at_zero_padded(&self.base_files[b], piece, at, self.base_sizes[b])
                            .ctx(|| "reading the base".into())?;
                        files[c].write_all_at(piece, at).ctx(what)?;
                        at += n as u64;
                    }
                }
            }
            for (off, piece) in list.pieces() {
                match piece {
                    Piece::Data(d) => files[c].write_all_at(d, *off),
                    Piece::Zero(n) => crate::sys::punch::punch_hole(&files[c], *off, *n),
                }
                .ctx(what)?;
            }
        }
        Ok(())
    }

    fn complete(&mut self) -> Result<()> {
        self.apply_held((usize::MAX, u64::MAX))?;
        let n = self.launch.len();
        if n > 0 {
            self.advance(n - 1, self.launch[n - 1].size)?;
            self.end_component()?;
            if let Some(e) = &self.early {
                e.written(n - 1, self.launch[n - 1].size);
            }
        }
        let total: u64 = self
            .launch
            .iter()
            .map(|c| crate::chunk::chunk_count(c.size))
            .sum();
        self.stats.chunks.unchanged = total.saturating_sub(self.stats.chunks.total());
        Ok(())
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

    /// Copies base data (same position) from `self.pos` up to `to`.
    fn copy_base(&mut self, to: u64) -> Result<()> {
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
                    let r = self.emit(at, &buf[..n], true);
                    self.scratch = buf;
                    r?;
                    at += n as u64;
                }
            }
        }
        self.progress.advance(to - from);
        self.pos = to;
        Ok(())
    }

    /// Writes (coalesced) and hashes result bytes at `off` of the current
    /// component; in memory, bytes `from_base` (at their base position) are
    /// only hashed.
    fn emit(&mut self, off: u64, data: &[u8], from_base: bool) -> Result<()> {
        if let Some(h) = self.hasher.as_mut() {
            h.feed(off, data);
        }
        if from_base && matches!(self.out, Out::Memory(_)) {
            return Ok(());
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
        self.keep(data.len())?;
        let files = match &mut self.out {
            Out::Files(f) => f,
            Out::Memory(p) => {
                p[self.cur].push(off, Piece::Data(data.to_vec()));
                self.stats.written_bytes += data.len() as u64;
                return Ok(());
            }
        };
        files[self.cur]
            .write_all_at(data, off)
            .ctx(|| "writing the launch VM".into())?;
        self.stats.written_bytes += data.len() as u64;
        self.unsynced += data.len() as u64;
        if self.writeback_every > 0 && self.unsynced >= self.writeback_every {
            self.unsynced = 0;
            use std::os::fd::AsRawFd;
            crate::sys::file::start_writeback(files[self.cur].as_raw_fd());
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        self.keep(self.wbuf.len())?;
        if let Out::Memory(p) = &mut self.out {
            // A full buffer becomes the piece (no copy); a short one is
            // copied out at its length and the buffer kept: a piece must
            // not hold WRITE_BUF of capacity for a few pages (thousands of
            // scattered changes reserved tens of GiB, and a fork then
            // failed with ENOMEM).
            let data = if self.wbuf.len() >= WRITE_BUF / 2 {
                std::mem::replace(&mut self.wbuf, Vec::with_capacity(WRITE_BUF))
            } else {
                let d = self.wbuf.as_slice().to_vec();
                self.wbuf.clear();
                d
            };
            self.stats.written_bytes += data.len() as u64;
            p[self.cur].push(self.wbuf_off, Piece::Data(data));
            return Ok(());
        }
        let buf = std::mem::take(&mut self.wbuf);
        self.write_out(self.wbuf_off, &buf)?;
        self.wbuf = buf;
        self.wbuf.clear();
        Ok(())
    }

    fn end_component(&mut self) -> Result<()> {
        self.flush()?;
        let h = self.hasher.take().expect("a component is open");
        let (digest, blocks) = h.finish_kept();
        if self.cur == 0 {
            self.stats.memory_blocks = blocks;
        }
        if digest != self.launch[self.cur].digest {
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
                // In memory, the base's bytes there must be covered.
                if matches!(self.out, Out::Memory(_)) {
                    self.flush()?;
                    if let Out::Memory(p) = &mut self.out {
                        p[self.cur].push(start, Piece::Zero(end - start));
                    }
                }
            }
            Op::Literal(range) => {
                let data = &body[range.clone()];
                debug_assert_eq!(data.len(), run_bytes(size, r.start, end_chunk));
                self.emit(start, data, false)?;
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
                let res = self.emit(start, chunk, false);
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
                    let rd = self
                        .read_source(
                            is_self,
                            usize::from(comp),
                            &mut buf[..n],
                            (chunk + k) * CHUNK,
                        )
                        .ctx(|| "reading a copy source".into());
                    let res = rd.and_then(|_| self.emit(dst, &buf[..n], false));
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

    /// Reads a copy's source: base component `comp`, or (`is_self`) launch
    /// component `comp` as built so far.
    fn read_source(
        &self,
        is_self: bool,
        comp: usize,
        buf: &mut [u8],
        off: u64,
    ) -> std::io::Result<()> {
        if !is_self {
            return read_at_zero_padded(&self.base_files[comp], buf, off, self.base_sizes[comp]);
        }
        let size = self.launch[comp].size;
        match &self.out {
            Out::Files(f) => read_at_zero_padded(&f[comp], buf, off, size),
            Out::Memory(p) => {
                // The launch component so far: its base's bytes under what
                // replaced them.
                match self.paired[comp] {
                    Some(b) => read_at_zero_padded(
                        &self.base_files[b],
                        buf,
                        off,
                        self.base_sizes[b].min(size),
                    )?,
                    None => buf.fill(0),
                }
                p[comp].overlay(buf, off);
                Ok(())
            }
        }
    }
}
