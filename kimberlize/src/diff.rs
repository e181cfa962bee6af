//! `import` and `diff`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use kimberley_cli::output::{write_json, Output};
use kimberley_cli::progress::{self as units, Reporter};
use kimberley_cli::schema::{versioned, JsonOutput};
use kimberley_formats::apply::{self, ApplyOptions, Input, Opened, Patch, PATCH_BUDGET};
use kimberley_formats::diff::{self, DiffOptions, Parent};
use kimberley_formats::fsutil::ScratchDir;
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::import::{import_with, CopyMethod, ImportOptions, ImportSpec};
use kimberley_formats::vmdir::patched::Patched;
use kimberley_formats::vmdir::{total_size, VmDir};

use crate::cli::{DiffArgs, ImportArgs};

pub fn import(a: ImportArgs) -> Result<()> {
    let name = a.name.clone().unwrap_or_else(|| {
        a.output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vm".into())
    });
    let t0 = Instant::now();
    let spec = ImportSpec {
        name,
        vcpus: a.vcpus,
        memory: a.memory,
        disks: a.disk,
        state: a.state,
    };
    let opts = ImportOptions {
        reflink: a.reflink,
        trim: a.trim,
        ..ImportOptions::default()
    };
    let progress = Arc::new(Progress::default());
    let reporter = Reporter::start(progress.clone(), a.progress, a.quiet);
    let done = import_with(&a.output, &spec, &opts, &progress)
        .with_context(|| format!("importing into {}", a.output.display()))?;
    drop(reporter);
    for (i, t) in done.trims.iter().enumerate() {
        for note in t.iter().flat_map(|t| &t.notes) {
            eprintln!("note: {}: not trimmed: {note}", done.manifest.file_name(i));
        }
    }
    if !a.quiet {
        let size = total_size(&done.manifest.components);
        let took = t0.elapsed();
        let how: Vec<String> = done
            .methods
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let how = match m {
                    CopyMethod::Reflink => "reflinked".to_string(),
                    CopyMethod::CopyFileRange => "copied in the kernel".into(),
                    CopyMethod::SparseCopy => "copied".into(),
                    CopyMethod::Converted(f) => format!("converted from {}", f.name()),
                };
                let trim = match &done.trims[i] {
                    Some(t) if t.file_systems > 0 => {
                        format!(", {} free trimmed", units::bytes(t.bytes))
                    }
                    Some(_) => ", not trimmed".into(),
                    None => String::new(),
                };
                format!("{} {how}{trim}", done.manifest.file_name(i))
            })
            .collect();
        eprintln!(
            "imported {}: {} VM from {} of images in {} ({}; {})",
            a.output.display(),
            units::bytes(size),
            units::bytes(done.source_bytes),
            units::duration(took),
            units::rate(done.source_bytes, took),
            how.join(", ")
        );
    }
    Ok(())
}

/// Reads a working-set file (FORMAT.md section 12.5), refusing one over
/// its cap before reading it whole.
fn read_working_set(path: &std::path::Path) -> Result<Vec<kimberley_formats::overlay::Pos>> {
    use kimberley_formats::working_set::{parse, MAX_WORKING_SET_BYTES};
    use std::io::Read;
    let usage = |why: String| {
        anyhow::Error::new(kimberley_formats::error::Error::Usage(format!(
            "{}: {why}",
            path.display()
        )))
    };
    let f = std::fs::File::open(path).map_err(|e| usage(e.to_string()))?;
    let mut text = Vec::new();
    f.take(MAX_WORKING_SET_BYTES + 1)
        .read_to_end(&mut text)
        .map_err(|e| usage(e.to_string()))?;
    parse(&text).map_err(|e| usage(e.to_string()))
}

