//! A parent applied in memory (`apply::patch`): the same VM a written apply
//! makes, the same overlay when diffed against, refused over a wrong base.

mod common;

use std::io::Cursor;
use std::os::unix::fs::FileExt;

use common::*;
use kimberley_formats::apply::{self, ApplyOptions, Input, Opened, Patch};
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::diff::{diff, DiffOptions, Parent, Protection};
use kimberley_formats::overlay::header::Header;
use kimberley_formats::progress::Progress;
use kimberley_formats::testkit::{make_pair, PairSpec};
use kimberley_formats::vmdir::patched::Patched;
use kimberley_formats::vmdir::VmDir;
use kimberley_formats::Error;

fn opts() -> ApplyOptions {
    ApplyOptions {
        secret: Some(Secret::Key(KEY)),
        policy: ReadPolicy::default(),
        threads: 2,
        sync: false,
    }
}

/// Applies `overlay` to `base` with `apply::patch` under `budget` (spilling
/// into `base`'s sibling "spill").
fn patch_within(
    base: &std::path::Path,
    overlay: &[u8],
    budget: u64,
) -> kimberley_formats::Result<Patch> {
    let o = opts();
    let input = Input {
        name: "parent".into(),
        reader: Box::new(Cursor::new(overlay.to_vec())),
    };
    let opened = Opened::open(input, o.secret.as_ref(), &o.policy)?;
    let spill = base.with_file_name("spill");
    let (p, _) = apply::patch(
        VmDir::open(base)?,
        opened,
        &o,
        &Progress::default(),
        &spill,
        budget,
    )?;
    Ok(p)
}

/// Applies `overlay` to `base` in memory.
fn patch(base: &std::path::Path, overlay: &[u8]) -> kimberley_formats::Result<Patched> {
    match patch_within(base, overlay, apply::PATCH_BUDGET)? {
        Patch::Memory(p) => Ok(p),
        Patch::Written(d) => panic!("written out to {}", d.path.display()),
    }
}

#[test]
fn a_patched_vm_reads_as_the_launch_vm_and_writes_out_as_it() {
    let t = tempfile::tempdir().unwrap();
    // The generated pair differs in every way the encoder distinguishes:
    // zero, literal, delta, base and self references, a grown disk.
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    let (l1, stats) = diff_bytes(&p.base, &p.launch, Protection::Key(KEY), None);
    let c = stats.chunks;
    assert!(
        c.zero > 0 && c.literal > 0 && c.delta > 0 && c.ref_base > 0 && c.ref_self > 0,
        "{c:?}"
    );
    let v = patch(&p.base, &l1).unwrap();
    let launch = VmDir::open(&p.launch).unwrap();
    assert_eq!(v.manifest.components, launch.manifest.components);
    assert_eq!(v.identity(), launch.identity());
    let files = v.open_files().unwrap();
    for (i, comp) in launch.manifest.components.iter().enumerate() {
        let want = std::fs::read(launch.component_path(i)).unwrap();
        let mut got = vec![0xa5u8; comp.size as usize];
        v.read_at(i, &files, &mut got, 0).unwrap();
        assert!(got == want, "component {i} differs");
        // And in small unaligned pieces.
        let mut piece = [0u8; 3001];
        let mut off = 0u64;
        while off < comp.size {
            let n = ((comp.size - off) as usize).min(piece.len());
            v.read_at(i, &files, &mut piece[..n], off).unwrap();
            assert_eq!(&piece[..n], &want[off as usize..off as usize + n]);
            off += n as u64 * 7;
        }
    }
    // Only what changed is held in memory.
    assert!(v.data_bytes() < kimberley_formats::vmdir::total_size(&launch.manifest.components));
    let out = t.path().join("out");
    v.write_to(&out).unwrap();
    assert_same_vm(&out, &p.launch);
}

#[test]
fn a_diff_against_a_patched_vm_is_the_diff_against_it_written_out() {
    let t = tempfile::tempdir().unwrap();
    for d in ["1", "2"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
    }
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
    let (from_dir, _) = diff_bytes(&p1.launch, &p2.launch, Protection::Key(KEY), Some(parent));
    let v = patch(&p1.base, &l1).unwrap();
    let dopts = DiffOptions {
        parent: Some(parent),
        threads: 2,
        ..DiffOptions::new(Protection::Key(KEY))
    };
    let top = VmDir::open(&p2.launch).unwrap();
    let (from_patched, _) = diff(&v, &top, &dopts, Vec::new(), &Progress::default()).unwrap();
    assert!(
        from_patched == from_dir,
        "the overlays differ ({} and {} bytes)",
        from_patched.len(),
        from_dir.len()
    );
}

