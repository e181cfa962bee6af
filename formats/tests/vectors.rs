//! Golden vectors (testdata/vectors, FORMAT.md section 15): every valid
//! vector applies to the stored base and gives the listed result; every
//! invalid vector is refused with its listed exit code and message.
//!
//! `UPDATE_VECTORS=1 cargo test -p kimberley-formats --test vectors`
//! regenerates them (only when the format changes on purpose: the new files
//! must then be read by the old code too, or the version bumped).

mod common;

use std::path::{Path, PathBuf};

use common::*;
use kimberley_formats::crypto::keys::{Argon2Params, Secret};
use kimberley_formats::crypto::{reader_keys, sealer_for, ReadPolicy, Sealer};
use kimberley_formats::diff::{diff, DiffOptions, Parent, Protection};
use kimberley_formats::digest::hex;
use kimberley_formats::overlay::frame::SegmentKind;
use kimberley_formats::overlay::frame::{FrameHeader, FRAME_HEADER_LEN};
use kimberley_formats::overlay::header::{Header, HEADER_LEN, VERSION_1, VERSION_MAP};
use kimberley_formats::overlay::io::{compress, seal_frame, FrameReader, FrameWriter};
use kimberley_formats::overlay::map::{CoverageMap, Location, MapRange, SegmentInfo};
use kimberley_formats::overlay::record::{self, Geometry, Op, Record};
use kimberley_formats::overlay::segment::{ChunkStats, Index, IndexEntry, ManifestSegment};
use kimberley_formats::overlay::Pos;
use kimberley_formats::progress::Progress;
use kimberley_formats::testkit::{copy_vmdir, make_pair, PairSpec};
use kimberley_formats::vmdir::VmDir;
use kimberley_formats::working_set;
use std::io::Cursor;

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../testdata/vectors")
}

const PASSPHRASE: &[u8] = b"kimberley test vector passphrase";
const WRONG_KEY: [u8; 32] = [0x11; 32];

fn secret(name: &str) -> Option<Secret> {
    match name {
        "-" => None,
        "key.bin" => Some(Secret::Key(KEY)),
        "wrong-key.bin" => Some(Secret::Key(WRONG_KEY)),
        "passphrase.txt" => Some(Secret::Passphrase(PASSPHRASE.to_vec())),
        other => panic!("unknown secret {other}"),
    }
}

#[test]
fn golden_vectors() {
    if std::env::var("UPDATE_VECTORS").is_ok_and(|v| v == "1") {
        generate();
    }
    check_dir(&dir());
}

/// Version-2 vectors (testdata/vectors/v2: the coverage map, FORMAT.md
/// section 10.5), next to the version-1 ones above, which stay as they
/// were made: old overlays are still read.
#[test]
fn golden_vectors_v2() {
    if std::env::var("UPDATE_VECTORS").is_ok_and(|v| v == "1") {
        generate_v2();
    }
    check_dir(&dir().join("v2"));
}

