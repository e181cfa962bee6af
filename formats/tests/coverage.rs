//! Version-2 overlays (FORMAT.md sections 10.5 and 12.5): the coverage map
//! says truthfully where every launch chunk comes from, the working set's
//! chunks come first in first-touch order, the result is the launch VM,
//! and the bytes stay reproducible (the working set enters the salt).

mod common;

use std::io::Cursor;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use common::*;
use kimberley_formats::apply::{Input, Opened};
use kimberley_formats::chunk::{chunk_count, CHUNK};
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::diff::{DiffOptions, Protection};
use kimberley_formats::digest::hex;
use kimberley_formats::overlay::header::{Header, VERSION_1, VERSION_MAP};
use kimberley_formats::overlay::map::Location;
use kimberley_formats::overlay::Pos;
use kimberley_formats::testkit::{make_pair, Pair, PairSpec};
use kimberley_formats::vmdir::VmDir;

fn pair(t: &Path) -> Pair {
    make_pair(
        t,
        &PairSpec {
            change_percent: 30,
            ..Default::default()
        },
    )
    .unwrap()
}

fn opts(ws: Vec<Pos>) -> DiffOptions {
    DiffOptions {
        threads: 2,
        segment_bytes: 16 << 10,
        working_set: ws,
        version: VERSION_MAP,
        ..DiffOptions::new(Protection::Key(KEY))
    }
}

fn open(ovl: &[u8]) -> Opened {
    Opened::open(
        Input {
            name: "ovl".into(),
            reader: Box::new(Cursor::new(ovl.to_vec())),
        },
        Some(&Secret::Key(KEY)),
        &ReadPolicy::default(),
    )
    .unwrap()
}

/// Chunk `k` of component `i` of a VM directory (short last chunk as is).
fn chunk(vm: &VmDir, i: usize, k: u64) -> Vec<u8> {
    let size = vm.manifest.components[i].size;
    let all = std::fs::read(vm.component_path(i)).unwrap();
    all[(k * CHUNK) as usize..((k + 1) * CHUNK).min(size) as usize].to_vec()
}

/// Some changed and some unchanged chunks of every component, in an order
/// that is not position order.
fn working_set(p: &Pair) -> Vec<Pos> {
    let launch = VmDir::open(&p.launch).unwrap();
    let mut ws = Vec::new();
    for (i, c) in launch.manifest.components.iter().enumerate().rev() {
        let n = chunk_count(c.size);
        for k in (0..n).rev().step_by(3).take(40) {
            ws.push((i as u8, k));
        }
    }
    ws
}

#[test]
fn the_map_tells_unchanged_from_not_arrived_and_the_working_set_comes_first() {
    let t = tempfile::tempdir().unwrap();
    let p = pair(t.path());
    let ws = working_set(&p);
    let (ovl, _) = diff_with(&p.base, &p.launch, &opts(ws.clone()));
    assert_eq!(Header::decode(&ovl).unwrap().version, VERSION_MAP);
    let o = open(&ovl);
    let map = o.map.clone().expect("a version-2 overlay has a map");
    assert!(map.ws_segments > 0 && (map.ws_segments as usize) < map.segments.len());
    let base = VmDir::open(&p.base).unwrap();
    let launch = VmDir::open(&p.launch).unwrap();
    // Every chunk: unchanged exactly when the launch chunk equals the
    // reference image's (the paired base component at the same offset).
    let (mut unchanged, mut changed) = (0, 0);
    for (i, c) in launch.manifest.components.iter().enumerate() {
        let pairing =
            kimberley_formats::diff::classify::paired(&base.manifest, &launch.manifest, i);
        for k in 0..chunk_count(c.size) {
            let l = chunk(&launch, i, k);
            let mut r = match pairing {
                Some(b) if k * CHUNK < base.manifest.components[b].size => chunk(&base, b, k),
                _ => Vec::new(),
            };
            r.resize(l.len(), 0);
            match o.locate(i as u8, k).unwrap() {
                Location::Unchanged => {
                    assert_eq!(l, r, "chunk {i}:{k} is listed unchanged");
                    unchanged += 1;
                }
                Location::Zero => assert!(l.iter().all(|&b| b == 0), "{i}:{k}"),
                Location::InSegment(s) => {
                    assert_ne!(l, r, "chunk {i}:{k} is listed changed");
                    let in_ws = ws.contains(&(i as u8, k));
                    assert_eq!(map.is_working_set(s), in_ws, "chunk {i}:{k} in segment {s}");
                    changed += 1;
                }
            }
        }
    }
    assert!(unchanged > 0 && changed > 0);
    // Each segment's span is where the overlay's own index says it is.
    let mut at = o.data_start;
    for s in 0..map.segments.len() as u32 {
        let sp = o.segment_span(s).unwrap();
        assert_eq!((sp.counter, sp.offset), (u64::from(s) + 2, at));
        let fh = kimberley_formats::overlay::frame::FrameHeader::decode(
            ovl[at as usize..at as usize + 8].try_into().unwrap(),
        )
        .unwrap();
        assert_eq!(
            fh.kind,
            kimberley_formats::overlay::frame::SegmentKind::Data
        );
        assert_eq!(u64::from(sp.frame_len), 8 + u64::from(fh.sealed_len));
        at += u64::from(sp.frame_len);
    }
    // And it applies to the launch VM.
    let out = t.path().join("out");
    apply(&p.base, &[&ovl], &out, Some(Secret::Key(KEY))).unwrap();
    assert_eq!(
        hex(&VmDir::open(&out).unwrap().identity()),
        hex(&launch.identity())
    );
}

