//! Reproducible overlays (FORMAT.md section 7.7): the same inputs, key and
//! options give the same bytes whatever the thread counts; anything that
//! changes the bytes changes the salt; a rebuilt parent keeps its children
//! valid; an encrypted diff refuses a launch VM that does not match its
//! manifest before sealing anything.

mod common;

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};

use common::*;
use kimberley_formats::crypto::keys::Argon2Params;
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::diff::{diff, DiffOptions, Parent, Protection};
use kimberley_formats::overlay::header::Header;
use kimberley_formats::progress::Progress;
use kimberley_formats::testkit::{copy_vmdir, make_pair, Pair, PairSpec};
use kimberley_formats::vmdir::VmDir;

/// Diffs with `threads` compression workers inside a rayon pool of `pool`
/// threads (the classifier's parallelism), 8 KiB segments unless `opts`
/// says otherwise.
fn encode(
    base: &Path,
    launch: &Path,
    prot: Protection,
    threads: usize,
    pool: usize,
    tweak: impl FnOnce(&mut DiffOptions),
) -> Vec<u8> {
    let mut opts = DiffOptions {
        threads,
        segment_bytes: 8 << 10,
        ..DiffOptions::new(prot)
    };
    tweak(&mut opts);
    rayon::ThreadPoolBuilder::new()
        .num_threads(pool)
        .build()
        .unwrap()
        .install(|| diff_with(base, launch, &opts))
        .0
}

/// Data segments in an overlay (from its index, through a reader).
fn segments(base: &Path, ovl: &[u8], secret: Option<Secret>, out: &Path) -> u64 {
    let s = apply(base, &[ovl], out, secret).unwrap();
    s.segments
}

fn header(ovl: &[u8]) -> Header {
    Header::decode(ovl).unwrap()
}

fn pair(t: &Path, spec: PairSpec) -> Pair {
    make_pair(t, &spec).unwrap()
}

#[test]
fn same_inputs_give_the_same_bytes_whatever_the_threads() {
    let t = tempfile::tempdir().unwrap();
    let p = pair(t.path(), PairSpec::default());
    for (name, prot) in [("key", Protection::Key(KEY)), ("plain", Protection::None)] {
        let small = |o: &mut DiffOptions| o.segment_bytes = 4096;
        let one = encode(&p.base, &p.launch, prot.clone(), 1, 1, small);
        let h = header(&one);
        for (threads, pool) in [(2, 2), (4, 3), (8, 1)] {
            let other = encode(&p.base, &p.launch, prot.clone(), threads, pool, small);
            assert!(
                other == one,
                "{name}: {threads} workers in a pool of {pool} wrote other bytes (salt {:02x?} vs {:02x?})",
                &header(&other).salt[..4],
                &h.salt[..4]
            );
        }
        // Still a valid overlay of the launch VM.
        let out = t.path().join(format!("out-{name}"));
        let secret = matches!(prot, Protection::Key(_)).then_some(Secret::Key(KEY));
        let n = segments(&p.base, &one, secret, &out);
        assert!(n >= 20, "the test needs many segments, not {n}");
        assert_same_vm(&out, &p.launch);
    }
}

#[test]
fn the_salt_commits_to_key_content_name_parent_and_options() {
    let t = tempfile::tempdir().unwrap();
    std::fs::create_dir(t.path().join("a")).unwrap();
    std::fs::create_dir(t.path().join("b")).unwrap();
    let p = pair(&t.path().join("a"), PairSpec::default());
    // Same seed: the same base; another change rate: another launch VM.
    let q = pair(
        &t.path().join("b"),
        PairSpec {
            change_percent: 11,
            ..Default::default()
        },
    );
    assert_eq!(
        VmDir::open(&p.base).unwrap().identity(),
        VmDir::open(&q.base).unwrap().identity()
    );
    // The launch VM under another name: same identity, other manifest.
    let renamed = t.path().join("renamed");
    copy_vmdir(&p.launch, &renamed).unwrap();
    let m = renamed.join("manifest.json");
    let mut j: serde_json::Value = serde_json::from_slice(&std::fs::read(&m).unwrap()).unwrap();
    j["name"] = "another name".into();
    std::fs::write(&m, serde_json::to_vec_pretty(&j).unwrap()).unwrap();
    assert_eq!(
        VmDir::open(&renamed).unwrap().identity(),
        VmDir::open(&p.launch).unwrap().identity()
    );

    let salt = |base: &Path, launch: &Path, prot: Protection, tweak: &dyn Fn(&mut DiffOptions)| {
        let h = header(&encode(base, launch, prot, 2, 2, tweak));
        (h.salt, h.overlay_id)
    };
    let none = |_: &mut DiffOptions| {};
    let reference = salt(&p.base, &p.launch, Protection::Key(KEY), &none);
    let variants = [
        (
            "another key",
            salt(&p.base, &p.launch, Protection::Key([0x11; 32]), &none),
        ),
        (
            "unencrypted",
            salt(&p.base, &p.launch, Protection::None, &none),
        ),
        (
            "another launch VM",
            salt(&q.base, &q.launch, Protection::Key(KEY), &none),
        ),
        (
            "another name",
            salt(&p.base, &renamed, Protection::Key(KEY), &none),
        ),
        (
            "another level",
            salt(&p.base, &p.launch, Protection::Key(KEY), &|o| o.level = 4),
        ),
        (
            "another segment size",
            salt(&p.base, &p.launch, Protection::Key(KEY), &|o| {
                o.segment_bytes = 16 << 10
            }),
        ),
        (
            "a parent",
            salt(&p.base, &p.launch, Protection::Key(KEY), &|o| {
                o.parent = Some(Parent {
                    overlay_id: [9; 16],
                    depth: 0,
                    result_id: VmDir::open(&p.base).unwrap().identity(),
                })
            }),
        ),
    ];
    for (what, (s, id)) in &variants {
        assert_ne!(*s, reference.0, "{what}: same salt");
        assert_ne!(*id, reference.1, "{what}: same overlay id");
    }
    // ...and nothing else does: a copy of both VMs, elsewhere.
    let (b2, l2) = (t.path().join("b2"), t.path().join("l2"));
    copy_vmdir(&p.base, &b2).unwrap();
    copy_vmdir(&p.launch, &l2).unwrap();
    assert_eq!(salt(&b2, &l2, Protection::Key(KEY), &none), reference);
}

