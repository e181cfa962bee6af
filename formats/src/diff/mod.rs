//! `kimberlize diff`: base VMDIR + launch VMDIR → overlay stream.
//!
//! Stages: [`base_index`] reads the base once (verifying its digests) and
//! indexes its chunks; [`classify`] reads launch and base side by side in
//! large blocks and classifies chunks in parallel; [`encode`] turns chunk
//! classes into records and segments; [`writer`] compresses and seals
//! segments on worker threads and writes them in order. The bytes depend
//! on the inputs and options only, never on threads or timing, and the
//! salt and id are derived from them ([`salt_transcript`]), so the same
//! diff gives the same overlay, except with a passphrase (FORMAT.md
//! sections 7.7 and 12.4).

pub mod base_index;
pub mod classify;
pub mod encode;
pub mod writer;

use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use crate::crypto::keys::{commit_id, derived_salt, random, Argon2Params, KeyMaterial, Secret};
use crate::crypto::{sealer_for, writer_keys};
use crate::error::{Error, Result};
use crate::le;
use crate::overlay::header::{Header, DEFAULT_VERSION, VERSION_1, VERSION_MAP};
use crate::overlay::segment::{ChunkStats, ManifestSegment, MAX_BODY, TARGET_BODY};
use crate::overlay::Pos;
use crate::progress::Progress;
use crate::spool::Spool;
use crate::vmdir::{total_size, Manifest, VmDir};

pub use base_index::Base;

/// The default zstd level (FORMAT.md section 12.2 says why 8).
pub const DEFAULT_LEVEL: i32 = 8;

/// How to protect the overlay.
#[derive(Debug, Clone)]
pub enum Protection {
    /// `--no-encrypt`.
    None,
    /// A key file's key.
    Key([u8; 32]),
    /// A passphrase and the Argon2id parameters to use.
    Passphrase(Vec<u8>, Argon2Params),
}

/// The parent overlay, for a layered overlay.
#[derive(Debug, Clone, Copy)]
pub struct Parent {
    /// The parent's `overlay_id`.
    pub overlay_id: [u8; 16],
    /// The parent's depth.
    pub depth: u32,
    /// The VM identity the parent produces (from its manifest segment; must
    /// equal the base's identity).
    pub result_id: [u8; 32],
}

/// Options of one diff.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// Segment protection.
    pub protection: Protection,
    /// zstd level.
    pub level: i32,
    /// Compression worker threads.
    pub threads: usize,
    /// Set when `base` is the result of applying this parent.
    pub parent: Option<Parent>,
    /// Target size of a data segment body (default [`TARGET_BODY`]).
    pub segment_bytes: usize,
    /// Overlay format version to write: [`VERSION_1`] (the default,
    /// [`DEFAULT_VERSION`]) or [`VERSION_MAP`] (with a coverage map).
    pub version: u16,
    /// Launch chunks to write first, in first-touch order (version 2;
    /// FORMAT.md section 12.5); empty for none.
    pub working_set: Vec<Pos>,
    /// Where a version-2 diff keeps its scratch: the compressed segments
    /// until the coverage map is written, and the working set's chunks
    /// until they are encoded, in nameless 0600 files
    /// ([`crate::spool::Spool`]); `None`: `$TMPDIR` (`/tmp` when unset).
    pub spool_dir: Option<PathBuf>,
}

impl DiffOptions {
    /// Defaults: level [`DEFAULT_LEVEL`], all cores, [`TARGET_BODY`]
    /// segments, no parent.
    pub fn new(protection: Protection) -> Self {
        DiffOptions {
            protection,
            level: DEFAULT_LEVEL,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            parent: None,
            segment_bytes: TARGET_BODY,
            version: DEFAULT_VERSION,
            working_set: Vec::new(),
            spool_dir: None,
        }
    }
}

/// Milliseconds spent in each stage.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiffTimes {
    /// Reading and indexing the base.
    pub base_index_ms: u64,
    /// Reading and classifying the launch VM, encoding records.
    pub classify_ms: u64,
    /// Waiting for compression and writing after the last record.
    pub drain_ms: u64,
    /// Everything.
    pub total_ms: u64,
}

