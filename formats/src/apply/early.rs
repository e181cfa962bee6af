//! Early start: the launch VM read while its overlay is still being
//! applied, from what has arrived (FORMAT.md section 10.5's coverage map
//! says what is unchanged, zero, or carried by which segment).
//!
//! A chunk of a launch component is served, in this order: from the output
//! file once the merge has written it for good; from a working-set record
//! held in memory; from the base where the map says it is unchanged; as
//! zeros where the map says so. Anything else waits until the merge gets
//! there, or fails once the apply has failed. Bytes served before the end
//! come from authenticated segments; the whole-component digests are still
//! checked by the merge, and a caller must discard whatever ran on the
//! bytes if the apply fails.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use super::decode::Segment;
use super::open::Opened;
use crate::chunk::{chunk_len, CHUNK, CHUNK_SIZE};
use crate::diff::classify::paired;
use crate::error::{Error, Result};
use crate::fsutil::read_at_zero_padded;
use crate::overlay::delta;
use crate::overlay::map::{CoverageMap, Location};
use crate::overlay::record::Op;
use crate::vmdir::{Component, VmDir};

/// Self-references followed for one chunk before it is refused (the map's
/// check already makes them point backwards; this bounds the recursion).
const MAX_REF_DEPTH: usize = 64;

/// The launch VM of one overlay as it arrives; cloned cheaply, shared by
/// the merge (which publishes progress) and the readers (the VM).
#[derive(Clone)]
pub struct Early {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Early {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Early").finish_non_exhaustive()
    }
}

struct Inner {
    map: CoverageMap,
    launch: Vec<Component>,
    base_files: Vec<File>,
    base_sizes: Vec<u64>,
    paired: Vec<Option<usize>>,
    state: Mutex<State>,
    cond: Condvar,
}

#[derive(Default)]
struct State {
    /// Read handles of the output files, once the merge made them.
    out: Vec<Arc<File>>,
    /// Bytes of each component that are final in its output file.
    done: Vec<u64>,
    /// Working-set records by launch position: segment and record index.
    held: BTreeMap<(usize, u64), (Arc<Segment>, usize)>,
    /// Working-set segments received.
    ws_received: u32,
    /// Why the apply failed (readers give up).
    failed: Option<String>,
    /// Counters for `--stats-json`.
    counts: Counts,
}

/// Where served chunks came from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// Unchanged chunks read from the base.
    pub from_base: u64,
    /// Chunks read from the overlay (held records, or the output written
    /// from it).
    pub from_overlay: u64,
    /// Reads that had to wait for the overlay to arrive.
    pub waited: u64,
}

