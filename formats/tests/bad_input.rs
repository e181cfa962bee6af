//! Bad input: every kind is refused with its error class, nothing that looks
//! finished is left on disk, and nothing panics.

mod common;

use std::path::Path;

use common::*;
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::diff::{DiffOptions, Protection};
use kimberley_formats::overlay::frame::{FrameHeader, FRAME_HEADER_LEN};
use kimberley_formats::overlay::header::HEADER_LEN;
use kimberley_formats::testkit::{make_pair, PairSpec};
use kimberley_formats::Error;

/// Offsets of every frame header in an overlay.
fn frames(ovl: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    loop {
        let fh = FrameHeader::decode(ovl[at..at + FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
        let len = FRAME_HEADER_LEN + fh.sealed_len as usize;
        out.push((at, len));
        at += len;
        if fh.last {
            return out;
        }
    }
}

fn refuse(base: &Path, ovls: &[&[u8]], secret: Option<Secret>, dir: &Path) -> Error {
    let out = dir.join("out");
    let before = listing(dir);
    let e = apply(base, ovls, &out, secret).expect_err("bad input was accepted");
    assert_eq!(listing(dir), before, "a failed apply left something behind");
    e
}

#[test]
fn truncation_anywhere_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 1);
    for prot in [Protection::Key(KEY), Protection::None] {
        let secret = matches!(prot, Protection::Key(_)).then_some(Secret::Key(KEY));
        let (ovl, _) = diff_bytes(&p.base, &p.launch, prot, None);
        let mut cuts: Vec<usize> = vec![
            0,
            1,
            7,
            8,
            100,
            HEADER_LEN - 1,
            HEADER_LEN,
            ovl.len() - 1,
            ovl.len() - 24,
            ovl.len() - 25,
        ];
        for (at, len) in frames(&ovl) {
            cuts.extend([at, at + 1, at + FRAME_HEADER_LEN, at + len - 1]);
        }
        cuts.extend((0..ovl.len()).step_by(ovl.len() / 50 + 1));
        for cut in cuts {
            let e = refuse(&p.base, &[&ovl[..cut]], secret.clone(), t.path());
            assert!(
                matches!(e, Error::Truncated(_) | Error::Empty),
                "cut at {cut} of {}: {e}",
                ovl.len()
            );
            assert_eq!(e.exit_code(), 3);
        }
    }
}

#[test]
fn every_flipped_bit_is_detected() {
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 2);
    for prot in [Protection::Key(KEY), Protection::None] {
        let secret = matches!(prot, Protection::Key(_)).then_some(Secret::Key(KEY));
        let (ovl, _) = diff_bytes(&p.base, &p.launch, prot, None);
        // Every byte of the header, frame headers and footer; a sample of
        // the sealed payloads.
        let mut at: Vec<usize> = (0..HEADER_LEN).chain(ovl.len() - 24..ovl.len()).collect();
        for (a, len) in frames(&ovl) {
            at.extend(a..a + FRAME_HEADER_LEN);
            at.extend((a + FRAME_HEADER_LEN..a + len).step_by(97));
            at.push(a + len - 1);
        }
        for i in at {
            let mut bad = ovl.clone();
            bad[i] ^= 1 << (i % 8);
            let e = refuse(&p.base, &[&bad], secret.clone(), t.path());
            assert!([3, 4].contains(&e.exit_code()), "flip at {i}: {e}");
        }
    }
}