/// What a diff did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DiffStats {
    /// Logical bytes of the launch VM.
    pub launch_bytes: u64,
    /// Bytes of base data read (holes skipped).
    pub base_read_bytes: u64,
    /// Bytes of launch data read (holes skipped).
    pub launch_read_bytes: u64,
    /// Overlay bytes written.
    pub overlay_bytes: u64,
    /// Data segments written.
    pub segments: u64,
    /// Record body bytes before compression.
    pub body_bytes: u64,
    /// Chunks by encoding.
    pub chunks: ChunkStats,
    /// Stage times.
    pub times: DiffTimes,
}

/// The units of work [`diff`] reports to its [`Progress`]: the base's and
/// the launch VM's sizes (the base is indexed, then the launch VM read).
pub fn work(base: &Manifest, launch: &VmDir) -> u64 {
    total_size(&base.components) + total_size(&launch.manifest.components)
}

/// Diffs `launch` against `base` (a VMDIR, or a chain's launch VM held in
/// memory: [`Base`]), writing the overlay to `out`.
pub fn diff<'a, W: Write + Send>(
    base: impl Into<Base<'a>>,
    launch: &VmDir,
    opts: &DiffOptions,
    out: W,
    progress: &Progress,
) -> Result<(W, DiffStats)> {
    let t0 = Instant::now();
    let base: Base<'a> = base.into();
    let mut stats = DiffStats::default();
    // An overlay does not carry the machine: the launch VM gets its base's.
    if launch.manifest.machine != base.manifest().machine {
        return Err(Error::VmDir {
            path: launch.path.clone(),
            why: format!(
                "made for another machine than its base {} (backend, version, machine type, accelerator, CPU, devices or kernel command line differ): an overlay can only relate VMs of one machine",
                base.path().display()
            ),
        });
    }
    if opts.version != VERSION_1 && opts.version != VERSION_MAP {
        return Err(Error::Usage(format!(
            "overlay version {} is not one this build writes (1 or 2)",
            opts.version
        )));
    }
    if !opts.working_set.is_empty() {
        if opts.version < VERSION_MAP {
            return Err(Error::Usage(
                "a working set needs overlay version 2 (its coverage map marks it)".into(),
            ));
        }
        crate::working_set::check_against(&opts.working_set, &launch.manifest.components)?;
    }
    if let Some(p) = &opts.parent {
        if p.result_id != base.identity() {
            return Err(Error::Chain(
                "the parent overlay does not produce the given base".into(),
            ));
        }
    }
    let (material, secret) = match &opts.protection {
        Protection::None => (KeyMaterial::None, None),
        Protection::Key(k) => (KeyMaterial::KeyFile, Some(Secret::Key(*k))),
        Protection::Passphrase(p, a) => (
            KeyMaterial::Passphrase(*a),
            Some(Secret::Passphrase(p.clone())),
        ),
    };
    let manifest = ManifestSegment {
        name: launch.manifest.name.clone(),
        vcpus: launch.manifest.vcpus,
        launch: launch.manifest.components.clone(),
        base: base.manifest().components.clone(),
    }
    .encode();
    let segment_bytes = opts.segment_bytes.clamp(4096, MAX_BODY / 2);
    let mut header = Header {
        version: opts.version,
        protection: material,
        overlay_id: [0; 16],
        salt: [0; 32],
        base_id: [0; 32],
        result_id: [0; 32],
        parent_id: opts.parent.map(|p| p.overlay_id).unwrap_or([0; 16]),
        depth: opts.parent.map(|p| p.depth + 1).unwrap_or(0),
        mac: [0; 32],
    };
    // FORMAT.md section 7.7: the salt and id commit to everything the
    // overlay's bytes depend on, so the same inputs give the same overlay.
    let derive = |key: Option<&[u8; 32]>| {
        let t = salt_transcript(
            &header,
            &base.identity(),
            &launch.identity(),
            &manifest,
            opts.level,
            segment_bytes,
            (opts.version >= VERSION_MAP).then_some(&opts.working_set[..]),
        );
        derived_salt(key, &t)
    };
    (header.salt, header.overlay_id) = match &opts.protection {
        Protection::None => derive(None),
        Protection::Key(k) => {
            // The salt commits to the launch content through the manifest's
            // digests: content that no longer matches them (a VM run in
            // place, a changed file) would be sealed under the salt of the
            // declared content, reusing its nonces. Checked before any
            // segment is sealed (the base is checked while it is indexed,
            // also before).
            launch.verify()?;
            derive(Some(k))
        }
        // Argon2id needs the salt before any key exists (section 7.7).
        Protection::Passphrase(..) => (random::<32>()?, random::<16>()?),
    };
    let keys = writer_keys(&header, secret.as_ref())?;
    header.base_id = commit_id(keys.as_ref(), &base.identity());
    header.result_id = commit_id(keys.as_ref(), &launch.identity());
    let header_bytes = header.seal(keys.as_ref());
    let sealer = sealer_for(&header, keys.as_ref());

    // A no-op when the front end planned a larger run (parents first).
    progress.plan(work(base.manifest(), launch));
    let index = base_index::BaseIndex::build(base, progress)?;
    stats.base_read_bytes = index.read_bytes;
    stats.times.base_index_ms = t0.elapsed().as_millis() as u64;

    let t1 = Instant::now();
    let (out, wstats) = writer::run(out, &header_bytes, &sealer, opts, |sink| {
        sink.send_manifest(manifest)?;
        let mut enc = encode::SegmentBuilder::new(sink, segment_bytes);
        if !opts.working_set.is_empty() {
            let spool = spool(opts, "the working set's chunks")?;
            enc = enc.with_working_set(&opts.working_set, spool);
        }
        let cstats = classify::run(base.manifest(), launch, &index, &mut enc, progress)?;
        stats.launch_read_bytes = cstats.launch_read_bytes;
        stats.chunks = enc.finish()?;
        stats.times.classify_ms = t1.elapsed().as_millis() as u64;
        Ok(stats.chunks)
    })?;
    stats.launch_bytes = total_size(&launch.manifest.components);
    stats.overlay_bytes = wstats.bytes;
    stats.segments = wstats.segments;
    stats.body_bytes = wstats.body_bytes;
    stats.times.drain_ms =
        (t1.elapsed().as_millis() as u64).saturating_sub(stats.times.classify_ms);
    stats.times.total_ms = t0.elapsed().as_millis() as u64;
    Ok((out, stats))
}

