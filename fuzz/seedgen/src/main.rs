//! Writes seed corpora for the fuzz targets.
//!
//! `seedgen CORPUS_DIR [--tiny SEEDS_DIR]` makes a few small VMs with
//! `vmdir::import`, diffs them with `diff::diff` (unencrypted and with the
//! fuzz key `[7; 32]`, single layer and layered, one and several data
//! segments), and writes:
//! - `CORPUS_DIR/overlay_stream/`: each overlay in the modes of that target;
//! - `CORPUS_DIR/overlay_parts/`: headers, frame headers, footers, segment
//!   bodies, record bodies with their geometry, deltas, compressed bodies;
//! - `CORPUS_DIR/vmdir_manifest/`: the VMs' `manifest.json` files;
//! - `CORPUS_DIR/state_blob/`: VM state blobs written by `Vm::save_state`
//!   of a few small real VMs (skipped, with a note, without `/dev/kvm`)
//!   and the golden blobs of `testdata/vectors/state/`, whole (mode 0) and
//!   as bodies for the harness to seal (mode 1).
//!
//! With `--tiny`, the smallest few seeds of each target (a few KiB in all)
//! are also copied to `SEEDS_DIR/<target>/`, the set kept in git.

use std::fs;
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kimberley_formats::apply::{self, Input, Opened};
use kimberley_formats::chunk::chunk_count;
use kimberley_formats::crypto::keys::{KdfLimits, Secret};
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::diff::{self, DiffOptions, Parent, Protection};
use kimberley_formats::overlay::frame::{SegmentKind, FOOTER_LEN, FRAME_HEADER_LEN};
use kimberley_formats::overlay::header::{HEADER_LEN, VERSION_MAP};
use kimberley_formats::overlay::io::FrameReader;
use kimberley_formats::overlay::record::{self, Op};
use kimberley_formats::progress::Progress;
use kimberley_formats::vmdir::import::{import, ImportSpec};
use kimberley_formats::vmdir::VmDir;
use kimberley_vmm::{Vm, VmConfig};

#[path = "../../fuzz_targets/common.rs"]
mod common;

const CHUNK: usize = 4096;

/// Seeds are unencrypted and keyed overlays, all read with the fuzz key.
const ALLOW_UNENCRYPTED: ReadPolicy = ReadPolicy {
    allow_unencrypted: true,
    kdf: KdfLimits::DEFAULT,
};

/// Deterministic bytes.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn byte(&mut self) -> u8 {
        self.next() as u8
    }
}

/// A compressible but distinct chunk: a short random pattern repeated.
fn pattern_chunk(rng: &mut Rng, len: usize) -> Vec<u8> {
    let pat: Vec<u8> = (0..16).map(|_| rng.byte()).collect();
    (0..len).map(|i| pat[i % 16]).collect()
}

/// An image of `len` bytes: patterned chunks, every fourth chunk zero.
fn image(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    let mut k = 0;
    while v.len() < len {
        let n = CHUNK.min(len - v.len());
        if k % 4 == 3 {
            v.extend(std::iter::repeat_n(0, n));
        } else {
            v.extend(pattern_chunk(rng, n));
        }
        k += 1;
    }
    v
}

/// Changes that give every record kind: zero, delta, ref_base, ref_self,
/// literal (`base` must have at least 7 full chunks).
fn mutate(rng: &mut Rng, base: &[u8]) -> Vec<u8> {
    let mut v = base.to_vec();
    let c = |i: usize| i * CHUNK..(i + 1) * CHUNK;
    v[c(0)].fill(0); // zero
    v[CHUNK + 5] ^= 0xff; // delta
    v[CHUNK + 700] ^= 0x11;
    v.copy_within(c(4), 2 * CHUNK); // ref_base (base chunk 4 at 2)
    let lit = pattern_chunk(rng, CHUNK);
    v[c(5)].copy_from_slice(&lit); // literal
    v[c(6)].copy_from_slice(&lit); // ref_self (launch chunk 5)
    v
}

