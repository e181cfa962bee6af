//! The progress model: a run's total is fixed before its work starts and the work done adds up to it exactly.

mod common;

use std::io::Cursor;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use kimberley_formats::apply::{apply_chain, ApplyOptions, Input};
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::diff::{self, DiffOptions, Protection};
use kimberley_formats::progress::{Progress, Snapshot};
use kimberley_formats::testkit::{make_pair, PairSpec};
use kimberley_formats::vmdir::VmDir;

/// Runs `work` while a thread records every change of the progress it
/// reports; returns the recorded snapshots, the final one last.
fn watch(work: impl FnOnce(&Progress)) -> Vec<Snapshot> {
    let p = Arc::new(Progress::default());
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let (p, stop) = (p.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut seen: Vec<Snapshot> = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let s = p.snapshot();
                if seen.last() != Some(&s) {
                    seen.push(s);
                }
                std::thread::yield_now();
            }
            seen
        })
    };
    work(&p);
    stop.store(true, Ordering::Relaxed);
    let mut seen = watcher.join().unwrap();
    seen.push(p.snapshot());
    seen
}

/// Every snapshot that shows work done shows the final total, and the work
/// never goes past it; the run ends with done == total.
fn assert_fixed_total(seen: &[Snapshot], want_total: u64) {
    let last = seen.last().unwrap();
    assert_eq!(last.total, Some(want_total), "{last:?}");
    assert_eq!(
        last.done, want_total,
        "the work done does not add up to the total"
    );
    for s in seen {
        if s.done > 0 {
            assert_eq!(
                s.total,
                Some(want_total),
                "the total changed mid-run: {s:?}"
            );
        }
        assert!(s.done <= want_total, "{s:?} went past the total");
    }
}

#[test]
fn diff_and_apply_plan_their_total_before_working() {
    let t = tempfile::tempdir().unwrap();
    // Holes in both VMs and a disk only the launch VM has.
    let pair = make_pair(
        t.path(),
        &PairSpec {
            disks: vec![1 << 20],
            launch_disks: vec![2 << 20, 1 << 20],
            ..PairSpec::default()
        },
    )
    .unwrap();
    let base = VmDir::open(&pair.base).unwrap();
    let launch = VmDir::open(&pair.launch).unwrap();
    let opts = DiffOptions {
        threads: 2,
        ..DiffOptions::new(Protection::None)
    };
    let mut overlay = Vec::new();
    let seen = watch(|p| {
        overlay = diff::diff(&base, &launch, &opts, Vec::new(), p).unwrap().0;
    });
    let size = |d: &VmDir| kimberley_formats::vmdir::total_size(&d.manifest.components);
    assert_eq!(
        diff::work(&base.manifest, &launch),
        size(&base) + size(&launch)
    );
    assert_fixed_total(&seen, diff::work(&base.manifest, &launch));
    let stages: Vec<&str> = seen.iter().map(|s| s.stage.as_str()).collect();
    assert!(stages.contains(&"diffing"), "{stages:?}");

    let out = t.path().join("out");
    let seen = watch(|p| {
        let input = Input {
            name: "overlay".into(),
            reader: Box::new(Cursor::new(overlay.clone())),
        };
        let opts = ApplyOptions {
            secret: None,
            policy: ReadPolicy::default(),
            threads: 2,
            sync: false,
        };
        apply_chain(&base, vec![input], &out, &opts, p).unwrap();
    });
    assert_fixed_total(&seen, size(&launch));
}

#[test]
fn a_front_end_plan_covers_the_whole_run() {
    let t = tempfile::tempdir().unwrap();
    let pair = make_pair(t.path(), &PairSpec::default()).unwrap();
    let base = VmDir::open(&pair.base).unwrap();
    let launch = VmDir::open(&pair.launch).unwrap();
    let opts = DiffOptions::new(Protection::None);
    // A front end that does more (here: one extra stage of 1000 units
    // first) plans it all; the pipeline's own plan does not shrink it.
    let whole = 1000 + diff::work(&base.manifest, &launch);
    let seen = watch(|p| {
        assert!(p.plan(whole));
        p.stage("before");
        p.advance(1000);
        diff::diff(&base, &launch, &opts, Vec::new(), p).unwrap();
    });
    assert_fixed_total(&seen, whole);
}