#[test]
fn passphrase_overlays_keep_random_salts() {
    // Argon2id needs the salt before any key exists: FORMAT.md 7.7.
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path(), 3);
    let prot = Protection::Passphrase(
        b"pw".to_vec(),
        Argon2Params {
            m_cost: 64,
            t_cost: 1,
            p_cost: 1,
        },
    );
    let a = header(&encode(&p.base, &p.launch, prot.clone(), 1, 1, |_| {}));
    let b = header(&encode(&p.base, &p.launch, prot, 1, 1, |_| {}));
    assert_ne!(a.salt, b.salt);
    assert_ne!(a.overlay_id, b.overlay_id);
}

#[test]
fn a_rebuilt_parent_keeps_its_children_valid() {
    let t = tempfile::tempdir().unwrap();
    for d in ["1", "2"] {
        std::fs::create_dir(t.path().join(d)).unwrap();
    }
    let p1 = pair(&t.path().join("1"), PairSpec::default());
    let p2 = pair(
        &t.path().join("2"),
        PairSpec {
            seed: 2,
            ..Default::default()
        },
    );
    let l1 = encode(&p1.base, &p1.launch, Protection::Key(KEY), 1, 1, |_| {});
    let parent = Parent {
        overlay_id: header(&l1).overlay_id,
        depth: 0,
        result_id: VmDir::open(&p1.launch).unwrap().identity(),
    };
    let l2 = encode(&p1.launch, &p2.launch, Protection::Key(KEY), 2, 2, |o| {
        o.parent = Some(parent)
    });
    // The parent rebuilt: its launch VM copied elsewhere, other threads.
    let mid = t.path().join("mid-again");
    copy_vmdir(&p1.launch, &mid).unwrap();
    let l1_again = encode(&p1.base, &mid, Protection::Key(KEY), 4, 3, |_| {});
    assert!(l1_again == l1, "the rebuilt parent differs");
    let out = t.path().join("out");
    apply(&p1.base, &[&l1_again, &l2], &out, Some(Secret::Key(KEY))).unwrap();
    assert_same_vm(&out, &p2.launch);
}

/// A writer that keeps what reached it after the diff has consumed it.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<u8>>>);

impl Write for Recorder {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_launch_vm_unlike_its_manifest_is_refused_before_anything_is_sealed() {
    // The salt commits to the launch content through the manifest's
    // digests. Content changed behind the manifest (a VM run in place)
    // sealed under that salt would reuse the nonces of the overlay of the
    // declared content: ChaCha20-Poly1305 with a repeated nonce leaks the
    // XOR of both plaintexts and lets the one-time Poly1305 keys be found.
    let t = tempfile::tempdir().unwrap();
    let p = pair(t.path(), PairSpec::default());
    let launch = VmDir::open(&p.launch).unwrap();
    let mem = launch.component_path(0);
    let mut bytes = std::fs::read(&mem).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x5a;
    std::fs::write(&mem, &bytes).unwrap();
    let rec = Recorder::default();
    let opts = DiffOptions {
        threads: 2,
        segment_bytes: 8 << 10,
        ..DiffOptions::new(Protection::Key(KEY))
    };
    let e = diff(
        &VmDir::open(&p.base).unwrap(),
        &launch,
        &opts,
        rec.clone(),
        &Progress::default(),
    )
    .map(|_| ())
    .unwrap_err();
    assert!(e.to_string().contains("does not match its manifest"), "{e}");
    let written = rec.0.lock().unwrap().len();
    assert_eq!(written, 0, "{written} bytes written before the refusal");
}