#[test]
fn working_sets_are_reproducible_and_enter_the_salt() {
    let t = tempfile::tempdir().unwrap();
    let p = pair(t.path());
    let ws = working_set(&p);
    let a = diff_with(&p.base, &p.launch, &opts(ws.clone())).0;
    let b = diff_with(
        &p.base,
        &p.launch,
        &DiffOptions {
            threads: 1,
            ..opts(ws.clone())
        },
    )
    .0;
    assert_eq!(a, b, "same inputs and working set, same bytes");
    let mut other = ws.clone();
    other.swap(0, 1);
    let c = diff_with(&p.base, &p.launch, &opts(other)).0;
    let d = diff_with(&p.base, &p.launch, &opts(Vec::new())).0;
    let salt = |v: &[u8]| Header::decode(v).unwrap().salt;
    assert_ne!(salt(&a), salt(&c), "another order, another salt");
    assert_ne!(salt(&a), salt(&d), "no working set, another salt");
    let v1 = diff_with(
        &p.base,
        &p.launch,
        &DiffOptions {
            version: VERSION_1,
            ..opts(Vec::new())
        },
    )
    .0;
    assert_ne!(salt(&v1), salt(&d), "the version enters the salt");
    assert_eq!(Header::decode(&v1).unwrap().version, VERSION_1);
    assert!(open(&v1).map.is_none());
    for (name, v) in [("other", &c), ("none", &d), ("v1", &v1)] {
        let out = t.path().join(name);
        apply(&p.base, &[v], &out, Some(Secret::Key(KEY))).unwrap();
        assert_eq!(
            VmDir::open(&out).unwrap().identity(),
            VmDir::open(&p.launch).unwrap().identity()
        );
    }
    // The map's overhead on this pair, for the report.
    eprintln!(
        "v1 {} bytes, v2 {} bytes, v2 with a working set {} bytes",
        v1.len(),
        d.len(),
        a.len()
    );
}

#[test]
fn a_working_set_outside_the_launch_vm_or_on_version_1_is_refused() {
    let t = tempfile::tempdir().unwrap();
    let p = pair(t.path());
    let base = VmDir::open(&p.base).unwrap();
    let launch = VmDir::open(&p.launch).unwrap();
    let run = |o: &DiffOptions| {
        kimberley_formats::diff::diff(
            &base,
            &launch,
            o,
            Vec::new(),
            &kimberley_formats::progress::Progress::default(),
        )
        .err()
        .map(|e| (e.exit_code(), e.to_string()))
    };
    let n = launch.manifest.components.len() as u8;
    let e = run(&opts(vec![(n, 0)])).expect("no such component");
    assert_eq!(e.0, 2, "{}", e.1);
    let size = launch.manifest.components[0].size;
    let e = run(&opts(vec![(0, chunk_count(size))])).expect("no such chunk");
    assert_eq!(e.0, 2, "{}", e.1);
    let e = run(&DiffOptions {
        version: VERSION_1,
        ..opts(vec![(0, 0)])
    })
    .expect("version 1 has no working set");
    assert_eq!(e.0, 2, "{}", e.1);
}

/// A reader that hands out `inner` 4 KiB at a time, `pause` apart (an
/// overlay arriving over a slow link), and holds its last byte back until
/// `release` is set (30 s at most), so that the apply cannot end before.
struct Slow {
    inner: Cursor<Vec<u8>>,
    pause: std::time::Duration,
    release: Arc<AtomicBool>,
}