fn write_vm(dir: &Path, name: &str, images: &[(&str, Vec<u8>)]) -> VmDir {
    let src = dir.join(format!("{name}.src"));
    fs::create_dir_all(&src).unwrap();
    let mut spec = ImportSpec {
        name: name.into(),
        vcpus: 2,
        memory: PathBuf::new(),
        disks: Vec::new(),
        state: None,
    };
    for (kind, bytes) in images {
        let p = src.join(format!("{kind}{}", spec.disks.len()));
        fs::write(&p, bytes).unwrap();
        match *kind {
            "memory" => spec.memory = p,
            "disk" => spec.disks.push(p),
            _ => spec.state = Some(p),
        }
    }
    let out = dir.join(name);
    import(&out, &spec).unwrap();
    VmDir::open(&out).unwrap()
}

fn make_overlay(
    base: &VmDir,
    launch: &VmDir,
    key: bool,
    parent: Option<Parent>,
    segment_bytes: Option<usize>,
) -> Vec<u8> {
    make_overlay_with(base, launch, key, parent, segment_bytes, |_| {})
}

/// [`make_overlay`] with more options set by `tweak` (the version, a
/// working set).
fn make_overlay_with(
    base: &VmDir,
    launch: &VmDir,
    key: bool,
    parent: Option<Parent>,
    segment_bytes: Option<usize>,
    tweak: impl FnOnce(&mut DiffOptions),
) -> Vec<u8> {
    let mut opts = DiffOptions::new(if key {
        Protection::Key(common::KEY)
    } else {
        Protection::None
    });
    opts.threads = 1;
    opts.parent = parent;
    if let Some(n) = segment_bytes {
        opts.segment_bytes = n;
    }
    tweak(&mut opts);
    let (out, _) = diff::diff(base, launch, &opts, Vec::new(), &Progress::default()).unwrap();
    // Check it is what the stream target accepts.
    let secret = Secret::Key(common::KEY);
    let o = Opened::open(
        Input {
            name: "seed".into(),
            reader: Box::new(Cursor::new(out.clone())),
        },
        Some(&secret),
        &ALLOW_UNENCRYPTED,
    )
    .unwrap();
    apply::verify(o, 1, &Progress::default()).unwrap();
    out
}

struct Seeds {
    root: PathBuf,
    all: Vec<(String, PathBuf, usize)>,
}

impl Seeds {
    fn put(&mut self, target: &str, name: &str, bytes: &[u8]) {
        let d = self.root.join(target);
        fs::create_dir_all(&d).unwrap();
        let p = d.join(name);
        fs::write(&p, bytes).unwrap();
        self.all.push((target.into(), p, bytes.len()));
    }
}

fn u24(v: u64) -> [u8; 3] {
    assert!(v < 1 << 24);
    let b = v.to_le_bytes();
    [b[0], b[1], b[2]]
}

