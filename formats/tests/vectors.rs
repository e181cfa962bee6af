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
use kimberley_formats::diff::{diff, DiffOptions, Parent, Protection};
use kimberley_formats::digest::hex;
use kimberley_formats::overlay::frame::{FrameHeader, FRAME_HEADER_LEN};
use kimberley_formats::overlay::header::HEADER_LEN;
use kimberley_formats::progress::Progress;
use kimberley_formats::testkit::{copy_vmdir, make_pair, PairSpec};
use kimberley_formats::vmdir::VmDir;

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
    let d = dir();
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
    assert!(rows >= 20, "only {rows} vectors");
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
    version[8] = 2;
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
        "base\tbad-version.ovl\tkey.bin\t3\tversion 2".into(),
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