#[test]
fn reordered_dropped_duplicated_and_spliced_segments_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 3);
    // Enough changed data for several segments.
    let p = {
        let d = t.path().join("big");
        std::fs::create_dir(&d).unwrap();
        let _ = p;
        make_pair(
            &d,
            &PairSpec {
                memory: 24 << 20,
                disks: vec![],
                launch_disks: vec![],
                change_percent: 80,
                state: None,
                seed: 5,
            },
        )
        .unwrap()
    };
    let (a, _) = diff_bytes(&p.base, &p.launch, Protection::Key(KEY), None);
    // Another overlay under the same key: the same content at another zstd
    // level (the same options would give `a` again, byte for byte).
    let (b, _) = diff_with(
        &p.base,
        &p.launch,
        &DiffOptions {
            level: 1,
            threads: 2,
            ..DiffOptions::new(Protection::Key(KEY))
        },
    );
    let fa = frames(&a);
    assert!(
        fa.len() >= 4,
        "need at least two data segments, got {}",
        fa.len()
    );
    let seg = |o: &[u8], (at, len): (usize, usize)| o[at..at + len].to_vec();
    let join = |parts: Vec<Vec<u8>>| parts.concat();
    let head = a[..HEADER_LEN].to_vec();
    let foot = a[a.len() - 24..].to_vec();
    let n = fa.len();
    let body = |idx: Vec<usize>| -> Vec<u8> {
        let mut v = vec![head.clone()];
        v.extend(idx.into_iter().map(|i| seg(&a, fa[i])));
        v.push(foot.clone());
        join(v)
    };
    let mut order: Vec<usize> = (0..n).collect();
    order.swap(1, 2);
    let reordered = body(order);
    let dropped = body((0..n).filter(|&i| i != 1).collect());
    let duplicated = body([0, 1, 1].into_iter().chain(2..n).collect());
    let no_index = body((0..n - 1).collect());
    // Splice: a segment of overlay b (same key, same content) into a.
    let fb = frames(&b);
    let spliced = join(vec![
        a[..fa[1].0].to_vec(),
        seg(&b, fb[1]),
        a[fa[1].0 + fa[1].1..].to_vec(),
    ]);
    assert_ne!(spliced, a);
    let mut trailing = a.clone();
    trailing.push(0);
    for (what, bad) in [
        ("reordered", reordered),
        ("dropped", dropped),
        ("duplicated", duplicated),
        ("no index", no_index),
        ("spliced", spliced),
        ("trailing", trailing),
    ] {
        let e = refuse(&p.base, &[&bad], Some(Secret::Key(KEY)), t.path());
        assert!([3, 4].contains(&e.exit_code()), "{what}: {e}");
    }
}

#[test]
fn wrong_key_wrong_base_garbage_empty_and_existing_output() {
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 4);
    let d = t.path().join("other");
    std::fs::create_dir(&d).unwrap();
    let other = small_pair(&d, 5);
    let (ovl, _) = diff_bytes(&p.base, &p.launch, Protection::Key(KEY), None);
    let e = refuse(&p.base, &[&ovl], Some(Secret::Key([1; 32])), t.path());
    assert!(matches!(e, Error::Auth(_)) && e.exit_code() == 4, "{e}");
    // No key given at all: the user's mistake (usage), not a failed check.
    let e = refuse(&p.base, &[&ovl], None, t.path());
    assert!(matches!(e, Error::Usage(_)) && e.exit_code() == 2, "{e}");
    let e = refuse(
        &p.base,
        &[&ovl],
        Some(Secret::Passphrase(b"pw".to_vec())),
        t.path(),
    );
    assert!(matches!(e, Error::Key(_)), "{e}");
    let e = refuse(&other.base, &[&ovl], Some(Secret::Key(KEY)), t.path());
    assert!(
        matches!(e, Error::WrongBase(_)) && e.exit_code() == 5,
        "{e}"
    );
    let e = refuse(
        &p.base,
        &[b"#!/bin/sh\necho this is not an overlay\n"],
        None,
        t.path(),
    );
    assert!(
        e.exit_code() == 3 && e.to_string().contains("not a Kimberley overlay"),
        "{e}"
    );
    let e = refuse(&p.base, &[b""], None, t.path());
    assert!(e.exit_code() == 3 && e.to_string().contains("empty"), "{e}");
    let e = apply(&p.base, &[&ovl], &p.launch, Some(Secret::Key(KEY))).unwrap_err();
    assert!(matches!(e, Error::Exists(_)) && e.exit_code() == 6, "{e}");
}

#[test]
fn a_base_changed_behind_its_manifest_is_never_reported_as_success() {
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 6);
    let (ovl, _) = diff_bytes(&p.base, &p.launch, Protection::None, None);
    // Change an unchanged base page without updating the manifest.
    let mem = p.base.join("memory.raw");
    let launch = std::fs::read(p.launch.join("memory.raw")).unwrap();
    let mut base = std::fs::read(&mem).unwrap();
    let i = (0..base.len() / 4096)
        .find(|&i| {
            base[i * 4096..(i + 1) * 4096] == launch[i * 4096..(i + 1) * 4096]
                && base[i * 4096] != 0
        })
        .unwrap();
    base[i * 4096] ^= 0xff;
    std::fs::write(&mem, &base).unwrap();
    let e = refuse(&p.base, &[&ovl], None, t.path());
    assert!(matches!(e, Error::Mismatch(_)) && e.exit_code() == 8, "{e}");
}
