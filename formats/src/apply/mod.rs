//! `dekimberlize`: base VMDIR + overlay chain → launch VMDIR.
//!
//! [`open`] reads and authenticates an overlay's header and manifest and
//! checks the chain before anything is written; [`decode`] reads frames on
//! one thread and opens (decrypts, decompresses, parses) segments on worker
//! threads, delivering them in order; [`merge`] builds each output component
//! in one sequential pass, copying the base's data extents, applying
//! records and hashing what it writes.

pub mod decode;
pub mod early;
pub mod merge;
pub mod open;

use std::io::Read;
use std::path::Path;
use std::time::Instant;

use crate::crypto::keys::Secret;
use crate::crypto::ReadPolicy;
use crate::error::{Error, Result};
use crate::fsutil::ScratchDir;
use crate::overlay::segment::ChunkStats;
use crate::progress::Progress;
use crate::vmdir::{VmDir, VmDirWriter};

pub use open::{check_chain, Opened};

/// One overlay input stream.
pub struct Input {
    /// For messages (`-` for stdin).
    pub name: String,
    /// The bytes.
    pub reader: Box<dyn Read + Send>,
}

impl std::fmt::Debug for Input {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Input({})", self.name)
    }
}

/// Options for applying.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// The user's secret, if any.
    pub secret: Option<Secret>,
    /// What the reader accepts (every overlay of the chain is read under it).
    pub policy: ReadPolicy,
    /// Segment decoding threads.
    pub threads: usize,
    /// fsync the result before renaming it into place (default). Without,
    /// the result is still complete and atomic but not durable.
    pub sync: bool,
}

/// Milliseconds at which each stage ended, from the start.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyTimes {
    /// Headers and manifests read, keys derived, chain checked.
    pub open_ms: u64,
    /// Last overlay byte received.
    pub receive_ms: u64,
    /// Time spent opening segments (decrypt + decompress + parse), summed
    /// over worker threads.
    pub decode_cpu_ms: u64,
    /// Last record applied and every digest checked.
    pub apply_ms: u64,
    /// Files synced and the directory renamed into place.
    pub total_ms: u64,
}

/// What an apply did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ApplyStats {
    /// Overlays applied.
    pub overlays: usize,
    /// Overlay bytes read.
    pub overlay_bytes: u64,
    /// Logical bytes of the launch VM.
    pub launch_bytes: u64,
    /// Bytes written to the output (holes excluded).
    pub written_bytes: u64,
    /// Data segments.
    pub segments: u64,
    /// Chunks by encoding (summed over the chain).
    pub chunks: ChunkStats,
    /// Stage times.
    pub times: ApplyTimes,
}

/// The units of work [`apply_chain`] reports to its [`Progress`] for
/// `chain` (already opened): every layer's launch VM size.
pub fn work(chain: &[Opened]) -> u64 {
    chain
        .iter()
        .map(|o| crate::vmdir::total_size(&o.manifest.launch))
        .sum()
}

/// Applies the overlays `inputs` (in chain order) to `base`, producing the
/// VMDIR `out`, which must not exist. Nothing is written until every
/// header in the chain has authenticated and the chain is complete.
pub fn apply_chain(
    base: &VmDir,
    inputs: Vec<Input>,
    out: &Path,
    opts: &ApplyOptions,
    progress: &Progress,
) -> Result<ApplyStats> {
    let t0 = Instant::now();
    // Refused before any key derivation (Argon2id can take seconds).
    if crate::fsutil::occupied(out) {
        return Err(Error::Exists(out.to_path_buf()));
    }
    let mut opened = Vec::new();
    for inp in inputs {
        opened.push(Opened::open(inp, opts.secret.as_ref(), &opts.policy)?);
    }
    apply_opened(base, opened, out, opts, progress, t0)
}

/// [`apply_chain`] for overlays whose headers were already opened (and
/// authenticated) with `opts`' secret and policy, for a caller that needed
/// them first; `t0` is when opening began (the stats' times count from it).
pub fn apply_opened(
    base: &VmDir,
    opened: Vec<Opened>,
    out: &Path,
    opts: &ApplyOptions,
    progress: &Progress,
    t0: Instant,
) -> Result<ApplyStats> {
    apply_with(base, opened, out, opts, progress, t0, None)
}

/// [`apply_opened`] for one overlay whose launch VM is read while it is
/// being applied ([`early`]): `early`, made by [`early::Early::new`] for
/// `o` and `base`, is told everything the merge holds and writes, and
/// fails (its readers with it) if the apply fails.
pub fn apply_early(
    base: &VmDir,
    o: Opened,
    out: &Path,
    opts: &ApplyOptions,
    progress: &Progress,
    t0: Instant,
    early: &early::Early,
) -> Result<ApplyStats> {
    let r = apply_with(base, vec![o], out, opts, progress, t0, Some(early));
    if let Err(e) = &r {
        early.fail(&e.to_string());
    }
    r
}