/// The coverage map is sealed like every segment: one flipped bit in its
/// frame's sealed bytes fails authentication under a key (exit 4) and the
/// BLAKE3 check without one (corrupt, exit 3, as for any segment), and a
/// flipped *last* flag puts the frame out of place; nothing is written.
#[test]
fn a_flipped_bit_in_the_coverage_map_fails_authentication() {
    let d = dir().join("v2");
    for (name, sec, sealed) in [
        ("ok-key.ovl", "key.bin", (4, "does not authenticate")),
        ("ok-plain.ovl", "-", (3, "BLAKE3")),
    ] {
        let ovl = std::fs::read(d.join(name)).unwrap();
        let (at, len) = frames(&ovl)[1];
        let fh = FrameHeader::decode(ovl[at..at + FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
        assert_eq!(
            fh.kind,
            SegmentKind::Map,
            "{name}: the second frame is the map"
        );
        // A bit of the sealed body near its start, middle and end, and the
        // frame header's last-flag (covered by the nonce).
        for (i, bit) in [
            (at + FRAME_HEADER_LEN, 0x01),
            (at + len / 2, 0x10),
            (at + len - 1, 0x80),
            (at + 1, 0x01),
        ] {
            let mut bad = ovl.clone();
            bad[i] ^= bit;
            let t = tempfile::tempdir().unwrap();
            let out = t.path().join("out");
            let e = apply(&d.join("../base"), &[&bad], &out, secret(sec))
                .err()
                .unwrap_or_else(|| panic!("{name}: byte {i} flipped, accepted"));
            let want = if i == at + 1 {
                (3, "out of place")
            } else {
                sealed
            };
            assert_eq!(e.exit_code(), want.0, "{name}: byte {i}: {e}");
            assert!(e.to_string().contains(want.1), "{name}: byte {i}: {e}");
            assert!(!out.exists());
        }
    }
}

fn check_dir(d: &Path) {
    let expect =
        std::fs::read_to_string(d.join("expect.tsv")).expect("testdata/vectors/expect.tsv");
    let mut rows = 0;
    for line in expect
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let f: Vec<&str> = line.split('\t').collect();
        assert_eq!(f.len(), 5, "bad row {line:?}");
        let (base, files, sec, code, want) = (f[0], f[1], f[2], f[3], f[4]);
        let overlays: Vec<Vec<u8>> = files
            .split(' ')
            .map(|n| std::fs::read(d.join(n)).unwrap())
            .collect();
        let refs: Vec<&[u8]> = overlays.iter().map(|v| &v[..]).collect();
        let t = tempfile::tempdir().unwrap();
        let out = t.path().join("out");
        let r = apply(&d.join(base), &refs, &out, secret(sec));
        match (code, r) {
            ("0", Ok(_)) => {
                let got = VmDir::open(&out).unwrap();
                got.verify().unwrap();
                assert_eq!(hex(&got.identity()), want, "{files}: result identity");
            }
            ("0", Err(e)) => panic!("{files}: valid vector refused: {e}"),
            (c, Ok(_)) => panic!("{files}: invalid vector accepted (expected exit {c})"),
            (c, Err(e)) => {
                assert_eq!(e.exit_code().to_string(), c, "{files}: {e}");
                assert!(
                    e.to_string().contains(want),
                    "{files}: {e:?} does not mention {want:?}"
                );
                assert!(!out.exists());
            }
        }
        rows += 1;
    }
    assert!(rows >= 10, "only {rows} vectors");
}

fn frames(ovl: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut at = HEADER_LEN;
    loop {
        let fh = FrameHeader::decode(ovl[at..at + FRAME_HEADER_LEN].try_into().unwrap()).unwrap();
        out.push((at, FRAME_HEADER_LEN + fh.sealed_len as usize));
        at += FRAME_HEADER_LEN + fh.sealed_len as usize;
        if fh.last {
            return out;
        }
    }
}

fn generate() {
    let d = dir();
    // Replace the overlay vectors only: README and the state/ vectors
    // (written by the VMM's tests) stay.
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(&d).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_file() && name != "README.md" {
            std::fs::remove_file(&p).unwrap();
        }
    }
    let t = tempfile::tempdir().unwrap();
    for s in ["1", "2", "3"] {
        std::fs::create_dir(t.path().join(s)).unwrap();
    }
    let spec = PairSpec {
        seed: 11,
        memory: 64 << 10,
        disks: vec![192 << 10],
        launch_disks: vec![192 << 10],
        change_percent: 25,
        state: Some(200),
    };
    let p1 = make_pair(&t.path().join("1"), &spec).unwrap();
    let p2 = make_pair(
        &t.path().join("2"),
        &PairSpec {
            seed: 12,
            ..spec.clone()
        },
    )
    .unwrap();
    let other = make_pair(
        &t.path().join("3"),
        &PairSpec {
            seed: 13,
            ..spec.clone()
        },
    )
    .unwrap();
    // The stored base, as a VMDIR (made again: the pairs are deterministic).
    for v in ["base", "mid"] {
        if d.join(v).exists() {
            std::fs::remove_dir_all(d.join(v)).unwrap();
        }
    }
    copy_vmdir(&p1.base, &d.join("base")).unwrap();
    copy_vmdir(&p1.launch, &d.join("mid")).unwrap();
    std::fs::write(d.join("key.bin"), KEY).unwrap();
    std::fs::write(d.join("wrong-key.bin"), WRONG_KEY).unwrap();
    std::fs::write(d.join("passphrase.txt"), [PASSPHRASE, b"\n"].concat()).unwrap();
    let mk_at = |base: &Path,
                 launch: &Path,
                 prot: Protection,
                 parent: Option<Parent>,
                 level: i32|
     -> Vec<u8> {
        let opts = DiffOptions {
            parent,
            threads: 1,
            segment_bytes: 8 << 10,
            level,
            version: VERSION_1,
            ..DiffOptions::new(prot)
        };
        diff(
            &VmDir::open(base).unwrap(),
            &VmDir::open(launch).unwrap(),
            &opts,
            Vec::new(),
            &Progress::default(),
        )
        .unwrap()
        .0
    };
    let mk = |base: &Path, launch: &Path, prot: Protection, parent: Option<Parent>| {
        mk_at(base, launch, prot, parent, 3)
    };
    let small = Argon2Params {
        m_cost: 64,
        t_cost: 1,
        p_cost: 1,
    };
    let plain = mk(&p1.base, &p1.launch, Protection::None, None);
    let key = mk(&p1.base, &p1.launch, Protection::Key(KEY), None);
    // Another overlay under the same key: the same VMs at another zstd
    // level (the same inputs and options would give `key` again, byte for
    // byte: FORMAT.md section 7.7).
    let key2 = mk_at(&p1.base, &p1.launch, Protection::Key(KEY), None, 1);
    assert_ne!(key, key2);
    let pass = mk(
        &p1.base,
        &p1.launch,
        Protection::Passphrase(PASSPHRASE.to_vec(), small),
        None,
    );
    let h1 = kimberley_formats::overlay::header::Header::decode(&key).unwrap();
    let mid_id = VmDir::open(&p1.launch).unwrap().identity();
    let l2 = mk(
        &p1.launch,
        &p2.launch,
        Protection::Key(KEY),
        Some(Parent {
            overlay_id: h1.overlay_id,
            depth: 0,
            result_id: mid_id,
        }),
    );
    let wrong_base = mk(&other.base, &other.launch, Protection::Key(KEY), None);
    let fk = frames(&key);
    assert!(fk.len() >= 5, "vectors need several data segments");
    let cut = |v: &[u8], n: usize| v[..n].to_vec();
    let flip = |v: &[u8], at: usize| {
        let mut v = v.to_vec();
        v[at] ^= 0x04;
        v
    };
    let seg = |v: &[u8], (a, l): (usize, usize)| v[a..a + l].to_vec();
    let with_frames = |order: &[usize]| {
        let mut v = key[..HEADER_LEN].to_vec();
        for &i in order {
            v.extend(seg(&key, fk[i]));
        }
        v.extend_from_slice(&key[key.len() - 24..]);
        v
    };
    let n = fk.len();
    let mut reorder: Vec<usize> = (0..n).collect();
    reorder.swap(1, 2);
    // Frame 2 replaced by frame 2 of `key2` (its length may differ).
    let fk2 = frames(&key2);
    let spliced = [
        &key[..fk[2].0],
        &seg(&key2, fk2[2])[..],
        &key[fk[2].0 + fk[2].1..],
    ]
    .concat();
    let mut version = key.clone();
    version[8] = 3;
    let mut argon = pass.clone();
    argon[144..148].copy_from_slice(&u32::MAX.to_le_bytes());
    // The key-file overlay with its protection byte set to 0 (none).
    let mut downgrade = key.clone();
    downgrade[12] = 0;
    let mut trailing = key.clone();
    trailing.extend_from_slice(b"\n");
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("ok-plain.ovl", plain.clone()),
        ("ok-key.ovl", key.clone()),
        ("ok-passphrase.ovl", pass.clone()),
        ("ok-chain-2.ovl", l2.clone()),
        ("bad-empty.ovl", vec![]),
        (
            "bad-garbage.ovl",
            b"this is not an overlay at all\n".to_vec(),
        ),
        ("bad-version.ovl", version),
        ("bad-argon-limits.ovl", argon),
        ("bad-truncated-header.ovl", cut(&key, 100)),
        ("bad-truncated-frame.ovl", cut(&key, fk[2].0 + 50)),
        ("bad-truncated-boundary.ovl", cut(&key, fk[3].0)),
        ("bad-no-footer.ovl", cut(&key, key.len() - 24)),
        ("bad-trailing-data.ovl", trailing),
        ("bad-flip-header.ovl", flip(&key, 70)),
        ("bad-flip-frame-header.ovl", flip(&key, fk[2].0 + 5)),
        ("bad-flip-segment.ovl", flip(&key, fk[2].0 + 40)),
        ("bad-flip-plain.ovl", flip(&plain, frames(&plain)[1].0 + 40)),
        ("bad-flip-footer.ovl", flip(&key, key.len() - 20)),
        ("bad-reordered.ovl", with_frames(&reorder)),
        (
            "bad-dropped.ovl",
            with_frames(&(0..n).filter(|&i| i != 2).collect::<Vec<_>>()),
        ),
        ("bad-spliced.ovl", spliced),
        ("bad-wrong-base.ovl", wrong_base),
        ("bad-downgrade.ovl", downgrade),
    ];
    for (name, bytes) in &files {
        std::fs::write(d.join(name), bytes).unwrap();
    }
    let mid = hex(&mid_id);
    let top = hex(&VmDir::open(&p2.launch).unwrap().identity());
    let rows = [
        format!("base\tok-plain.ovl\t-\t0\t{mid}"),
        format!("base\tok-key.ovl\tkey.bin\t0\t{mid}"),
        format!("base\tok-passphrase.ovl\tpassphrase.txt\t0\t{mid}"),
        format!("base\tok-key.ovl ok-chain-2.ovl\tkey.bin\t0\t{top}"),
        format!("mid\tok-chain-2.ovl\tkey.bin\t0\t{top}"),
        "base\tok-key.ovl\twrong-key.bin\t4\twrong key".into(),
        "base\tok-key.ovl\t-\t2\tencrypted".into(),
        "base\tok-key.ovl\tpassphrase.txt\t4\tkey file".into(),
        "base\tok-chain-2.ovl\tkey.bin\t5\tparent".into(),
        "base\tok-chain-2.ovl ok-key.ovl\tkey.bin\t5\tparent".into(),
        "base\tok-key.ovl ok-key.ovl\tkey.bin\t5\tnot on top of".into(),
        "mid\tok-key.ovl\tkey.bin\t5\tanother base".into(),
        "base\tbad-wrong-base.ovl\tkey.bin\t5\tanother base".into(),
        "base\tbad-empty.ovl\tkey.bin\t3\tempty".into(),
        "base\tbad-garbage.ovl\tkey.bin\t3\tnot a Kimberley overlay".into(),
        "base\tbad-version.ovl\tkey.bin\t3\tversion 3".into(),
        "base\tbad-argon-limits.ovl\tpassphrase.txt\t3\tArgon2".into(),
        "base\tbad-truncated-header.ovl\tkey.bin\t3\ttruncated".into(),
        "base\tbad-truncated-frame.ovl\tkey.bin\t3\ttruncated".into(),
        "base\tbad-truncated-boundary.ovl\tkey.bin\t3\ttruncated".into(),
        "base\tbad-no-footer.ovl\tkey.bin\t3\ttruncated".into(),
        "base\tbad-trailing-data.ovl\tkey.bin\t3\tafter the end".into(),
        "base\tbad-flip-header.ovl\tkey.bin\t4\twrong key, or the overlay header was modified"
            .into(),
        "base\tbad-flip-frame-header.ovl\tkey.bin\t4\tdoes not authenticate".into(),
        "base\tbad-flip-segment.ovl\tkey.bin\t4\tdoes not authenticate".into(),
        "base\tbad-flip-plain.ovl\t-\t3\tBLAKE3".into(),
        "base\tbad-flip-footer.ovl\tkey.bin\t3\tfooter".into(),
        "base\tbad-reordered.ovl\tkey.bin\t4\tdoes not authenticate".into(),
        "base\tbad-dropped.ovl\tkey.bin\t4\tdoes not authenticate".into(),
        "base\tbad-spliced.ovl\tkey.bin\t4\tdoes not authenticate".into(),
        "base\tok-plain.ovl\tkey.bin\t4\tnot encrypted".into(),
        "base\tok-plain.ovl\tpassphrase.txt\t4\tnot encrypted".into(),
        "base\tbad-downgrade.ovl\tkey.bin\t4\tnot encrypted".into(),
        "base\tbad-downgrade.ovl\t-\t3\theader checksum".into(),
    ];
    let mut tsv = String::from("# base\toverlays (chain order)\tsecret\texpected exit code\tresult identity (exit 0) or text the error contains\n");
    for r in rows {
        tsv.push_str(&r);
        tsv.push('\n');
    }
    std::fs::write(d.join("expect.tsv"), tsv).unwrap();
}