#[test]
fn a_patch_over_a_changed_base_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    let (l1, _) = diff_bytes(&p.base, &p.launch, Protection::Key(KEY), None);
    // The base's memory file changed after its manifest was written
    // (identity unchanged): the patched VM's digests no longer match.
    let base = VmDir::open(&p.base).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(base.component_path(0))
        .unwrap();
    f.write_all_at(b"not the base", 4096 * 3 + 17).unwrap();
    drop(f);
    match patch(&p.base, &l1) {
        Err(Error::Mismatch(m)) => assert!(m.contains("digest"), "{m}"),
        other => panic!("expected a digest mismatch, got {:?}", other.map(|_| ())),
    }
    // Another base altogether: refused by its identity.
    std::fs::create_dir(t.path().join("o")).unwrap();
    let other = make_pair(
        &t.path().join("o"),
        &PairSpec {
            seed: 9,
            ..Default::default()
        },
    )
    .unwrap();
    assert!(matches!(patch(&other.base, &l1), Err(Error::WrongBase(_))));
}

#[test]
fn a_patch_over_its_budget_is_written_out_whole() {
    let t = tempfile::tempdir().unwrap();
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    let (l1, _) = diff_bytes(&p.base, &p.launch, Protection::Key(KEY), None);
    let all = patch(&p.base, &l1).unwrap().data_bytes();
    // Spilled at the start, in the middle and near the end of the changes.
    for budget in [0, all / 2, all - 1] {
        match patch_within(&p.base, &l1, budget).unwrap() {
            Patch::Written(d) => assert_same_vm(&d.path, &p.launch),
            Patch::Memory(_) => panic!("{budget} of {all} bytes: kept in memory"),
        }
        std::fs::remove_dir_all(p.base.with_file_name("spill")).unwrap();
    }
    assert!(matches!(
        patch_within(&p.base, &l1, all).unwrap(),
        Patch::Memory(_)
    ));
}

#[test]
fn a_version_2_parent_with_a_working_set_patches_in_memory_and_spilled() {
    use kimberley_formats::chunk::chunk_count;
    use kimberley_formats::overlay::header::VERSION_MAP;
    let t = tempfile::tempdir().unwrap();
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    // Every third chunk of every component, last first: the working-set
    // segments come first and out of position order.
    let launch = VmDir::open(&p.launch).unwrap();
    let mut ws = Vec::new();
    for (i, c) in launch.manifest.components.iter().enumerate().rev() {
        for k in (0..chunk_count(c.size)).rev().step_by(3) {
            ws.push((i as u8, k));
        }
    }
    let dopts = DiffOptions {
        threads: 2,
        segment_bytes: 16 << 10,
        version: VERSION_MAP,
        working_set: ws,
        ..DiffOptions::new(Protection::Key(KEY))
    };
    let (l1, stats) = diff_with(&p.base, &p.launch, &dopts);
    assert!(stats.chunks.ref_self > 0, "{:?}", stats.chunks);
    let map = Opened::open(
        Input {
            name: "l1".into(),
            reader: Box::new(Cursor::new(l1.clone())),
        },
        Some(&Secret::Key(KEY)),
        &ReadPolicy::default(),
    )
    .unwrap()
    .map
    .unwrap();
    assert!(
        map.ws_segments > 1,
        "{} working-set segments",
        map.ws_segments
    );
    let v = patch(&p.base, &l1).unwrap();
    assert_eq!(v.identity(), launch.identity());
    let out = t.path().join("out");
    v.write_to(&out).unwrap();
    assert_same_vm(&out, &p.launch);
    let all = v.data_bytes();
    for budget in [0, all / 2] {
        match patch_within(&p.base, &l1, budget).unwrap() {
            Patch::Written(d) => assert_same_vm(&d.path, &p.launch),
            Patch::Memory(_) => panic!("{budget} of {all} bytes: kept in memory"),
        }
        std::fs::remove_dir_all(p.base.with_file_name("spill")).unwrap();
    }
}

/// A piece holds about what it carries: scattered changes do not each keep
/// a whole write buffer's capacity (thousands of them reserved tens of GiB
/// of address space, and `build --parent` could then not fork QEMU).
#[test]
fn pieces_hold_about_their_bytes() {
    let t = tempfile::tempdir().unwrap();
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    let (l1, _) = diff_bytes(&p.base, &p.launch, Protection::Key(KEY), None);
    let v = patch(&p.base, &l1).unwrap();
    let mut pieces = 0;
    for patches in &v.patches {
        for (off, piece) in patches.pieces() {
            if let kimberley_formats::vmdir::patched::Piece::Data(d) = piece {
                pieces += 1;
                assert!(
                    d.capacity() <= 2 * d.len(),
                    "the piece at {off} holds {} bytes in {} of capacity",
                    d.len(),
                    d.capacity()
                );
            }
        }
    }
    assert!(pieces > 1, "{pieces}");
}