fn apply_with(
    base: &VmDir,
    opened: Vec<Opened>,
    out: &Path,
    opts: &ApplyOptions,
    progress: &Progress,
    t0: Instant,
    early: Option<&early::Early>,
) -> Result<ApplyStats> {
    if opened.is_empty() {
        return Err(Error::Invalid("no overlay to apply".into()));
    }
    if crate::fsutil::occupied(out) {
        return Err(Error::Exists(out.to_path_buf()));
    }
    check_chain(base, &opened)?;
    progress.plan(work(&opened));
    let mut stats = ApplyStats {
        overlays: opened.len(),
        ..Default::default()
    };
    stats.times.open_ms = t0.elapsed().as_millis() as u64;
    let n = opened.len();
    // Intermediate layers go to hidden temporary directories next to `out`.
    let mut intermediates: Vec<ScratchDir> = Vec::new();
    let mut current = base.clone();
    for (k, o) in opened.into_iter().enumerate() {
        let dest = if k + 1 == n {
            out.to_path_buf()
        } else {
            let scratch = ScratchDir::next_to(out);
            let p = scratch.path().to_path_buf();
            intermediates.push(scratch);
            p
        };
        // Only the last layer's launch VM is the one that starts early.
        let e = early.filter(|_| k + 1 == n);
        let s = apply_one(&current, o, &dest, opts, progress, t0, e)?;
        stats.overlay_bytes += s.overlay_bytes;
        stats.segments += s.segments;
        stats.chunks.add(&s.chunks);
        stats.written_bytes = s.written_bytes;
        stats.launch_bytes = s.launch_bytes;
        stats.times.receive_ms = s.times.receive_ms;
        stats.times.decode_cpu_ms += s.times.decode_cpu_ms;
        stats.times.apply_ms = s.times.apply_ms;
        if k + 1 < n {
            current = VmDir::open(&dest)?;
        }
    }
    stats.times.total_ms = t0.elapsed().as_millis() as u64;
    Ok(stats)
}

fn apply_one(
    base: &VmDir,
    o: Opened,
    out: &Path,
    opts: &ApplyOptions,
    progress: &Progress,
    t0: Instant,
    early: Option<&early::Early>,
) -> Result<ApplyStats> {
    let mut stats = ApplyStats::default();
    let mut launch = o.manifest.launch_manifest();
    // A launch VM runs on the machine its base was made for.
    launch.machine = base.manifest.machine.clone();
    let mut w = VmDirWriter::create(out)?;
    w.set_sync(opts.sync);
    let mut files = Vec::new();
    for (i, c) in launch.components.iter().enumerate() {
        let f = w.create_file(&launch.file_name(i))?;
        f.set_len(c.size)
            .map_err(|e| Error::io(format!("sizing {}", launch.file_name(i)), e))?;
        files.push(f);
    }
    progress.stage("applying");
    let mut m = merge::Merge::new(base, &o.manifest, files, progress)?;
    m.start_writeback(opts.sync);
    if let Some(e) = early {
        m.set_early(e.clone())?;
    }
    let geo = o.geometry();
    // The merge counts the launch VM's bytes; the decoder's overlay bytes
    // are not part of the run's total.
    let dstats = decode::run(o, geo, opts.threads, None, |seg| m.segment(seg))?;
    stats.times.receive_ms = dstats.receive_done.duration_since(t0).as_millis() as u64;
    stats.times.decode_cpu_ms = dstats.decode_cpu_ms;
    let mstats = m.finish()?;
    stats.times.apply_ms = t0.elapsed().as_millis() as u64;
    if mstats.chunks != dstats.index.stats {
        return Err(Error::Corrupt(
            "the index's statistics do not match the records".into(),
        ));
    }
    if let (Some(b), Some(c)) = (&mstats.memory_blocks, launch.components.first()) {
        w.write_memory_blocks(c.size, b)?;
    }
    w.commit(&launch)?;
    stats.overlay_bytes = dstats.bytes;
    stats.segments = dstats.segments;
    stats.chunks = mstats.chunks;
    stats.written_bytes = mstats.written_bytes;
    stats.launch_bytes = crate::vmdir::total_size(&launch.components);
    Ok(stats)
}

/// The launch VM of [`patch`].
#[derive(Debug)]
pub enum Patch {
    /// Held in memory over the base.
    Memory(crate::vmdir::patched::Patched),
    /// Written out (its changes outgrew the budget).
    Written(VmDir),
}