/// A decrypted overlay, to be put together again with one defect.
struct Parts {
    header: [u8; HEADER_LEN],
    sealer: Sealer,
    manifest: Vec<u8>,
    map: Vec<u8>,
    data: Vec<Vec<u8>>,
    stats: ChunkStats,
    geo: Geometry,
}

fn take_apart(ovl: &[u8]) -> Parts {
    let mut r = FrameReader::new(Cursor::new(ovl.to_vec()));
    let (h, header) = r.header().unwrap();
    let keys = reader_keys(&h, Some(&Secret::Key(KEY)), &ReadPolicy::default()).unwrap();
    let sealer = sealer_for(&h, keys.as_ref());
    let mut bodies = Vec::new();
    while let Some(f) = r.next_frame().unwrap() {
        bodies.push(f.open(&sealer).unwrap());
    }
    let index = Index::decode_with(&bodies.pop().unwrap(), usize::MAX).unwrap();
    let manifest = bodies.remove(0);
    let map = bodies.remove(0);
    let m = ManifestSegment::decode(&manifest).unwrap();
    let geo = Geometry {
        launch: m.launch.iter().map(|c| c.size).collect(),
        base: m.base.iter().map(|c| c.size).collect(),
    };
    Parts {
        header,
        sealer,
        manifest,
        map,
        data: bodies,
        stats: index.stats,
        geo,
    }
}

