//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Cursor;
use std::path::{Path, PathBuf};

use kimberley_formats::apply::{apply_chain, ApplyOptions, ApplyStats, Input};
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::diff::{diff, DiffOptions, DiffStats, Parent, Protection};
use kimberley_formats::progress::Progress;
use kimberley_formats::sparse::{data_extents, ExtentMap};
use kimberley_formats::testkit::{make_pair, Pair, PairSpec};
use kimberley_formats::vmdir::VmDir;
use kimberley_formats::Result;

pub mod crafted;

pub const KEY: [u8; 32] = [0x4b; 32];

pub fn diff_bytes(
    base: &Path,
    launch: &Path,
    protection: Protection,
    parent: Option<Parent>,
) -> (Vec<u8>, DiffStats) {
    let opts = DiffOptions {
        parent,
        threads: 2,
        ..DiffOptions::new(protection)
    };
    diff_with(base, launch, &opts)
}

/// Diffs with any options.
pub fn diff_with(base: &Path, launch: &Path, opts: &DiffOptions) -> (Vec<u8>, DiffStats) {
    let base = VmDir::open(base).unwrap();
    let launch = VmDir::open(launch).unwrap();
    diff(&base, &launch, opts, Vec::new(), &Progress::default()).unwrap()
}

pub fn apply(
    base: &Path,
    overlays: &[&[u8]],
    out: &Path,
    secret: Option<Secret>,
) -> Result<ApplyStats> {
    apply_with(base, overlays, out, secret, ReadPolicy::default())
}

/// [`apply`] under a reader policy other than the default.
pub fn apply_with(
    base: &Path,
    overlays: &[&[u8]],
    out: &Path,
    secret: Option<Secret>,
    policy: ReadPolicy,
) -> Result<ApplyStats> {
    let base = VmDir::open(base)?;
    let inputs = overlays
        .iter()
        .enumerate()
        .map(|(i, b)| Input {
            name: format!("overlay{i}"),
            reader: Box::new(Cursor::new(b.to_vec())),
        })
        .collect();
    apply_chain(
        &base,
        inputs,
        out,
        &ApplyOptions {
            secret,
            policy,
            threads: 2,
            sync: true,
        },
        &Progress::default(),
    )
}

/// Asserts `out` holds exactly the launch VM's bytes and manifest.
pub fn assert_same_vm(out: &Path, launch: &Path) {
    let o = VmDir::open(out).unwrap();
    let l = VmDir::open(launch).unwrap();
    assert_eq!(o.manifest.components, l.manifest.components);
    assert_eq!(o.identity(), l.identity());
    for i in 0..l.manifest.components.len() {
        let a = std::fs::read(o.component_path(i)).unwrap();
        let b = std::fs::read(l.component_path(i)).unwrap();
        assert!(a == b, "component {i} differs");
    }
    o.verify().unwrap();
}

pub fn extents(p: &Path) -> ExtentMap {
    let f = std::fs::File::open(p).unwrap();
    let size = f.metadata().unwrap().len();
    ExtentMap::new(data_extents(&f, size).unwrap())
}

/// Names in `dir` (to check nothing was left behind).
pub fn listing(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// A small base and launch VM (256 KiB of memory, a 512 KiB disk) from
/// `seed`, in `t`.
pub fn small_pair(t: &Path, seed: u64) -> Pair {
    make_pair(
        t,
        &PairSpec {
            seed,
            memory: 256 << 10,
            disks: vec![512 << 10],
            launch_disks: vec![512 << 10],
            change_percent: 20,
            state: Some(100),
        },
    )
    .unwrap()
}