/// Where a version-2 overlay's segments wait: beside an output file (its
/// file system has room for the overlay), $TMPDIR for stdout or a stream.
pub(crate) fn spool_dir(output: Option<&std::path::Path>) -> Option<std::path::PathBuf> {
    let p = output.filter(|p| p.as_os_str() != "-")?;
    let meta = std::fs::metadata(p).ok();
    if meta.is_some_and(|m| !m.is_file()) {
        return None;
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    dir.is_dir().then_some(dir)
}

/// `ws` led by every chunk of the launch VM's state blob (a VM that starts
/// early needs its state before anything else).
pub(crate) fn state_first(
    launch: &kimberley_formats::vmdir::Manifest,
    ws: Vec<kimberley_formats::overlay::Pos>,
) -> Vec<kimberley_formats::overlay::Pos> {
    let Some(i) = launch.state_index() else {
        return ws;
    };
    let (Ok(comp), n) = (
        u8::try_from(i),
        kimberley_formats::chunk::chunk_count(launch.components[i].size),
    ) else {
        return ws;
    };
    let mut out: Vec<_> = (0..n).map(|c| (comp, c)).collect();
    out.extend(ws.into_iter().filter(|&(c, _)| c != comp));
    out
}

pub fn diff(a: DiffArgs) -> Result<()> {
    let threads = kimberley_cli::run::threads(a.threads);
    let working_set = match &a.working_set {
        Some(p) => read_working_set(p)?,
        None => Vec::new(),
    };
    a.keys
        .check_stdin(a.parent.iter().any(|p| p.as_os_str() == "-"))?;
    let protection = a.keys.protection()?;
    let base = VmDir::open(&a.base)?;
    let launch = VmDir::open(&a.launch)?;
    let progress = Arc::new(Progress::default());
    let reporter = Reporter::start(progress.clone(), a.progress, a.quiet);

    // A layered overlay is relative to base + parents: synthesise that
    // into a scratch directory next to the launch VM.
    let secret = kimberley_cli::keys::secret_of(&protection);
    let parents = match &a.parent_from {
        Some(r) => kimberley_cli::oci::chain_inputs(r, &a.cache, &a.registry)?,
        None => kimberley_cli::output::open_overlays(&a.parent)?,
    };
    let chain = Chain::apply(
        base,
        parents,
        secret,
        a.read.policy(),
        threads,
        &a.launch,
        &progress,
        total_size(&launch.manifest.components),
    )?;
    let (effective, parent) = (chain.vm.base(), chain.parent);

    let out = Output::binary(a.output.as_deref(), a.force)?;
    let version = a.overlay_version.unwrap_or(if a.working_set.is_some() {
        kimberley_formats::overlay::header::VERSION_MAP
    } else {
        kimberley_formats::overlay::header::DEFAULT_VERSION
    });
    let working_set = if version >= kimberley_formats::overlay::header::VERSION_MAP {
        state_first(&launch.manifest, working_set)
    } else {
        working_set
    };
    let opts = DiffOptions {
        level: a.level,
        threads,
        parent,
        version,
        working_set,
        spool_dir: spool_dir(a.output.as_deref()),
        ..DiffOptions::new(protection)
    };
    let stats = write_overlay(effective, &launch, out, &opts, &progress)?;
    drop(reporter);
    if let Some(p) = &a.stats_json {
        write_json(p, &versioned(JsonOutput::DiffStats, &stats)?)?;
    }
    if !a.quiet {
        eprintln!("{}", summary(&stats, a.output.as_deref(), None));
    }
    Ok(())
}

/// A base with parent overlays applied: the VM a layered overlay is
/// relative to (`diff --parent`, `build --parent`).
pub(crate) struct Chain {
    /// The chain's launch VM (the base itself when there are no parents).
    pub vm: ChainVm,
    /// The last parent, for the new overlay's header.
    pub parent: Option<Parent>,
    /// Where all but the last parent were applied, and where the last is
    /// written if it outgrows memory (removed when dropped).
    _scratch: Vec<ScratchDir>,
}

/// A chain's launch VM.
pub(crate) enum ChainVm {
    /// A directory: the base itself.
    Dir(VmDir),
    /// The base (or the chain below the last parent, written out) plus
    /// the last parent's changes, held in memory: never written out.
    Patched(Patched),
}

impl ChainVm {
    /// As the base of a diff.
    pub fn base(&self) -> diff::Base<'_> {
        match self {
            ChainVm::Dir(d) => d.into(),
            ChainVm::Patched(p) => p.into(),
        }
    }
}

