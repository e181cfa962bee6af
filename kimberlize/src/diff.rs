//! `import` and `diff`.

use std::io::IsTerminal;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use kimberley_cli::output::{open_input, write_json, Output};
use kimberley_cli::progress::Bar;
use kimberley_formats::apply::{self, ApplyOptions, Input, Opened};
use kimberley_formats::diff::{self, DiffOptions, Parent};
use kimberley_formats::fsutil::ScratchDir;
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::import::{import as do_import, ImportSpec};
use kimberley_formats::vmdir::VmDir;

use crate::cli::{DiffArgs, ImportArgs};

pub fn import(a: ImportArgs) -> Result<()> {
    let name = a.name.clone().unwrap_or_else(|| {
        a.output
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "vm".into())
    });
    let spec = ImportSpec {
        name,
        vcpus: a.vcpus,
        memory: a.memory,
        disks: a.disk,
        state: a.state,
    };
    do_import(&a.output, &spec)
        .with_context(|| format!("importing into {}", a.output.display()))?;
    Ok(())
}

pub fn diff(a: DiffArgs) -> Result<()> {
    let threads = kimberley_cli::run::threads(a.threads);
    let protection = a.keys.protection()?;
    let base = VmDir::open(&a.base)?;
    let launch = VmDir::open(&a.launch)?;
    let progress = Arc::new(Progress::default());
    let _bar = Bar::start(progress.clone(), a.quiet);

    // A layered overlay is relative to base + parents: synthesise that
    // into a scratch directory next to the launch VM.
    let mut _scratch = None;
    let mut parent = None;
    let mut effective = base;
    if !a.parent.is_empty() {
        let secret = a.keys.secret()?;
        let mut inputs = Vec::new();
        for p in &a.parent {
            let (name, reader) = open_input(p)?;
            inputs.push(Input { name, reader });
        }
        // Read the last parent's header for its identity first.
        let (name, reader) = open_input(a.parent.last().expect("non-empty"))?;
        let policy = a.read.policy();
        let last = Opened::open(Input { name, reader }, secret.as_ref(), &policy)?;
        parent = Some(Parent {
            overlay_id: last.header.overlay_id,
            depth: last.header.depth,
            result_id: last.result_identity(),
        });
        let scratch = ScratchDir::next_to(&a.launch);
        let dir = scratch.path().to_path_buf();
        // Scratch: not worth an fsync.
        let opts = ApplyOptions {
            secret,
            policy,
            threads,
            sync: false,
        };
        apply::apply_chain(&effective, inputs, &dir, &opts, &progress)
            .context("applying the parent overlays")?;
        _scratch = Some(scratch);
        effective = VmDir::open(&dir)?;
    }

    let out = Output::binary(a.output.as_deref(), a.force)?;
    let opts = DiffOptions {
        level: a.level,
        threads,
        parent,
        ..DiffOptions::new(protection)
    };
    let stats = write_overlay(&effective, &launch, out, &opts, &progress)?;
    drop(_bar);
    if let Some(p) = &a.stats_json {
        write_json(p, &stats)?;
    }
    if !a.quiet && std::io::stderr().is_terminal() {
        summary(&stats, a.output.as_deref());
    }
    Ok(())
}

/// Diffs into `out` and commits it.
pub(crate) fn write_overlay(
    base: &VmDir,
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

pub(crate) fn summary(s: &diff::DiffStats, out: Option<&Path>) {
    let c = &s.chunks;
    eprintln!(
        "{}: {:.1} MiB overlay for {:.1} MiB of launch VM in {:.2} s ({} unchanged, {} zero, {} base refs, {} self refs, {} deltas, {} literal chunks)",
        out.map(|p| p.display().to_string()).unwrap_or_else(|| "stdout".into()),
        s.overlay_bytes as f64 / 1048576.0,
        s.launch_bytes as f64 / 1048576.0,
        s.times.total_ms as f64 / 1000.0,
        c.unchanged,
        c.zero,
        c.ref_base,
        c.ref_self,
        c.delta,
        c.literal
    );
}