fn records(p: &Parts, body: &[u8]) -> Vec<Record> {
    record::parse(body, &p.geo, None).unwrap()
}

/// Records encoded again (in the given order).
fn body_of(recs: &[Record], body: &[u8]) -> Vec<u8> {
    let mut w = record::Writer::default();
    for r in recs {
        match &r.op {
            Op::Zero => w.zero(r.comp, r.start, r.count),
            Op::Literal(b) => w.literal(r.comp, r.start, r.count, &body[b.clone()]),
            &Op::RefBase { comp, chunk } => {
                w.reference(r.comp, r.start, r.count, false, comp, chunk)
            }
            &Op::RefSelf { comp, chunk } => {
                w.reference(r.comp, r.start, r.count, true, comp, chunk)
            }
            Op::Delta(b) => w.delta(r.comp, r.start, &body[b.clone()]),
        }
    }
    w.buf
}

/// The truthful map of `p.data` with `ws` working-set segments.
fn true_map(p: &Parts, ws: u32) -> CoverageMap {
    let sealed: Vec<Vec<u8>> = p.data.iter().map(|b| compress(b, 3)).collect();
    let infos = p
        .data
        .iter()
        .zip(&sealed)
        .map(|(b, c)| SegmentInfo {
            frame_len: (FRAME_HEADER_LEN + c.len() + p.sealer.overhead()) as u32,
            body_len: b.len() as u32,
            records: records(p, b).len() as u32,
        })
        .collect();
    let runs: Vec<Vec<(Pos, u32, bool)>> = p
        .data
        .iter()
        .map(|b| {
            records(p, b)
                .iter()
                .map(|r| (r.start_pos(), r.count, r.op == Op::Zero))
                .collect()
        })
        .collect();
    CoverageMap::build(ws, infos, &runs)
}