/// Seeds for overlay_stream and overlay_parts from one overlay.
fn overlay_seeds(s: &mut Seeds, name: &str, ovl: &[u8], key: bool) {
    let raw_mode = if key { 1u8 } else { 0 };
    let with = |m: u8, b: &[u8]| [&[m][..], b].concat();
    s.put(
        "overlay_stream",
        &format!("{name}.m{raw_mode}"),
        &with(raw_mode, ovl),
    );
    s.put("overlay_stream", &format!("{name}.m2"), &with(2, ovl));
    if let Some(st) = common::to_structured(ovl) {
        // The harness's rebuild of it must verify too (re-compressed
        // bodies, index entries rewritten, identity and MAC recomputed).
        let rebuilt = common::build_structured(&st);
        let o = Opened::open(
            Input {
                name: "rebuilt".into(),
                reader: Box::new(Cursor::new(rebuilt)),
            },
            Some(&Secret::Key(common::KEY)),
            &ALLOW_UNENCRYPTED,
        )
        .expect("rebuilt structured seed opens");
        apply::verify(o, 1, &Progress::default()).expect("rebuilt structured seed verifies");
        if st.len() <= 128 << 10 {
            s.put("overlay_stream", &format!("{name}.m3"), &with(3, &st));
        }
    }

    // Parts: header, frame headers, footer, bodies.
    let part = |sel: u8, b: &[u8]| with(sel, b);
    s.put(
        "overlay_parts",
        &format!("{name}.header"),
        &part(0, &ovl[..HEADER_LEN]),
    );
    s.put(
        "overlay_parts",
        &format!("{name}.footer"),
        &part(2, &ovl[ovl.len() - FOOTER_LEN..]),
    );
    let secret = Secret::Key(common::KEY);
    let o = Opened::open(
        Input {
            name: "seed".into(),
            reader: Box::new(Cursor::new(ovl.to_vec())),
        },
        Some(&secret),
        &ALLOW_UNENCRYPTED,
    )
    .unwrap();
    let geo = o.geometry();
    let sealer = o.sealer.clone();
    let mut r = FrameReader::new(Cursor::new(ovl));
    r.header().unwrap();
    let mut k = 0;
    while let Some(f) = r.next_frame().unwrap() {
        s.put(
            "overlay_parts",
            &format!("{name}.fh{k}"),
            &part(1, &f.header.encode()),
        );
        if !key && k < 3 {
            let sealed = &f.sealed[..f.sealed.len() - sealer.overhead()];
            s.put("overlay_parts", &format!("{name}.zst{k}"), &part(9, sealed));
        }
        let kind = f.header.kind;
        let body = f.open(&sealer).unwrap();
        match kind {
            SegmentKind::Manifest => s.put(
                "overlay_parts",
                &format!("{name}.manifest"),
                &part(3, &body),
            ),
            SegmentKind::Index => s.put("overlay_parts", &format!("{name}.index"), &part(4, &body)),
            SegmentKind::Map => {
                // coverage_map mode 0: launch sizes (count, 3 bytes each), then the body.
                let mut g = vec![(geo.launch.len() - 1) as u8];
                for &sz in &geo.launch {
                    g.extend_from_slice(&u24(sz));
                }
                g.extend_from_slice(&body);
                s.put("coverage_map", &format!("{name}.map"), &with(0, &g));
            }
            SegmentKind::Data if body.len() <= 64 << 10 => {
                for large in [false, true] {
                    let mut g = vec![(geo.launch.len() - 1) as u8];
                    for &sz in &geo.launch {
                        if large {
                            g.extend_from_slice(&sz.to_le_bytes()[..6]);
                        } else {
                            g.extend_from_slice(&u24(sz));
                        }
                    }
                    g.push(geo.base.len() as u8);
                    for &sz in &geo.base {
                        if large {
                            g.extend_from_slice(&sz.to_le_bytes()[..6]);
                        } else {
                            g.extend_from_slice(&u24(sz));
                        }
                    }
                    g.extend_from_slice(&[0, 0, 0]); // after = (0, 0)
                    g.extend_from_slice(&body);
                    let sel = if large { 6 } else { 5 };
                    s.put(
                        "overlay_parts",
                        &format!("{name}.rec{k}.{sel}"),
                        &part(sel, &g),
                    );
                }
                // A working-set segment's records may be out of order.
                for (i, rec) in record::parse(&body, &geo, Some((0, 0)))
                    .or_else(|_| record::parse(&body, &geo, None))
                    .unwrap()
                    .iter()
                    .enumerate()
                {
                    if let Op::Delta(range) = &rec.op {
                        let mut d = 4096u16.to_le_bytes().to_vec();
                        d.extend_from_slice(&body[range.clone()]);
                        s.put(
                            "overlay_parts",
                            &format!("{name}.delta{k}.{i}"),
                            &part(7, &d),
                        );
                    }
                }
            }
            SegmentKind::Data => {}
        }
        k += 1;
    }
    let _ = FRAME_HEADER_LEN;
}