fn lock(m: &Mutex<State>) -> MutexGuard<'_, State> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Early {
    /// For applying `o` to `base`: None when the overlay has no coverage
    /// map (version 1), which can only be applied in full first.
    pub fn new(base: &VmDir, o: &Opened) -> Result<Option<Early>> {
        let Some(map) = o.map.clone() else {
            return Ok(None);
        };
        let mut base_files = Vec::new();
        let mut base_sizes = Vec::new();
        for (i, c) in base.manifest.components.iter().enumerate() {
            base_files.push(base.open_component(i)?);
            base_sizes.push(c.size);
        }
        let lm = o.manifest.launch_manifest();
        let paired = (0..lm.components.len())
            .map(|i| paired(&base.manifest, &lm, i))
            .collect();
        let n = o.manifest.launch.len();
        Ok(Some(Early {
            inner: Arc::new(Inner {
                map,
                launch: o.manifest.launch.clone(),
                base_files,
                base_sizes,
                paired,
                state: Mutex::new(State {
                    done: vec![0; n],
                    ..State::default()
                }),
                cond: Condvar::new(),
            }),
        }))
    }

    /// The launch VM's components.
    pub fn components(&self) -> &[Component] {
        &self.inner.launch
    }

    /// Waits until the working set has arrived (every chunk the recorded
    /// run touched can then be served without waiting), or the apply
    /// failed.
    pub fn wait_working_set(&self) -> io::Result<()> {
        let want = self.inner.map.ws_segments;
        let mut s = lock(&self.inner.state);
        loop {
            if let Some(why) = &s.failed {
                return Err(io::Error::other(why.clone()));
            }
            if s.ws_received >= want && !s.out.is_empty() {
                return Ok(());
            }
            s = self.wait(s);
        }
    }

    /// Read-write handles of the output files (the merge's own), once the
    /// merge made them: what a VM that starts early runs its disks on
    /// ([`Early::wait_written`] before it touches a byte of one).
    pub fn output_files(&self) -> io::Result<Vec<File>> {
        let s = lock(&self.inner.state);
        s.out.iter().map(|f| f.try_clone()).collect()
    }

    /// Waits until the first `end` bytes of component `comp` are in its
    /// output file for good (the merge writes in position order and never
    /// writes there again: a VM may then read and write them), or the apply
    /// failed. True when the whole component is.
    pub fn wait_written(&self, comp: usize, end: u64) -> io::Result<bool> {
        let size = self.inner.launch.get(comp).map_or(0, |c| c.size);
        let end = end.min(size);
        let mut s = lock(&self.inner.state);
        loop {
            let done = s.done.get(comp).copied().unwrap_or(0);
            if done >= end {
                return Ok(done >= size);
            }
            if let Some(why) = &s.failed {
                return Err(io::Error::other(why.clone()));
            }
            s = self.wait(s);
        }
    }

    /// Where the chunks served so far came from.
    pub fn counts(&self) -> Counts {
        lock(&self.inner.state).counts
    }

    /// How many bytes from `offset` of component `comp` (chunk-aligned)
    /// can be read now without waiting, up to `len`.
    pub fn available(&self, comp: usize, offset: u64, len: u64) -> u64 {
        let s = lock(&self.inner.state);
        let size = self.inner.launch.get(comp).map_or(0, |c| c.size);
        let end = offset.saturating_add(len).min(size);
        let mut at = offset;
        while at < end {
            if self.source(&s, comp, at / CHUNK).is_none() {
                break;
            }
            at = (at / CHUNK + 1) * CHUNK;
        }
        at.min(end).saturating_sub(offset).min(len)
    }

    /// Reads `buf.len()` bytes at `offset` (chunk-aligned) of launch
    /// component `comp` (zeros past its end), waiting for what has not
    /// arrived. Fails once the apply failed.
    pub fn read(&self, comp: usize, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        if !offset.is_multiple_of(CHUNK) || comp >= self.inner.launch.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "early read not chunk-aligned or of no component",
            ));
        }
        // What the merge has written for good is read in one piece.
        let size = self.inner.launch[comp].size;
        let end = offset.saturating_add(buf.len() as u64).min(size);
        let whole = {
            let s = lock(&self.inner.state);
            (end > offset && s.done[comp] >= end && !s.out.is_empty())
                .then(|| Arc::clone(&s.out[comp]))
        };
        if let Some(f) = whole {
            let n = (end - offset) as usize;
            f.read_exact_at(&mut buf[..n], offset)?;
            buf[n..].fill(0);
            let mut s = lock(&self.inner.state);
            s.counts.from_overlay += (n as u64).div_ceil(CHUNK);
            return Ok(());
        }
        for (k, piece) in buf.chunks_mut(CHUNK_SIZE).enumerate() {
            self.read_chunk(comp, offset / CHUNK + k as u64, piece, 0)?;
        }
        Ok(())
    }

    fn wait<'a>(&self, s: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.inner.cond.wait(s).unwrap_or_else(|e| e.into_inner())
    }

    /// One chunk (or less, at the end of `buf`), waiting if needed.
    fn read_chunk(&self, comp: usize, chunk: u64, buf: &mut [u8], depth: usize) -> io::Result<()> {
        let size = self.inner.launch[comp].size;
        if chunk * CHUNK >= size {
            buf.fill(0);
            return Ok(());
        }
        let mut s = lock(&self.inner.state);
        let mut waited = false;
        let src = loop {
            if let Some(src) = self.source(&s, comp, chunk) {
                break src;
            }
            if let Some(why) = &s.failed {
                return Err(io::Error::other(why.clone()));
            }
            waited = true;
            s = self.wait(s);
        };
        if waited {
            s.counts.waited += 1;
        }
        match src {
            Source::Base => s.counts.from_base += 1,
            Source::Zero => {}
            _ => s.counts.from_overlay += 1,
        }
        let len = chunk_len(size, chunk).min(buf.len());
        let (head, tail) = buf.split_at_mut(len);
        tail.fill(0);
        let off = chunk * CHUNK;
        match src {
            Source::Zero => head.fill(0),
            Source::Output => {
                let f = Arc::clone(&s.out[comp]);
                drop(s);
                f.read_exact_at(head, off)?;
            }
            Source::Base => {
                drop(s);
                self.read_base_paired(comp, head, off)?;
            }
            Source::Held(seg, i) => {
                drop(s);
                self.materialize(comp, chunk, &seg, i, head, depth)?;
            }
        }
        Ok(())
    }

    /// Where chunk `chunk` of `comp` can be had now, if anywhere.
    fn source(&self, s: &State, comp: usize, chunk: u64) -> Option<Source> {
        let size = self.inner.launch[comp].size;
        let end = ((chunk + 1) * CHUNK).min(size);
        if s.done[comp] >= end && !s.out.is_empty() {
            return Some(Source::Output);
        }
        match self.inner.map.locate(comp as u8, chunk) {
            Location::Unchanged => Some(Source::Base),
            Location::Zero => Some(Source::Zero),
            Location::InSegment(_) => {
                let (&(c, start), (seg, i)) = s.held.range(..=(comp, chunk)).next_back()?;
                let r = &seg.records[*i];
                (c == comp && chunk >= start && chunk < start + u64::from(r.count))
                    .then(|| Source::Held(Arc::clone(seg), *i))
            }
        }
    }

    fn read_base_paired(&self, comp: usize, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self.inner.paired[comp] {
            Some(b) => read_at_zero_padded(
                &self.inner.base_files[b],
                buf,
                off,
                self.inner.base_sizes[b],
            ),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// Chunk `chunk` of `comp` from record `i` of `seg`, which covers it.
    fn materialize(
        &self,
        comp: usize,
        chunk: u64,
        seg: &Segment,
        i: usize,
        buf: &mut [u8],
        depth: usize,
    ) -> io::Result<()> {
        let r = &seg.records[i];
        let k = chunk - r.start;
        match &r.op {
            Op::Zero => buf.fill(0),
            Op::Literal(range) => {
                let at = range.start + (k * CHUNK) as usize;
                let src = seg
                    .body
                    .get(at..at + buf.len())
                    .ok_or_else(|| io::Error::other("a literal record shorter than its run"))?;
                buf.copy_from_slice(src);
            }
            Op::Delta(range) => {
                self.read_base_paired(comp, buf, chunk * CHUNK)?;
                delta::apply(&seg.body[range.clone()], buf);
            }
            &Op::RefBase { comp: b, chunk: c } => {
                let b = usize::from(b);
                let f = self
                    .inner
                    .base_files
                    .get(b)
                    .ok_or_else(|| io::Error::other("a reference to no base component"))?;
                read_at_zero_padded(f, buf, (c + k) * CHUNK, self.inner.base_sizes[b])?;
            }
            &Op::RefSelf { comp: l, chunk: c } => {
                if depth >= MAX_REF_DEPTH || usize::from(l) >= self.inner.launch.len() {
                    return Err(io::Error::other("self-references nested too deep"));
                }
                self.read_chunk(usize::from(l), c + k, buf, depth + 1)?;
            }
        }
        Ok(())
    }

    // The merge's side.

    /// The merge made its output files (`files`, in launch order).
    pub(crate) fn started(&self, files: &[File]) -> Result<()> {
        let out = files
            .iter()
            .map(|f| f.try_clone().map(Arc::new))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| Error::io("duplicating the launch VM's files".to_string(), e))?;
        lock(&self.inner.state).out = out;
        self.inner.cond.notify_all();
        Ok(())
    }

    /// A working-set segment arrived; its records are served from memory
    /// until the merge has written them.
    pub(crate) fn held(&self, seg: &Arc<Segment>) {
        let mut s = lock(&self.inner.state);
        for (i, r) in seg.records.iter().enumerate() {
            s.held
                .insert((usize::from(r.comp), r.start), (Arc::clone(seg), i));
        }
        s.ws_received += 1;
        drop(s);
        self.inner.cond.notify_all();
    }

    /// Everything before byte `pos` of component `comp` (and every earlier
    /// component) is in the output files for good.
    pub(crate) fn written(&self, comp: usize, pos: u64) {
        let mut s = lock(&self.inner.state);
        for c in 0..comp.min(s.done.len()) {
            s.done[c] = self.inner.launch[c].size;
        }
        if let Some(d) = s.done.get_mut(comp) {
            *d = (*d).max(pos);
        }
        // Held records the file now has are no longer needed.
        let State { held, done, .. } = &mut *s;
        let launch = &self.inner.launch;
        held.retain(|&(c, start), (seg, i)| {
            let end = (start + u64::from(seg.records[*i].count)) * CHUNK;
            end.min(launch[c].size) > done[c]
        });
        drop(s);
        self.inner.cond.notify_all();
    }

    /// The apply failed: every reader waiting or to come fails with `why`.
    pub fn fail(&self, why: &str) {
        let mut s = lock(&self.inner.state);
        s.failed.get_or_insert_with(|| why.to_string());
        drop(s);
        self.inner.cond.notify_all();
    }
}

enum Source {
    Output,
    Base,
    Zero,
    Held(Arc<Segment>, usize),
}