/// A [`Spool`] for `what` in `opts.spool_dir` or `$TMPDIR`.
fn spool(opts: &DiffOptions, what: &str) -> Result<Spool> {
    Spool::create(opts.spool_dir.as_deref()).map_err(|e| {
        let dir = opts.spool_dir.clone().unwrap_or_else(std::env::temp_dir);
        Error::io(
            format!("creating a spool file for {what} in {}", dir.display()),
            e,
        )
    })
}

/// Changes whenever the reference encoder may write different bytes for
/// the same inputs and options (chunk decisions, runs, segment cuts,
/// record encoding): part of every derived salt, so that an encoder change
/// never seals new plaintexts under an old salt.
pub const ENCODER_REVISION: u32 = 1;

/// The canonical encoding a derived salt is computed over (FORMAT.md
/// section 7.7): `header` with `overlay_id`, `salt`, `base_id` and
/// `result_id` still zero (so: version, protection, Argon2 parameters,
/// parent and depth), the base and launch identities, the manifest segment
/// body, the zstd level, the segment size, and the encoder's identity
/// (this crate's version, [`ENCODER_REVISION`], the zstd library version),
/// and for version 2 the working set (`Some`, possibly empty).
/// Thread counts are not part of it: they do not change the output.
pub fn salt_transcript(
    header: &Header,
    base_id: &[u8; 32],
    launch_id: &[u8; 32],
    manifest: &[u8],
    level: i32,
    segment_bytes: usize,
    working_set: Option<&[Pos]>,
) -> Vec<u8> {
    let mut unsalted = header.clone();
    unsalted.overlay_id = [0; 16];
    unsalted.salt = [0; 32];
    unsalted.base_id = [0; 32];
    unsalted.result_id = [0; 32];
    let mut w = le::Writer::with_capacity(manifest.len() + 512);
    w.raw(&unsalted.encode_unsigned());
    w.raw(base_id);
    w.raw(launch_id);
    w.bytes(manifest);
    w.u32(level as u32);
    w.u64(segment_bytes as u64);
    w.bytes(
        format!(
            "kimberley-formats {} encoder {ENCODER_REVISION} zstd {}",
            env!("CARGO_PKG_VERSION"),
            zstd::zstd_safe::version_string()
        )
        .as_bytes(),
    );
    if let Some(ws) = working_set {
        w.bytes(&crate::working_set::canonical(ws));
    }
    w.into_inner()
}