impl std::io::Read for Slow {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        std::thread::sleep(self.pause);
        let left = self.inner.get_ref().len() as u64 - self.inner.position();
        if left == 1 {
            let t = std::time::Instant::now();
            while !self.release.load(Ordering::SeqCst)
                && t.elapsed() < std::time::Duration::from_secs(30)
            {
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        }
        let n = buf
            .len()
            .min(4096)
            .min(left.saturating_sub(1).max(1) as usize);
        self.inner.read(&mut buf[..n])
    }
}

fn open_slow(ovl: &[u8], release: Arc<AtomicBool>) -> Opened {
    Opened::open(
        Input {
            name: "slow".into(),
            reader: Box::new(Slow {
                inner: Cursor::new(ovl.to_vec()),
                pause: std::time::Duration::from_millis(1),
                release,
            }),
        },
        Some(&Secret::Key(KEY)),
        &ReadPolicy::default(),
    )
    .unwrap()
}

/// Issue 11: while a version-2 overlay is applied, an early reader gets
/// every working-set chunk before the apply ends, and every chunk of every
/// component equal to the launch VM's (waiting for what has not arrived).
/// When the apply fails, a reader waiting for a chunk fails too.
#[test]
fn an_early_reader_sees_the_launch_vm_while_it_arrives() {
    use kimberley_formats::apply::early::Early;
    use kimberley_formats::apply::{apply_early, ApplyOptions};
    use kimberley_formats::progress::Progress;

    let t = tempfile::tempdir().unwrap();
    let p = pair(t.path());
    let ws = working_set(&p);
    let (ovl, _) = diff_with(&p.base, &p.launch, &opts(ws.clone()));
    let base = VmDir::open(&p.base).unwrap();
    let launch = VmDir::open(&p.launch).unwrap();
    let aopts = ApplyOptions {
        secret: Some(Secret::Key(KEY)),
        policy: ReadPolicy::default(),
        threads: 2,
        sync: false,
    };
    let release = Arc::new(AtomicBool::new(false));
    let o = open_slow(&ovl, release.clone());
    let early = Early::new(&base, &o).unwrap().expect("a map");
    let out = t.path().join("out");
    let applied = AtomicBool::new(false);
    let ws_before_end = std::thread::scope(|sc| {
        let reader = sc.spawn(|| {
            early.wait_working_set().unwrap();
            let mut all_before = true;
            for &(i, k) in &ws {
                let mut buf = vec![0u8; CHUNK as usize];
                early.read(usize::from(i), k * CHUNK, &mut buf).unwrap();
                all_before &= !applied.load(Ordering::SeqCst);
                let want = chunk(&launch, usize::from(i), k);
                assert_eq!(&buf[..want.len()], &want[..], "working-set chunk {i}:{k}");
            }
            // Only now may the overlay's last byte arrive.
            release.store(true, Ordering::SeqCst);
            // Everything, in position order (waiting where needed).
            for (i, c) in launch.manifest.components.iter().enumerate() {
                let mut got = vec![0u8; c.size.next_multiple_of(CHUNK) as usize];
                early.read(i, 0, &mut got).unwrap();
                let want = std::fs::read(launch.component_path(i)).unwrap();
                assert!(got[..want.len()] == want[..], "component {i} differs");
            }
            all_before
        });
        apply_early(
            &base,
            o,
            &out,
            &aopts,
            &Progress::default(),
            std::time::Instant::now(),
            &early,
        )
        .unwrap();
        applied.store(true, Ordering::SeqCst);
        reader.join().unwrap()
    });
    assert!(
        ws_before_end,
        "the working set was only served after the apply ended"
    );
    assert_same_vm(&out, &p.launch);
    // The apply left the memory's block hashes for the next restore.
    assert!(VmDir::open(&out).unwrap().read_memory_blocks().is_some());
    let counts = early.counts();
    assert!(
        counts.from_overlay > 0 && counts.from_base > 0,
        "{counts:?}"
    );

    // Cut after the working set: a reader waiting for a late chunk fails.
    let cut = &ovl[..ovl.len() * 3 / 4];
    let o = open_slow(cut, Arc::new(AtomicBool::new(true)));
    let early = Early::new(&base, &o).unwrap().unwrap();
    let out2 = t.path().join("out2");
    std::thread::scope(|sc| {
        let reader = sc.spawn(|| {
            let last = launch.manifest.components.len() - 2;
            let size = launch.manifest.components[last].size;
            let mut buf = vec![0u8; size.next_multiple_of(CHUNK) as usize];
            early.read(last, 0, &mut buf)
        });
        let r = apply_early(
            &base,
            o,
            &out2,
            &aopts,
            &Progress::default(),
            std::time::Instant::now(),
            &early,
        );
        assert!(r.is_err());
        assert!(
            reader.join().unwrap().is_err(),
            "a read of what never arrived succeeded"
        );
    });
    assert!(!out2.exists());
}
