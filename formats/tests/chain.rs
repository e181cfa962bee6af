//! Layered overlays: L2 relative to base + L1, applied as a chain; wrong
//! order and missing links refused before anything is written.

mod common;

use common::*;
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::diff::{Parent, Protection};
use kimberley_formats::overlay::header::Header;
use kimberley_formats::testkit::{make_pair, PairSpec};
use kimberley_formats::vmdir::VmDir;
use kimberley_formats::Error;

struct Chain {
    _t: tempfile::TempDir,
    base: std::path::PathBuf,
    mid: std::path::PathBuf,
    top: std::path::PathBuf,
    l1: Vec<u8>,
    l2: Vec<u8>,
}

fn chain() -> Chain {
    let t = tempfile::tempdir().unwrap();
    for d in ["1", "2"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
    }
    // base -> mid is one generated pair; mid -> top diffs mid against the
    // launch VM of a second pair (any VM can be a launch VM).
    let p1 = make_pair(&t.path().join("1"), &PairSpec::default()).unwrap();
    let p2 = make_pair(
        &t.path().join("2"),
        &PairSpec {
            seed: 2,
            ..Default::default()
        },
    )
    .unwrap();
    let (l1, _) = diff_bytes(&p1.base, &p1.launch, Protection::Key(KEY), None);
    let h1 = Header::decode(&l1).unwrap();
    let parent = Parent {
        overlay_id: h1.overlay_id,
        depth: h1.depth,
        result_id: VmDir::open(&p1.launch).unwrap().identity(),
    };
    let (l2, _) = diff_bytes(&p1.launch, &p2.launch, Protection::Key(KEY), Some(parent));
    Chain {
        base: p1.base,
        mid: p1.launch,
        top: p2.launch,
        l1,
        l2,
        _t: t,
    }
}

#[test]
fn chain_applies_in_one_run() {
    let c = chain();
    let out = c._t.path().join("out");
    let s = apply(&c.base, &[&c.l1, &c.l2], &out, Some(Secret::Key(KEY))).unwrap();
    assert_eq!(s.overlays, 2);
    assert_same_vm(&out, &c.top);
    // No intermediate layer is left behind.
    let names: Vec<_> = listing(c._t.path())
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["1", "2", "out"], "intermediate layers left behind");
    let h2 = Header::decode(&c.l2).unwrap();
    assert_eq!(h2.depth, 1);
    assert_ne!(
        h2.base_id,
        VmDir::open(&c.mid).unwrap().identity(),
        "identities are keyed"
    );
}

#[test]
fn wrong_order_and_missing_links_are_refused() {
    let c = chain();
    let out = c._t.path().join("out");
    let before = listing(c._t.path());
    let e = apply(&c.base, &[&c.l2, &c.l1], &out, Some(Secret::Key(KEY))).unwrap_err();
    assert!(matches!(e, Error::Chain(_)), "{e}");
    assert_eq!(e.exit_code(), 5);
    let e = apply(&c.base, &[&c.l2], &out, Some(Secret::Key(KEY))).unwrap_err();
    assert!(matches!(e, Error::Chain(_)), "{e}");
    assert!(e.to_string().contains("parent"), "{e}");
    let e = apply(&c.base, &[&c.l1, &c.l1], &out, Some(Secret::Key(KEY))).unwrap_err();
    assert!(matches!(e, Error::Chain(_)), "{e}");
    assert_eq!(listing(c._t.path()), before);
    // L2 on its own applies to the VM L1 produces.
    apply(&c.mid, &[&c.l2], &out, Some(Secret::Key(KEY))).unwrap();
    assert_same_vm(&out, &c.top);
}

#[test]
fn a_parent_that_does_not_produce_the_base_is_refused() {
    let c = chain();
    let h1 = Header::decode(&c.l1).unwrap();
    let base = VmDir::open(&c.base).unwrap();
    let top = VmDir::open(&c.top).unwrap();
    let mut opts = kimberley_formats::diff::DiffOptions::new(Protection::None);
    opts.parent = Some(Parent {
        overlay_id: h1.overlay_id,
        depth: 0,
        result_id: VmDir::open(&c.mid).unwrap().identity(),
    });
    let e = kimberley_formats::diff::diff(&base, &top, &opts, Vec::new(), &Default::default())
        .unwrap_err();
    assert!(matches!(e, Error::Chain(_)), "{e}");
}