impl Chain {
    /// Applies `parents` (in chain order) to `base`, read with `secret`
    /// under `policy`: all but the last into a scratch directory next to
    /// `near`, the last in memory over that (`apply::patch`), so the
    /// chain's launch VM is never written out. Plans `progress` for the
    /// applies, the diff's read of the chain's launch VM and `more` units
    /// (what the caller reads besides).
    #[allow(clippy::too_many_arguments)]
    pub fn apply(
        base: VmDir,
        parents: Vec<Input>,
        secret: Option<kimberley_formats::crypto::keys::Secret>,
        policy: kimberley_formats::crypto::ReadPolicy,
        threads: usize,
        near: &Path,
        progress: &Progress,
        more: u64,
    ) -> Result<Chain> {
        if parents.is_empty() {
            return Ok(Chain {
                vm: ChainVm::Dir(base),
                parent: None,
                _scratch: Vec::new(),
            });
        }
        // Each parent is read once: its header for the plan and the new
        // overlay's header, its body by the apply.
        let t0 = Instant::now();
        let mut opened = Vec::new();
        for input in parents {
            opened.push(Opened::open(input, secret.as_ref(), &policy)?);
        }
        let last = opened.last().expect("parents is not empty");
        // One total for the whole run: every parent's launch VM, then the
        // diff against the last one's.
        progress.plan(apply::work(&opened) + total_size(&last.manifest.launch) + more);
        let parent = Some(Parent {
            overlay_id: last.header.overlay_id,
            depth: last.header.depth,
            result_id: last.result_identity(),
        });
        // Checked as a whole before anything is applied.
        apply::check_chain(&base, &opened).map_err(applying)?;
        let opts = ApplyOptions {
            secret,
            policy,
            threads,
            // Scratch: not worth an fsync.
            sync: false,
        };
        let last = opened.pop().expect("parents is not empty");
        let mut scratch = Vec::new();
        let below = if opened.is_empty() {
            base
        } else {
            let s = ScratchDir::next_to(near);
            let dir = s.path().to_path_buf();
            scratch.push(s);
            apply::apply_opened(&base, opened, &dir, &opts, progress, t0).map_err(applying)?;
            VmDir::open(&dir)?
        };
        let spill = ScratchDir::next_to(near);
        let (vm, _) = apply::patch(below, last, &opts, progress, spill.path(), PATCH_BUDGET)
            .map_err(applying)?;
        scratch.push(spill);
        Ok(Chain {
            vm: match vm {
                Patch::Memory(p) => ChainVm::Patched(p),
                Patch::Written(d) => ChainVm::Dir(d),
            },
            parent,
            _scratch: scratch,
        })
    }
}

/// The error of applying parents, with exit 11 for a tampered blob from
/// the cache.
fn applying(e: kimberley_formats::Error) -> anyhow::Error {
    let e = anyhow::Error::new(e).context("applying the parent overlays");
    if kimberley_cli::oci::tampered_in(&e) {
        kimberley_cli::run::with_code(kimberley_cli::exit::TAMPERED, format!("{e:#}"))
    } else {
        e
    }
}

/// Diffs into `out` and commits it.
pub(crate) fn write_overlay(
    base: diff::Base<'_>,
    launch: &VmDir,
    out: Output,
    opts: &DiffOptions,
    progress: &Progress,
) -> Result<diff::DiffStats> {
    let writer = out.writer()?;
    let (mut w, stats) = diff::diff(base, launch, opts, writer, progress)?;
    std::io::Write::flush(&mut w).context("writing the overlay")?;
    drop(w);
    out.commit()?;
    Ok(stats)
}

/// The line a diff ends with: what was written, from what, how fast
/// (`guest`: how long build ran the guest before).
pub(crate) fn summary(s: &diff::DiffStats, out: Option<&Path>, guest: Option<Duration>) -> String {
    let diff_time = Duration::from_millis(s.times.total_ms);
    let dest = match out {
        Some(p) if p != Path::new("-") => p.display().to_string(),
        _ => "stdout".into(),
    };
    let head = format!(
        "wrote {dest}: {} overlay from {} launch VM",
        units::bytes(s.overlay_bytes),
        units::bytes(s.launch_bytes)
    );
    match guest {
        None => format!(
            "{head} in {} ({})",
            units::duration(diff_time),
            units::rate(s.launch_bytes, diff_time)
        ),
        Some(t) => format!(
            "{head} in {} (guest {}, diff {} at {})",
            units::duration(t + diff_time),
            units::duration(t),
            units::duration(diff_time),
            units::rate(s.launch_bytes, diff_time)
        ),
    }
}