/// How many changed bytes [`patch`] holds in memory by default before it
/// writes the launch VM out instead.
pub const PATCH_BUDGET: u64 = 512 << 20;

/// Applies the overlay `o` (opened with `opts`' secret and policy) to
/// `base` in memory: the result is `base`'s files plus what the overlay
/// replaces, checked against the launch digests exactly as a written
/// apply's files are, and never written out (`kimberlize build --parent`
/// resumes it and diffs against it). When the changed bytes would exceed
/// `budget`, the launch VM is written to `spill_to` (which must not exist;
/// without fsync) instead, as [`apply_chain`] would.
pub fn patch(
    base: VmDir,
    o: Opened,
    opts: &ApplyOptions,
    progress: &Progress,
    spill_to: &Path,
    budget: u64,
) -> Result<(Patch, ApplyStats)> {
    let t0 = Instant::now();
    check_chain(&base, std::slice::from_ref(&o))?;
    if crate::fsutil::occupied(spill_to) {
        return Err(Error::Exists(spill_to.to_path_buf()));
    }
    let mut stats = ApplyStats {
        overlays: 1,
        ..Default::default()
    };
    let mut launch = o.manifest.launch_manifest();
    launch.machine = base.manifest.machine.clone();
    progress.stage("applying");
    let writer = std::cell::RefCell::new(None);
    let spill: merge::Spill<'_> = Box::new(|| {
        let mut w = VmDirWriter::create(spill_to)?;
        w.set_sync(opts.sync);
        let mut files = Vec::new();
        for (i, c) in launch.components.iter().enumerate() {
            let f = w.create_file(&launch.file_name(i))?;
            f.set_len(c.size)
                .map_err(|e| Error::io(format!("sizing {}", launch.file_name(i)), e))?;
            files.push(f);
        }
        *writer.borrow_mut() = Some(w);
        Ok(files)
    });
    let mut m = merge::Merge::in_memory(&base, &o.manifest, progress, budget, spill)?;
    let geo = o.geometry();
    let dstats = decode::run(o, geo, opts.threads, None, |seg| m.segment(seg))?;
    stats.times.receive_ms = dstats.receive_done.duration_since(t0).as_millis() as u64;
    stats.times.decode_cpu_ms = dstats.decode_cpu_ms;
    let (mstats, patches) = m.finish_patches()?;
    if mstats.chunks != dstats.index.stats {
        return Err(Error::Corrupt(
            "the index's statistics do not match the records".into(),
        ));
    }
    stats.launch_bytes = crate::vmdir::total_size(&launch.components);
    let result = match (patches, writer.into_inner()) {
        (Some(p), None) => Patch::Memory(crate::vmdir::patched::Patched::new(base, launch, p)),
        (None, Some(w)) => Patch::Written(VmDir::open(&w.commit(&launch)?)?),
        _ => unreachable!("a merge spills exactly when it made the files"),
    };
    stats.times.apply_ms = t0.elapsed().as_millis() as u64;
    stats.times.total_ms = t0.elapsed().as_millis() as u64;
    stats.overlay_bytes = dstats.bytes;
    stats.segments = dstats.segments;
    stats.chunks = mstats.chunks;
    stats.written_bytes = mstats.written_bytes;
    Ok((result, stats))
}

/// What `verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Overlay bytes.
    pub bytes: u64,
    /// Data segments.
    pub segments: u64,
    /// Records.
    pub records: u64,
    /// Chunk statistics from the index (checked against the records).
    pub chunks: ChunkStats,
}

/// Authenticates and parses a whole overlay without writing anything.
pub fn verify(o: Opened, threads: usize, progress: &Progress) -> Result<VerifyReport> {
    let geo = o.geometry();
    let launch_chunks: u64 = o
        .manifest
        .launch
        .iter()
        .map(|c| crate::chunk::chunk_count(c.size))
        .sum();
    let mut chunks = ChunkStats::default();
    let mut records = 0u64;
    progress.stage("verifying");
    let d = decode::run(o, geo, threads, Some(progress), |seg| {
        records += seg.records.len() as u64;
        for r in &seg.records {
            merge::count(&mut chunks, r);
        }
        Ok(())
    })?;
    chunks.unchanged = launch_chunks.saturating_sub(chunks.total());
    if chunks != d.index.stats {
        return Err(Error::Corrupt(
            "the index's statistics do not match the records".into(),
        ));
    }
    Ok(VerifyReport {
        bytes: d.bytes,
        segments: d.segments,
        records,
        chunks,
    })
}
