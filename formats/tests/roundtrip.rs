//! Round trips: diff then apply gives back the launch VM byte for byte,
//! with holes preserved, for every protection and shape of VM.

mod common;

use common::*;
use kimberley_formats::chunk::CHUNK;
use kimberley_formats::crypto::keys::{Argon2Params, Secret};
use kimberley_formats::diff::Protection;
use kimberley_formats::overlay::segment::TARGET_BODY;
use kimberley_formats::testkit::{make_pair, PairSpec};

fn round_trip(spec: PairSpec) -> kimberley_formats::diff::DiffStats {
    let t = tempfile::tempdir().unwrap();
    let pair = make_pair(t.path(), &spec).unwrap();
    let (ovl, stats) = diff_bytes(&pair.base, &pair.launch, Protection::Key(KEY), None);
    let out = t.path().join("out");
    let a = apply(&pair.base, &[&ovl], &out, Some(Secret::Key(KEY))).unwrap();
    assert_same_vm(&out, &pair.launch);
    assert_eq!(a.chunks, stats.chunks);
    assert_eq!(a.overlay_bytes, ovl.len() as u64);
    stats
}

#[test]
fn default_pair_uses_every_encoding() {
    let s = round_trip(PairSpec::default());
    let c = s.chunks;
    assert!(
        c.unchanged > 0
            && c.zero > 0
            && c.ref_base > 0
            && c.ref_self > 0
            && c.delta > 0
            && c.literal > 0,
        "{c:?}"
    );
}

#[test]
fn identical_vms_give_an_empty_overlay() {
    let s = round_trip(PairSpec {
        change_percent: 0,
        state: None,
        ..Default::default()
    });
    assert_eq!(s.chunks.total(), s.chunks.unchanged);
    assert_eq!(s.segments, 0);
    // Header, manifest, an empty coverage map (version 2), index, footer.
    assert!(s.overlay_bytes < 450, "{}", s.overlay_bytes);
}

#[test]
fn sizes_change_and_disks_appear() {
    round_trip(PairSpec {
        launch_disks: vec![3 << 20],
        ..Default::default()
    });
    round_trip(PairSpec {
        launch_disks: vec![(1 << 20) + 100],
        ..Default::default()
    });
    round_trip(PairSpec {
        launch_disks: vec![2 << 20, 1 << 20],
        ..Default::default()
    });
    round_trip(PairSpec {
        disks: vec![(1 << 20) + 777],
        launch_disks: vec![(1 << 20) + 777, 5000],
        state: None,
        seed: 9,
        ..Default::default()
    });
    round_trip(PairSpec {
        disks: vec![],
        launch_disks: vec![],
        change_percent: 60,
        ..Default::default()
    });
}

#[test]
fn every_protection_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let pair = make_pair(t.path(), &PairSpec::default()).unwrap();
    let small = Argon2Params {
        m_cost: 64,
        t_cost: 1,
        p_cost: 1,
    };
    let cases: Vec<(Protection, Option<Secret>)> = vec![
        (Protection::None, None),
        (Protection::Key(KEY), Some(Secret::Key(KEY))),
        (
            Protection::Passphrase(b"correct horse".to_vec(), small),
            Some(Secret::Passphrase(b"correct horse".to_vec())),
        ),
    ];
    for (k, (prot, secret)) in cases.into_iter().enumerate() {
        let (ovl, _) = diff_bytes(&pair.base, &pair.launch, prot, None);
        let out = t.path().join(format!("out{k}"));
        apply(&pair.base, &[&ovl], &out, secret).unwrap();
        assert_same_vm(&out, &pair.launch);
    }
}

#[test]
fn holes_stay_holes_and_written_zeros_stay_written() {
    let t = tempfile::tempdir().unwrap();
    let pair = make_pair(
        t.path(),
        &PairSpec {
            change_percent: 5,
            ..Default::default()
        },
    )
    .unwrap();
    let (ovl, _) = diff_bytes(&pair.base, &pair.launch, Protection::None, None);
    let out = t.path().join("out");
    apply(&pair.base, &[&ovl], &out, None).unwrap();
    for f in ["memory.raw", "disk0.raw"] {
        let base = std::fs::read(pair.base.join(f)).unwrap();
        let launch = std::fs::read(pair.launch.join(f)).unwrap();
        let (be, oe) = (extents(&pair.base.join(f)), extents(&out.join(f)));
        let (mut holes, mut zeros) = (0, 0);
        for i in 0..(launch.len() as u64 / CHUNK) {
            let r = (i * CHUNK) as usize..((i + 1) * CHUNK) as usize;
            if base.get(r.clone()) != Some(&launch[r.clone()]) {
                continue; // changed: the overlay decides
            }
            let (a, b) = (i * CHUNK, (i + 1) * CHUNK);
            if be.is_hole(a, b) {
                assert!(oe.is_hole(a, b), "{f}: base hole at chunk {i} became data");
                holes += 1;
            } else if launch[r].iter().all(|&x| x == 0) {
                assert!(
                    !oe.is_hole(a, b),
                    "{f}: written zeros at chunk {i} became a hole"
                );
                zeros += 1;
            }
        }
        assert!(
            holes > 10 && zeros > 10,
            "{f}: the test pair has {holes} holes and {zeros} zero pages"
        );
    }
}