/// Seals everything again: header, manifest, `map` as given, the data
/// segments, an index that matches them, the footer.
fn put_together(p: &Parts, map: &[u8]) -> Vec<u8> {
    let mut fw = FrameWriter::new(Vec::new(), &p.header).unwrap();
    let s = &p.sealer;
    fw.write_frame(&seal_frame(
        s,
        0,
        SegmentKind::Manifest,
        false,
        compress(&p.manifest, 3),
    ))
    .unwrap();
    fw.write_frame(&seal_frame(s, 1, SegmentKind::Map, false, compress(map, 3)))
        .unwrap();
    let mut entries = Vec::new();
    for b in &p.data {
        let recs = records(p, b);
        let counter = fw.next_counter();
        let frame = seal_frame(s, counter, SegmentKind::Data, false, compress(b, 3));
        let offset = fw.write_frame(&frame).unwrap();
        entries.push(IndexEntry {
            counter,
            offset,
            frame_len: frame.len() as u32,
            body_len: b.len() as u32,
            first: recs.iter().map(|r| r.start_pos()).min().unwrap(),
            end: recs.iter().map(|r| r.end_pos()).max().unwrap(),
            records: recs.len() as u32,
        });
    }
    let ix = Index {
        entries,
        stats: p.stats,
    }
    .encode();
    let frame = seal_frame(
        s,
        fw.next_counter(),
        SegmentKind::Index,
        true,
        compress(&ix, 3),
    );
    let at = fw.write_frame(&frame).unwrap();
    fw.finish(at).unwrap().0
}