/// Seeds for state_blob: each blob whole (mode 0) and its body (mode 1).
fn state_seeds(s: &mut Seeds, tmp: &Path) {
    let mut put = |name: &str, blob: &[u8]| {
        kimberley_vmm::validate_state(blob).expect("a state seed validates");
        let body = &blob[kimberley_vmm::persist::HEADER_LEN..];
        s.put(
            "state_blob",
            &format!("{name}.m0"),
            &[&[0u8][..], blob].concat(),
        );
        s.put(
            "state_blob",
            &format!("{name}.m1"),
            &[&[1u8][..], body].concat(),
        );
    };
    let vectors = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/vectors/state");
    for name in ["vm-v1", "pattern-v1"] {
        let p = vectors.join(format!("{name}.bin"));
        put(
            name,
            &fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display())),
        );
    }
    // Real VMs: (name, MiB, vCPUs, disk sizes, script run before saving).
    let vms: &[(&str, u64, u8, &[u64], &str)] = &[
        ("vm-fresh", 16, 1, &[], ""),
        (
            "vm-disks",
            32,
            2,
            &[1 << 20, 64 << 10],
            "disk-write 0 64K 3\ndisk-write 64K 4K 5\nprint ok",
        ),
        (
            "vm-counter",
            16,
            1,
            &[64 << 10],
            "counter start\nsleep 5\ncounter",
        ),
    ];
    let t = Duration::from_secs(30);
    for &(name, mib, vcpus, disk_sizes, script) in vms {
        let mut disks = Vec::new();
        for (i, &size) in disk_sizes.iter().enumerate() {
            let p = tmp.join(format!("{name}-disk{i}.raw"));
            fs::File::create(&p).unwrap().set_len(size).unwrap();
            disks.push(p);
        }
        let cfg = VmConfig {
            memory_size: mib << 20,
            vcpus,
            disks,
        };
        let mut vm = match Vm::boot(&cfg) {
            Ok(vm) => vm,
            Err(e) => {
                eprintln!("seedgen: no state blobs from real VMs: {e}");
                return;
            }
        };
        vm.wait_ready(t).unwrap();
        if !script.is_empty() {
            let o = vm.run_script(script, &mut |_| {}, t).unwrap();
            assert_eq!(o.status, 0, "{name}: {:?}", o.lines);
        }
        put(name, &vm.save_state().unwrap());
    }
}