#[test]
fn overlay_is_streamed_in_bounded_segments() {
    let t = tempfile::tempdir().unwrap();
    let pair = make_pair(
        t.path(),
        &PairSpec {
            memory: 64 << 20,
            disks: vec![],
            launch_disks: vec![],
            change_percent: 70,
            state: None,
            seed: 3,
        },
    )
    .unwrap();
    let (ovl, s) = diff_bytes(&pair.base, &pair.launch, Protection::None, None);
    assert!(s.segments >= 4, "{} segments", s.segments);
    // A body exceeds the target by at most one record (a literal run of
    // at most 1 MiB).
    assert!(s.body_bytes / s.segments < (TARGET_BODY + (1 << 20)) as u64);
    let out = t.path().join("out");
    apply(&pair.base, &[&ovl], &out, None).unwrap();
    assert_same_vm(&out, &pair.launch);
}

/// Content repeated 2 MiB further on in the launch memory, shifted by 100
/// bytes (so no chunk of it equals another chunk: it is all LITERAL) costs
/// about once with the default segments (FORMAT.md section 12.2: 4 MiB
/// bodies at level 8, whose window spans both copies) and twice with
/// 1 MiB segments, where the copies fall into different segments (each
/// zstd frame starts with an empty window). Both overlays round trip.
#[test]
fn default_segments_find_content_repeated_beyond_a_mebibyte() {
    use kimberley_formats::diff::DiffOptions;
    use kimberley_formats::testkit::{Image, Rng};
    use kimberley_formats::vmdir::import::{import, ImportSpec};

    let t = tempfile::tempdir().unwrap();
    let size = 8u64 << 20;
    let mut block = vec![0u8; 3 << 19]; // 1.5 MiB of random bytes
    Rng(7).fill(&mut block);
    let mut mem = vec![0u8; size as usize];
    mem[..block.len()].copy_from_slice(&block);
    let at = (2 << 20) + 100;
    mem[at..at + block.len()].copy_from_slice(&block);
    let mut launch = Image::new(size);
    for (i, page) in mem.chunks(CHUNK as usize).enumerate() {
        if page.iter().any(|&b| b != 0) {
            launch.set(i as u64, page.to_vec());
        }
    }
    let vm = |name: &str, img: &Image| {
        let raw = t.path().join(format!("{name}.raw"));
        img.write(&raw).unwrap();
        let dir = t.path().join(name);
        let spec = ImportSpec {
            name: name.into(),
            vcpus: 1,
            memory: raw,
            disks: vec![],
            state: None,
        };
        import(&dir, &spec).unwrap();
        dir
    };
    let (base, launch) = (vm("base", &Image::new(size)), vm("launch", &launch));
    let sizes: Vec<usize> = [None, Some(1 << 20)]
        .into_iter()
        .enumerate()
        .map(|(k, segment_bytes)| {
            let mut opts = DiffOptions {
                threads: 2,
                ..DiffOptions::new(Protection::Key(KEY))
            };
            if let Some(s) = segment_bytes {
                opts.segment_bytes = s;
            }
            let (ovl, stats) = diff_with(&base, &launch, &opts);
            assert_eq!(stats.chunks.literal, 2 * 384 + 1, "{:?}", stats.chunks);
            let out = t.path().join(format!("out-{k}"));
            apply(&base, &[&ovl], &out, Some(Secret::Key(KEY))).unwrap();
            assert_same_vm(&out, &launch);
            ovl.len()
        })
        .collect();
    let (default, small) = (sizes[0], sizes[1]);
    assert!(default < block.len() + (block.len() / 10), "{sizes:?}");
    assert!(small > 2 * block.len() - (block.len() / 10), "{sizes:?}");
}