fn generate_v2() {
    let d = dir().join("v2");
    std::fs::create_dir_all(&d).unwrap();
    for e in std::fs::read_dir(&d).unwrap() {
        let p = e.unwrap().path();
        if p.file_name().unwrap() != "README.md" {
            std::fs::remove_file(&p).unwrap();
        }
    }
    let (base, mid) = (dir().join("base"), dir().join("mid"));
    let launch = VmDir::open(&mid).unwrap();
    let mk = |prot: Protection, ws: Vec<Pos>| {
        let opts = DiffOptions {
            threads: 1,
            segment_bytes: 8 << 10,
            level: 3,
            version: VERSION_MAP,
            working_set: ws,
            ..DiffOptions::new(prot)
        };
        diff(
            &VmDir::open(&base).unwrap(),
            &launch,
            &opts,
            Vec::new(),
            &Progress::default(),
        )
        .unwrap()
        .0
    };
    // The working set: the last memory page, then a disk block, then the
    // first memory page (first-touch order, not position order).
    let ws_text = b"kimberley-working-set 1\n# memory pages and disk blocks, first touch first\n0 15\n1 40\n0 0\n1 3\n".to_vec();
    let ws = working_set::parse(&ws_text).unwrap();
    let plain = mk(Protection::None, Vec::new());
    let key = mk(Protection::Key(KEY), Vec::new());
    let key_ws = mk(Protection::Key(KEY), ws);
    assert_ne!(
        Header::decode(&key_ws).unwrap().salt,
        Header::decode(&key).unwrap().salt
    );
    let p = take_apart(&key);
    let n = p.data.len();
    assert!(n >= 3, "vectors need several data segments");
    let map = CoverageMap::decode(&p.map, &p.geo.launch, p.sealer.overhead()).unwrap();
    assert_eq!(true_map(&p, 0), map, "the writer's map is the truthful one");
    // The map lies: one data range said to be in another segment.
    let mut lie = map.clone();
    let i = (0..lie.ranges.len())
        .find(|&i| {
            let mut m = lie.clone();
            m.ranges[i].segment = (m.ranges[i].segment + 1) % n as u32;
            !m.ranges[i].zero
                && CoverageMap::decode(&m.encode(), &p.geo.launch, p.sealer.overhead()).is_ok()
        })
        .expect("a range that can be moved");
    lie.ranges[i].segment = (lie.ranges[i].segment + 1) % n as u32;
    // The map lists a range nothing delivers: an unchanged chunk.
    let mut extra = map.clone();
    let free = (0..p.geo.launch[0] / 4096)
        .find(|&k| {
            let mut m = extra.clone();
            m.ranges.push(MapRange {
                comp: 0,
                start: k,
                count: 1,
                segment: 0,
                zero: true,
            });
            m.ranges.sort_by_key(|r| (r.comp, r.start));
            extra.locate(0, k) == Location::Unchanged
                && CoverageMap::decode(&m.encode(), &p.geo.launch, p.sealer.overhead()).is_ok()
        })
        .expect("an unchanged memory chunk");
    extra.ranges.push(MapRange {
        comp: 0,
        start: free,
        count: 1,
        segment: 0,
        zero: true,
    });
    extra.ranges.sort_by_key(|r| (r.comp, r.start));
    // A self reference to chunks that arrive later: every segment in the
    // working set, the referring record put before its source.
    let mut fwd = take_apart(&key);
    let (k, r) = fwd
        .data
        .iter()
        .enumerate()
        .find_map(|(k, b)| {
            records(&fwd, b)
                .into_iter()
                .find(|r| matches!(r.op, Op::RefSelf { .. }))
                .map(|r| (k, r))
        })
        .expect("the vectors have a self reference");
    let Op::RefSelf {
        comp: sc,
        chunk: sk,
    } = r.op
    else {
        unreachable!()
    };
    let j = (0..n)
        .find(|&j| {
            records(&fwd, &fwd.data[j])
                .iter()
                .any(|x| x.comp == sc && x.start <= sk && sk < x.start + u64::from(x.count))
        })
        .expect("the source is delivered");
    if j == k {
        let body = fwd.data[k].clone();
        let mut recs = records(&fwd, &body);
        let at = recs.iter().position(|x| *x == r).unwrap();
        let moved = recs.remove(at);
        recs.insert(0, moved);
        fwd.data[k] = body_of(&recs, &body);
    } else {
        let seg = fwd.data.remove(k);
        fwd.data.insert(0, seg);
    }
    let fwd_map = true_map(&fwd, n as u32).encode();
    // The map cut by one byte (sealed as it is: it authenticates).
    let short = p.map[..p.map.len() - 1].to_vec();
    // The map claims more segments than an index can list.
    let mut huge = p.map.clone();
    huge[..4].copy_from_slice(&u32::MAX.to_le_bytes());
    // A version-2 overlay presented as version 1.
    let mut downgrade = key.clone();
    downgrade[8] = 1;
    let files: Vec<(&str, Vec<u8>)> = vec![
        ("ok-plain.ovl", plain),
        ("ok-key.ovl", key.clone()),
        ("ok-ws-key.ovl", key_ws),
        ("working-set.txt", ws_text),
        ("ok-resealed.ovl", put_together(&p, &p.map)),
        ("bad-map-lies.ovl", put_together(&p, &lie.encode())),
        ("bad-map-undelivered.ovl", put_together(&p, &extra.encode())),
        ("bad-self-forward.ovl", put_together(&fwd, &fwd_map)),
        ("bad-map-truncated.ovl", put_together(&p, &short)),
        ("bad-map-cap.ovl", put_together(&p, &huge)),
        ("bad-version-downgrade.ovl", downgrade),
    ];
    for (name, bytes) in &files {
        std::fs::write(d.join(name), bytes).unwrap();
    }
    let mid_id = hex(&launch.identity());
    let rows = [
        format!("../base\tok-plain.ovl\t-\t0\t{mid_id}"),
        format!("../base\tok-key.ovl\tkey.bin\t0\t{mid_id}"),
        format!("../base\tok-ws-key.ovl\tkey.bin\t0\t{mid_id}"),
        format!("../base\tok-resealed.ovl\tkey.bin\t0\t{mid_id}"),
        "../base\tbad-map-lies.ovl\tkey.bin\t3\tthe map does not list there".into(),
        "../base\tbad-map-undelivered.ovl\tkey.bin\t3\tnever delivered".into(),
        "../base\tbad-self-forward.ovl\tkey.bin\t3\tnot delivered earlier".into(),
        "../base\tbad-map-truncated.ovl\tkey.bin\t3\trange table length".into(),
        "../base\tbad-map-cap.ovl\tkey.bin\t3\texceed the cap".into(),
        "../base\tbad-version-downgrade.ovl\tkey.bin\t4\twrong key, or the overlay header was modified".into(),
    ];
    let mut tsv = String::from("# base\toverlays (chain order)\tsecret\texpected exit code\tresult identity (exit 0) or text the error contains\n");
    for r in rows {
        tsv.push_str(&r);
        tsv.push('\n');
    }
    std::fs::write(d.join("expect.tsv"), tsv).unwrap();
}
