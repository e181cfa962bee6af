//! `kimberlize diff` is reproducible (FORMAT.md section 7.7): the same
//! inputs, key and options give the same bytes whatever `--threads`, with a
//! key file and with `--no-encrypt`, and a parent diffed again from a copy
//! of its launch VM keeps its child valid.

mod common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;
use kimberley_formats::testkit::{copy_vmdir, make_pair, PairSpec};
use kimberley_formats::vmdir::VmDir;

/// `kimberlize diff` into `out` with `args` after the inputs; its bytes.
fn diff_bytes(base: &Path, launch: &Path, out: &Path, args: &[&OsStr]) -> Vec<u8> {
    ok(diff(base, launch, out, args));
    std::fs::read(out).unwrap()
}

#[test]
fn diff_twice_gives_the_same_bytes_whatever_the_threads() {
    let t = tempfile::tempdir().unwrap();
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    let key = t.path().join("key");
    keygen(&key);
    let o = |n: &str| t.path().join(n);
    for (name, prot) in [
        ("key", vec![OsStr::new("-k"), key.as_os_str()]),
        ("plain", vec![OsStr::new("--no-encrypt")]),
    ] {
        let with = |threads: &'static str| {
            let mut a = prot.clone();
            a.extend([OsStr::new("--threads"), OsStr::new(threads)]);
            a
        };
        let one = diff_bytes(&p.base, &p.launch, &o(&format!("{name}-1.ovl")), &with("1"));
        let four = diff_bytes(&p.base, &p.launch, &o(&format!("{name}-4.ovl")), &with("4"));
        let differing = one.iter().zip(&four).filter(|(a, b)| a != b).count();
        assert!(
            one == four,
            "{name}: --threads 1 and 4 differ in {differing} of {} bytes",
            one.len()
        );
    }
}

#[test]
fn a_parent_diffed_again_keeps_its_child_valid() {
    let t = tempfile::tempdir().unwrap();
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    let p2 = second_pair(t.path());
    let key = t.path().join("key");
    keygen(&key);
    let k = [OsStr::new("-k"), key.as_os_str()];
    let l1 = t.path().join("l1.ovl");
    let l2 = t.path().join("l2.ovl");
    let first = diff_bytes(&p.base, &p.launch, &l1, &k);
    let mut child = k.to_vec();
    child.extend([OsStr::new("--parent"), l1.as_os_str()]);
    diff_bytes(&p.base, &p2.launch, &l2, &child);
    // The parent rebuilt: its launch VM copied to a new directory (new
    // files, new times), diffed again with other threads.
    let mid = t.path().join("mid-again");
    copy_vmdir(&p.launch, &mid).unwrap();
    let l1b = t.path().join("l1-again.ovl");
    let mut again = k.to_vec();
    again.extend([OsStr::new("--threads"), OsStr::new("3")]);
    assert!(
        diff_bytes(&p.base, &mid, &l1b, &again) == first,
        "the rebuilt parent differs"
    );
    let out = t.path().join("out");
    ok(tool!(
        "dekimberlize",
        "--base",
        &p.base,
        "-i",
        &l1b,
        "-i",
        &l2,
        "-k",
        &key,
        "-o",
        &out
    ));
    // The child's launch VM, checked against its digests.
    let got = VmDir::open(&out).unwrap();
    got.verify().unwrap();
    assert_eq!(got.identity(), VmDir::open(&p2.launch).unwrap().identity());
}