/// Seeds for migration_wire: one of each message, a hello, frame headers
/// and CHUNKS bodies, as the harness frames them (mode byte first).
fn migration_seeds(s: &mut Seeds) {
    use vmigrate::protocol::*;
    let t = "migration_wire";
    let hello = Hello {
        role: Role::Sender,
        nonce: [3; 32],
    };
    s.put(t, "hello", &[&[0u8][..], &hello.encode()].concat());
    let msgs = vec![
        Message::Start(Start {
            memory_size: 64 << 20,
            vcpus: 1,
            shared_disk: false,
            stream: false,
            disks: vec![DiskInfo {
                size: 1 << 20,
                path: String::new(),
            }],
        }),
        Message::Start(Start {
            memory_size: 64 << 20,
            vcpus: 2,
            shared_disk: true,
            stream: true,
            disks: vec![DiskInfo {
                size: 1 << 20,
                path: "/srv/vm/disk0.raw".into(),
            }],
        }),
        Message::RoundEnd(3),
        Message::RoundAck(RoundAck {
            round: 3,
            apply_us: 100,
            blocks_hashed: 2,
            hash_us: 900,
            fixed_us: 5000,
        }),
        Message::Running(Running {
            apply_us: 1,
            blocks_hashed: 2,
            hash_us: 3,
            commit_us: 4,
            restore_us: 5,
            delay_us: 6,
        }),
        Message::Error("no space left on device".into()),
        Message::Commit,
        Message::Done,
        Message::BootFiles {
            kernel: "/srv/vm/kernel".into(),
            initrd: "/srv/vm/initrd".into(),
        },
    ];
    for (i, m) in msgs.into_iter().enumerate() {
        let ty = m.ty();
        let body = m.encode();
        let fh = FrameHeader::for_body(ty, body.len()).encode();
        s.put(t, &format!("fh{i}"), &[&[1u8][..], &fh].concat());
        s.put(
            t,
            &format!("msg{i}"),
            &[&[2u8, ty as u8][..], &body].concat(),
        );
    }
    let page: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
    let body = vmigrate::chunks::encode(0, &[(1, Some(&page[..])), (2, None)]);
    s.put(t, "chunks", &[&[3u8][..], &body].concat());
    let body = vmigrate::chunks::encode_shared(1, &[5, 6, 7]);
    s.put(t, "chunks-shared", &[&[3u8][..], &body].concat());
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let root = PathBuf::from(
        args.get(1)
            .expect("usage: seedgen CORPUS_DIR [--tiny SEEDS_DIR]"),
    );
    let tiny = match args.get(2).map(String::as_str) {
        Some("--tiny") => Some(PathBuf::from(
            args.get(3).expect("--tiny needs a directory"),
        )),
        _ => None,
    };
    let tmp = std::env::temp_dir().join(format!("kimberley-seedgen-{}", std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).unwrap();
    let mut s = Seeds {
        root: root.clone(),
        all: Vec::new(),
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    migration_seeds(&mut s);

    // A: memory only, 64 KiB.
    let a_mem = image(&mut rng, 64 << 10);
    let a_base = write_vm(&tmp, "a-base", &[("memory", a_mem.clone())]);
    let a_mem2 = mutate(&mut rng, &a_mem);
    let a_launch = write_vm(&tmp, "a-launch", &[("memory", a_mem2.clone())]);
    // B: memory 32 KiB, a 32 KiB + 100 byte disk, a 100-byte state blob;
    // the launch grows the disk and adds one.
    let b_mem = image(&mut rng, 32 << 10);
    let b_disk = image(&mut rng, (32 << 10) + 100);
    let b_state: Vec<u8> = (0..100).map(|_| rng.byte()).collect();
    let b_base = write_vm(
        &tmp,
        "b-base",
        &[
            ("memory", b_mem.clone()),
            ("disk", b_disk.clone()),
            ("state", b_state.clone()),
        ],
    );
    let mut b_disk2 = mutate(&mut rng, &b_disk);
    b_disk2.extend(pattern_chunk(&mut rng, 5000));
    let mut b_state2 = b_state.clone();
    b_state2[3] ^= 1;
    let b_launch = write_vm(
        &tmp,
        "b-launch",
        &[
            ("memory", mutate(&mut rng, &b_mem)),
            ("disk", b_disk2),
            ("disk", image(&mut rng, 8192)),
            ("state", b_state2),
        ],
    );
    // C: on top of A's launch (a layered overlay).
    let mut c_mem = a_mem2.clone();
    c_mem[10 * CHUNK..11 * CHUNK].fill(0x42);
    c_mem[12 * CHUNK + 9] ^= 0x80;
    let c_launch = write_vm(&tmp, "c-launch", &[("memory", c_mem)]);
    // D: 3 MiB of distinct literal chunks: several data segments.
    let d_mem = image(&mut rng, 3 << 20);
    let d_base = write_vm(&tmp, "d-base", &[("memory", vec![0u8; 3 << 20])]);
    let d_launch = write_vm(&tmp, "d-launch", &[("memory", d_mem)]);

    for key in [false, true] {
        let tag = if key { "key" } else { "plain" };
        let a = make_overlay(&a_base, &a_launch, key, None, None);
        overlay_seeds(&mut s, &format!("a-{tag}"), &a, key);
        let b = make_overlay(&b_base, &b_launch, key, None, None);
        overlay_seeds(&mut s, &format!("b-{tag}"), &b, key);
        let bseg = make_overlay(&b_base, &b_launch, key, None, Some(4096));
        overlay_seeds(&mut s, &format!("bseg-{tag}"), &bseg, key);
        // Version 2 (a coverage map), without and with a working set
        // (chunks last first: its segments out of position order).
        let b2 = make_overlay_with(&b_base, &b_launch, key, None, None, |o| {
            o.version = VERSION_MAP;
        });
        overlay_seeds(&mut s, &format!("b2-{tag}"), &b2, key);
        let ws: Vec<(u8, u64)> = (0..b_launch.manifest.components.len() as u8)
            .rev()
            .flat_map(|c| (0..8u64).rev().map(move |k| (c, k)))
            .filter(|&(c, k)| k < chunk_count(b_launch.manifest.components[usize::from(c)].size))
            .collect();
        let b2ws = make_overlay_with(&b_base, &b_launch, key, None, Some(4096), |o| {
            o.version = VERSION_MAP;
            o.working_set = ws;
        });
        overlay_seeds(&mut s, &format!("b2ws-{tag}"), &b2ws, key);
        let rev = make_overlay(&b_launch, &b_base, key, None, None);
        overlay_seeds(&mut s, &format!("brev-{tag}"), &rev, key);
        let same = make_overlay(&a_base, &a_base, key, None, None);
        overlay_seeds(&mut s, &format!("same-{tag}"), &same, key);
        // The parent's identity, as kimberlize reads it from the parent.
        let po = Opened::open(
            Input {
                name: "a".into(),
                reader: Box::new(Cursor::new(a.clone())),
            },
            Some(&Secret::Key(common::KEY)),
            &ALLOW_UNENCRYPTED,
        )
        .unwrap();
        let parent = Parent {
            overlay_id: po.header.overlay_id,
            depth: po.header.depth,
            result_id: po.result_identity(),
        };
        let c = make_overlay(&a_launch, &c_launch, key, Some(parent), None);
        overlay_seeds(&mut s, &format!("c-{tag}"), &c, key);
        let d = make_overlay(&d_base, &d_launch, key, None, None);
        if d.len() <= 128 << 10 {
            overlay_seeds(&mut s, &format!("d-{tag}"), &d, key);
        } else {
            eprintln!("seedgen: D overlay is {} bytes, skipped", d.len());
        }
    }

    // Deltas to round-trip and sealed blobs.
    let mut dr = vec![0u8, 0x10, 0, 0x10]; // len 4096, limit 4096
    dr.extend(image(&mut rng, 4096));
    dr.extend_from_slice(&[5, 0, 0xff, 0xbc, 2, 0x11, 0xff, 0x0f, 0]);
    s.put("overlay_parts", "delta-rt", &[&[8u8][..], &dr].concat());
    s.put(
        "overlay_parts",
        "sealer",
        &[10u8, 1, 3, 0, 0, 0, 0, 0, 0, 0, 4, 1, 2, 3, 4, 9, 9],
    );

    // Manifests.
    for vm in ["a-base", "a-launch", "b-base", "b-launch", "c-launch"] {
        let m = fs::read(tmp.join(vm).join("manifest.json")).unwrap();
        s.put("vmdir_manifest", &format!("{vm}.json"), &m);
    }

    state_seeds(&mut s, &tmp);

    if let Some(tiny) = tiny {
        // A handful of small seeds covering each mode, kept in git.
        const KEEP: &[(&str, &str)] = &[
            ("overlay_stream", "a-plain.m0"),
            ("overlay_stream", "c-key.m1"),
            ("overlay_stream", "bseg-key.m2"),
            ("overlay_stream", "a-plain.m3"),
            ("overlay_parts", "a-plain.header"),
            ("overlay_parts", "a-plain.fh1"),
            ("overlay_parts", "a-plain.footer"),
            ("overlay_parts", "b-plain.manifest"),
            ("overlay_parts", "bseg-plain.index"),
            ("overlay_parts", "c-plain.rec1.5"),
            ("overlay_parts", "bseg-key.rec5.6"),
            ("overlay_parts", "b-key.delta1.6"),
            ("overlay_parts", "a-plain.zst2"),
            ("overlay_parts", "sealer"),
            ("vmdir_manifest", "a-base.json"),
            ("vmdir_manifest", "b-launch.json"),
            ("state_blob", "vm-v1.m0"),
            ("state_blob", "vm-v1.m1"),
            ("state_blob", "pattern-v1.m1"),
            ("migration_wire", "hello"),
            ("migration_wire", "fh0"),
            ("migration_wire", "msg0"),
            ("migration_wire", "msg1"),
            ("migration_wire", "msg3"),
            ("migration_wire", "msg4"),
            ("migration_wire", "chunks"),
            ("migration_wire", "chunks-shared"),
        ];
        for (t, name) in KEEP {
            let d = tiny.join(t);
            fs::create_dir_all(&d).unwrap();
            let src = root.join(t).join(name);
            if src.exists() {
                fs::copy(&src, d.join(name)).unwrap();
            } else {
                eprintln!("seedgen: no seed {t}/{name}");
            }
        }
    }
    let _ = fs::remove_dir_all(&tmp);
    println!(
        "seedgen: wrote {} seeds under {}",
        s.all.len(),
        root.display()
    );
}
