//! `kimberley-bench`: deterministic generator of raw VM image pairs for
//! Kimberley's overlay benchmarks (see `scripts/bench-overlay.sh`).
//!
//! Every 4 KiB page (or disk block) of an image is described by a small
//! [`Desc`]: a content kind, a content key and an optional edit. The content
//! of a page is a pure function of its descriptor, so
//! - a "copy" of another page is simply the same descriptor placed elsewhere;
//! - the base and launch images are generated independently and in parallel;
//! - the output only depends on the seed and the size.
//!
//! Images are written sparse: all-zero pages are never written (the file is
//! sized with `set_len` and only non-zero runs are written with `pwrite`).

use anyhow::{bail, ensure, Context, Result};
use clap::{Parser, Subcommand};
use rayon::prelude::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

const PAGE: usize = 4096;
/// Pages generated and written per parallel work item (1 MiB).
const CHUNK_PAGES: usize = 256;

#[derive(Parser, Debug)]
#[command(
    name = "kimberley-bench",
    about = "Generate deterministic raw VM image pairs (base, launch) for overlay benchmarks"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// "M1": a guest memory pair (zero, text and binary pages; 10% of pages changed).
    Memory(PairArgs),
    /// "D1": a sparse disk pair (filesystem-like extents; new files and metadata rewrites).
    Disk(PairArgs),
    /// Write N consecutive pages of one kind (to tune compressibility).
    #[command(hide = true)]
    Sample {
        #[arg(long)]
        kind: String,
        #[arg(long, default_value_t = 4096)]
        pages: usize,
        #[arg(short, long)]
        out: PathBuf,
    },
}

#[derive(clap::Args, Debug)]
struct PairArgs {
    /// Output path of the base image.
    #[arg(long)]
    base: PathBuf,
    /// Output path of the launch image.
    #[arg(long)]
    launch: PathBuf,
    /// Image size (bytes; suffixes K, M, G, T, powers of 1024). Default: 1G (memory), 4G (disk).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Seed of the generator: same seed and size, same bytes.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|e| format!("bad size {s:?}: {e}"))?;
    let v = n
        .checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))?;
    if v == 0 || !v.is_multiple_of(PAGE as u64) {
        return Err(format!("size {s:?} must be a non-zero multiple of 4096"));
    }
    Ok(v)
}

// ---------------------------------------------------------------------------
// PRNG: splitmix64 (fast, good enough, trivially seekable by re-seeding).

#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        fin(self.0)
    }
    /// Uniform in `0..n` (n > 0).
    #[inline]
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
    /// Uniform in `lo..=hi`.
    #[inline]
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    /// Log-uniform in `lo..=hi` (lo >= 1): many small values, a few large ones.
    fn log_range(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), ((hi + 1) as f64).ln());
        let x = (a + self.unit() * (b - a)).exp() as u64;
        x.clamp(lo, hi)
    }
    #[inline]
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    #[inline]
    fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

#[inline]
fn fin(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Derive an independent 64-bit value from two inputs.
#[inline]
fn mix(a: u64, b: u64) -> u64 {
    fin(fin(a ^ 0x6A09_E667_F3BC_C909).wrapping_add(b.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
}

// ---------------------------------------------------------------------------
// Page descriptors and content generators.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Zero,
    /// Word-like ASCII text (logs, sources, documents).
    Text,
    /// Incompressible bytes (compressed media, keys, hashes).
    Random,
    /// Structured binary: small-integer tables, pointer arrays, records.
    Struct,
    /// Filesystem inode table block.
    Inode,
    /// Filesystem allocation bitmap block.
    Bitmap,
    /// Filesystem directory block.
    Dir,
    /// Filesystem superblock / group descriptors.
    Super,
}

#[derive(Clone, Copy, Debug)]
struct Desc {
    kind: Kind,
    /// Maximum length of one edited place (only meaningful when `edit != 0`).
    edit_max: u16,
    /// Content key: pages with equal (kind, key) have equal content.
    key: u64,
    /// Seed of a small in-place modification; 0 = none.
    edit: u64,
}

impl Desc {
    const ZERO: Desc = Desc {
        kind: Kind::Zero,
        edit_max: 0,
        key: 0,
        edit: 0,
    };
    fn new(kind: Kind, key: u64) -> Self {
        Desc {
            kind,
            edit_max: 0,
            key,
            edit: 0,
        }
    }
    fn with_edit(self, edit: u64, edit_max: u16) -> Self {
        Desc {
            edit: edit | 1,
            edit_max,
            ..self
        }
    }
    fn is_zero(&self) -> bool {
        self.kind == Kind::Zero && self.edit == 0
    }
}

/// A fixed, seed-independent vocabulary ("the language of the guest").
struct Vocab {
    bytes: Vec<u8>,
    words: Vec<(u32, u8)>,
}

const VOCAB_BITS: u32 = 13;

impl Vocab {
    fn new() -> Self {
        const ON: &[&str] = &[
            "b", "c", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w", "st",
            "tr", "ch", "sh", "th", "pr", "gr", "",
        ];
        const NU: &[&str] = &[
            "a", "e", "i", "o", "u", "ea", "ou", "io", "ai", "y", "ee", "a", "e", "o",
        ];
        const CO: &[&str] = &[
            "", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "x", "m", "rt",
        ];
        let mut rng = Rng::new(0x4B49_4D42_4552_4C45);
        let mut bytes = Vec::new();
        let mut words = Vec::with_capacity(1 << VOCAB_BITS);
        // A few very common short words first (they get picked most often).
        for w in [
            "the", "of", "and", "to", "in", "is", "for", "on", "that", "with", "as", "at", "by",
            "this", "from", "or", "be", "are", "if", "not", "=", "{", "}", "0", "1", "NULL",
            "return", "int", "const", "void", "static", "struct", "error", "file", "user", "data",
            "value", "size", "ok", "INFO", "DEBUG", "http", "/usr/lib", "id",
        ] {
            words.push((bytes.len() as u32, w.len() as u8));
            bytes.extend_from_slice(w.as_bytes());
        }
        while words.len() < (1 << VOCAB_BITS) {
            let start = bytes.len();
            let syl = rng.range(1, 4);
            for _ in 0..syl {
                for part in [ON, NU, CO] {
                    bytes.extend_from_slice(part[rng.below(part.len() as u64) as usize].as_bytes());
                }
            }
            match rng.below(12) {
                0 => bytes.extend_from_slice(b"_t"),
                1 => bytes.extend_from_slice(b".so"),
                2 => bytes.extend_from_slice(b"()"),
                3 => {
                    let c = bytes[start].to_ascii_uppercase();
                    bytes[start] = c;
                }
                _ => {}
            }
            let len = (bytes.len() - start).min(255);
            bytes.truncate(start + len);
            words.push((start as u32, len as u8));
        }
        Vocab { bytes, words }
    }

    /// A skewed (roughly Zipf-like) pick from 32 random bits.
    #[inline]
    fn pick(&self, r: u64) -> &[u8] {
        let a = r & 0xFFFF;
        let b = (r >> 16) & 0xFFFF;
        let idx = ((a * b) >> (32 - VOCAB_BITS)) as usize;
        let (off, len) = self.words[idx];
        &self.bytes[off as usize..off as usize + len as usize]
    }
}

fn gen_text(rng: &mut Rng, vocab: &Vocab, buf: &mut [u8]) {
    let n = buf.len();
    let mut pos = 0;
    let mut col = 0usize;
    let mut line_len = 40 + rng.below(60) as usize;
    let mut numbuf = [0u8; 20];
    while pos < n {
        let r = rng.next();
        let word: &[u8] = if (r >> 60) == 0 {
            // A number now and then (timestamps, counters, addresses).
            let mut v = (r >> 32) & 0x0FFF_FFFF;
            if (r >> 59) & 1 == 0 {
                v %= 1000;
            }
            let mut i = numbuf.len();
            loop {
                i -= 1;
                numbuf[i] = b'0' + (v % 10) as u8;
                v /= 10;
                if v == 0 {
                    break;
                }
            }
            &numbuf[i..]
        } else {
            vocab.pick(r)
        };
        let take = word.len().min(n - pos);
        buf[pos..pos + take].copy_from_slice(&word[..take]);
        pos += take;
        col += take;
        if pos >= n {
            break;
        }
        let sep: &[u8] = if col >= line_len {
            col = 0;
            line_len = 40 + ((r >> 40) % 60) as usize;
            if (r >> 56) & 7 == 0 {
                b"\n    "
            } else {
                b"\n"
            }
        } else {
            match (r >> 36) & 31 {
                0 => b", ",
                1 => b". ",
                2 => b": ",
                3 => b"_",
                4 => b"/",
                _ => b" ",
            }
        };
        let take = sep.len().min(n - pos);
        buf[pos..pos + take].copy_from_slice(&sep[..take]);
        pos += take;
        col += take;
    }
}

fn gen_random(rng: &mut Rng, buf: &mut [u8]) {
    for c in buf.chunks_exact_mut(8) {
        c.copy_from_slice(&rng.next().to_le_bytes());
    }
}

fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Structured binary: tables of small integers, pointer arrays, records,
/// padding and some random bytes (hashes, packed data).
fn gen_struct(rng: &mut Rng, buf: &mut [u8]) {
    let region = 0x0000_7F00_0000_0000u64 | (rng.below(8) << 36) | (rng.below(16) << 28);
    let n = buf.len();
    let mut pos = 0;
    while pos < n {
        let seg = (64 * rng.range(1, 12) as usize).min(n - pos);
        let s = &mut buf[pos..pos + seg];
        match rng.below(16) {
            0..=3 => {
                // Table of small, slowly increasing u32 values.
                let mut v = rng.below(1000) as u32;
                let step = rng.range(0, 8);
                for c in s.chunks_exact_mut(4) {
                    v = v.wrapping_add(rng.below(step + 1) as u32);
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            4..=7 => {
                // Pointer-like values into one mapping, some NULL.
                for c in s.chunks_exact_mut(8) {
                    let r = rng.next();
                    let p = if r & 7 == 0 {
                        0
                    } else {
                        region + (((r >> 8) & 0x3_FFFF) << 3)
                    };
                    c.copy_from_slice(&p.to_le_bytes());
                }
            }
            8..=10 => {
                // Records: { u32 id, u16 type, u16 flags, u64 pointer }.
                let mut id = rng.below(1 << 20) as u32;
                for c in s.chunks_exact_mut(16) {
                    let r = rng.next();
                    id += 1 + (r & 1) as u32;
                    put_u32(c, 0, id);
                    put_u16(c, 4, ((r >> 8) & 7) as u16);
                    put_u16(c, 6, ((r >> 12) & 0x0101) as u16);
                    let p = region + (((r >> 20) & 0xF_FFFF) << 4);
                    c[8..16].copy_from_slice(&p.to_le_bytes());
                }
            }
            11..=12 => s.fill(0),
            _ => gen_random(rng, s),
        }
        pos += seg;
    }
}

fn gen_inode(rng: &mut Rng, vocab: &Vocab, buf: &mut [u8]) {
    let _ = vocab;
    buf.fill(0);
    let used = rng.range(1, 16) as usize;
    let base_time = 1_700_000_000u32 + rng.below(30_000_000) as u32;
    for (i, rec) in buf.chunks_exact_mut(256).take(used).enumerate() {
        let r = rng.next();
        let dir = r & 15 == 0;
        put_u16(rec, 0, if dir { 0x41ED } else { 0x81A4 });
        put_u16(rec, 2, if r & 0x10 == 0 { 1000 } else { 0 });
        let size = if dir {
            4096
        } else {
            ((r >> 8) & 0xF_FFFF) as u32
        };
        put_u32(rec, 4, size);
        for t in 0..4 {
            put_u32(
                rec,
                8 + 4 * t,
                base_time + ((r >> 28) & 0xFFFF) as u32 + t as u32,
            );
        }
        put_u16(rec, 24, if r & 0x10 == 0 { 1000 } else { 0 });
        put_u16(rec, 26, if dir { 2 } else { 1 });
        put_u32(rec, 28, size.div_ceil(512));
        put_u32(rec, 32, 0x0008_0000); // EXTENTS_FL
                                       // Extent header + one extent.
        put_u16(rec, 40, 0xF30A);
        put_u16(rec, 42, 1);
        put_u16(rec, 44, 4);
        put_u32(rec, 52, 0);
        put_u16(rec, 56, size.div_ceil(4096).max(1) as u16);
        put_u32(rec, 60, rng.below(1 << 20) as u32);
        put_u32(rec, 100, rng.next() as u32); // generation
        put_u16(rec, 128, 32); // i_extra_isize
        put_u32(rec, 144, base_time + i as u32); // crtime
    }
}

fn gen_bitmap(rng: &mut Rng, buf: &mut [u8]) {
    buf.fill(0);
    let full = rng.range(1, buf.len() as u64 - 64) as usize;
    buf[..full].fill(0xFF);
    for _ in 0..rng.range(0, 24) {
        let at = full + rng.below(64) as usize;
        buf[at] = rng.next() as u8;
    }
}

fn gen_dir(rng: &mut Rng, vocab: &Vocab, buf: &mut [u8]) {
    buf.fill(0);
    let n = buf.len();
    let mut pos = 0;
    let mut ino = rng.range(11, 1 << 20) as u32;
    let entries = rng.range(2, 100);
    for e in 0..entries {
        let name = vocab.pick(rng.next());
        let ext: &[u8] = match rng.below(6) {
            0 => b".txt",
            1 => b".so",
            2 => b".conf",
            _ => b"",
        };
        let name_len = (name.len() + ext.len()).min(255);
        let rec_len = (8 + name_len).div_ceil(4) * 4;
        if pos + rec_len > n {
            break;
        }
        let last = e + 1 == entries || pos + rec_len + 12 > n;
        let rl = if last { n - pos } else { rec_len };
        put_u32(buf, pos, ino);
        put_u16(buf, pos + 4, rl as u16);
        buf[pos + 6] = name_len as u8;
        buf[pos + 7] = if rng.below(5) == 0 { 2 } else { 1 };
        let nm = &mut buf[pos + 8..pos + 8 + name_len];
        let k = name.len().min(name_len);
        nm[..k].copy_from_slice(&name[..k]);
        nm[k..].copy_from_slice(&ext[..name_len - k]);
        ino += rng.range(1, 3) as u32;
        pos += rl;
        if last {
            break;
        }
    }
}

fn gen_super(rng: &mut Rng, buf: &mut [u8]) {
    // Superblock fields up front, then a table of 64-byte group descriptors.
    buf.fill(0);
    put_u32(buf, 0, 65536);
    put_u32(buf, 4, 1 << 20);
    put_u16(buf, 56, 0xEF53);
    for (i, gd) in buf[1024..].chunks_exact_mut(64).enumerate() {
        let r = rng.next();
        put_u32(gd, 0, (i as u32) * 32768 + 1);
        put_u32(gd, 4, (i as u32) * 32768 + 2);
        put_u32(gd, 8, (i as u32) * 32768 + 3);
        put_u16(gd, 12, (r & 0x7FFF) as u16);
        put_u16(gd, 14, ((r >> 16) & 0x1FFF) as u16);
        put_u16(gd, 18, ((r >> 32) & 0xFF) as u16);
    }
}

/// Flip 1-4 runs of 1..=edit_max bytes (XOR with non-zero values: every
/// byte of the first run really changes).
fn apply_edit(d: &Desc, buf: &mut [u8]) {
    let mut rng = Rng::new(d.edit);
    let places = rng.range(1, 4);
    for _ in 0..places {
        let len = rng.range(1, d.edit_max.max(1) as u64) as usize;
        let off = rng.below((buf.len() - len + 1) as u64) as usize;
        for b in &mut buf[off..off + len] {
            *b ^= (rng.below(255) + 1) as u8;
        }
    }
}

fn fill_page(d: &Desc, vocab: &Vocab, buf: &mut [u8]) {
    let mut rng = Rng::new(mix(d.key, d.kind as u64));
    match d.kind {
        Kind::Zero => buf.fill(0),
        Kind::Text => gen_text(&mut rng, vocab, buf),
        Kind::Random => gen_random(&mut rng, buf),
        Kind::Struct => gen_struct(&mut rng, buf),
        Kind::Inode => gen_inode(&mut rng, vocab, buf),
        Kind::Bitmap => gen_bitmap(&mut rng, buf),
        Kind::Dir => gen_dir(&mut rng, vocab, buf),
        Kind::Super => gen_super(&mut rng, buf),
    }
    if d.edit != 0 {
        apply_edit(d, buf);
    }
}

// ---------------------------------------------------------------------------
// Sparse parallel writer.

#[derive(Default, Debug, Clone, Copy)]
struct WriteStats {
    data_pages: u64,
    hole_pages: u64,
}

/// Unlink an existing output first: truncating a large file in place is
/// much slower than unlinking it on some filesystems (ext4 with discard).
fn remove_existing(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

fn write_image(path: &Path, descs: &[Desc], vocab: &Vocab) -> Result<WriteStats> {
    let f = File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.set_len((descs.len() * PAGE) as u64)
        .with_context(|| format!("sizing {}", path.display()))?;
    let stats = descs
        .par_chunks(CHUNK_PAGES)
        .enumerate()
        .map_init(
            || vec![0u8; CHUNK_PAGES * PAGE],
            |buf, (ci, chunk)| -> Result<WriteStats> {
                let mut st = WriteStats::default();
                let first = ci * CHUNK_PAGES;
                let mut run_start: Option<usize> = None;
                let flush = |rs: usize, end: usize, buf: &[u8]| -> Result<()> {
                    f.write_all_at(&buf[rs * PAGE..end * PAGE], ((first + rs) * PAGE) as u64)
                        .with_context(|| format!("writing {}", path.display()))
                };
                for (i, d) in chunk.iter().enumerate() {
                    let page = &mut buf[i * PAGE..(i + 1) * PAGE];
                    let zero = if d.is_zero() {
                        true
                    } else {
                        fill_page(d, vocab, page);
                        page_is_zero(page)
                    };
                    if zero {
                        st.hole_pages += 1;
                        if let Some(rs) = run_start.take() {
                            flush(rs, i, buf)?;
                        }
                    } else {
                        st.data_pages += 1;
                        run_start.get_or_insert(i);
                    }
                }
                if let Some(rs) = run_start {
                    flush(rs, chunk.len(), buf)?;
                }
                Ok(st)
            },
        )
        .try_reduce(WriteStats::default, |a, b| {
            Ok(WriteStats {
                data_pages: a.data_pages + b.data_pages,
                hole_pages: a.hole_pages + b.hole_pages,
            })
        })?;
    Ok(stats)
}

#[inline]
fn page_is_zero(p: &[u8]) -> bool {
    p.chunks_exact(64).all(|c| {
        c.chunks_exact(8).fold(0u64, |acc, w| {
            acc | u64::from_le_bytes(w.try_into().unwrap_or([1; 8]))
        }) == 0
    })
}

// ---------------------------------------------------------------------------
// M1: memory pair.

#[derive(Default, Debug)]
struct MemStats {
    base: [u64; 4], // zero, text, random, struct
    copy: u64,
    zeroed: u64,
    modified: u64,
    new_text: u64,
    new_random: u64,
    new_struct: u64,
}

const TAG_BASE: u64 = 0xB0;
const TAG_LAUNCH: u64 = 0x1A;

fn plan_memory(pages: usize, seed: u64) -> (Vec<Desc>, Vec<Desc>, MemStats) {
    let mut st = MemStats::default();
    let mut rng = Rng::new(mix(seed, 0x4D31));
    let kbase = mix(seed, TAG_BASE);
    let klaunch = mix(seed, TAG_LAUNCH);

    // Base: runs of pages of one kind (mappings, heaps, page-cache files).
    // 40% zero, 30% text, 15% random, 15% structured (by pages).
    let mut base = Vec::with_capacity(pages);
    while base.len() < pages {
        let r = rng.below(100);
        let kind = match r {
            0..=39 => Kind::Zero,
            40..=69 => Kind::Text,
            70..=84 => Kind::Random,
            _ => Kind::Struct,
        };
        let run = (rng.log_range(1, 64) as usize).min(pages - base.len());
        for _ in 0..run {
            let i = base.len();
            base.push(if kind == Kind::Zero {
                Desc::ZERO
            } else {
                Desc::new(kind, mix(kbase, i as u64))
            });
        }
    }
    for d in &base {
        st.base[match d.kind {
            Kind::Zero => 0,
            Kind::Text => 1,
            Kind::Random => 2,
            _ => 3,
        }] += 1;
    }
    let nonzero = base.iter().any(|d| !d.is_zero());

    // Launch: 10% of pages changed, chosen in short runs.
    let mut launch = base.clone();
    let mut i = 0;
    while i < pages {
        let run = (rng.log_range(1, 16) as usize).min(pages - i);
        // Mean of log_range(1,16) is ~5.4; select runs with p = 0.1 so that
        // ~10% of pages change.
        if rng.chance(0.10) {
            for p in i..i + run {
                let b = base[p];
                let r = rng.below(100);
                // ~1/3 copies, ~10% zeroed, ~25% modified, the rest new.
                let d = if r < 33 && nonzero {
                    // A copy of another (non-zero) base page.
                    let mut j;
                    loop {
                        j = rng.below(pages as u64) as usize;
                        if j != p && !base[j].is_zero() {
                            break;
                        }
                    }
                    st.copy += 1;
                    base[j]
                } else if r < 48 && !b.is_zero() {
                    st.zeroed += 1;
                    Desc::ZERO
                } else if (48..73).contains(&r) {
                    // A few bytes modified (a zero page may get a few fields).
                    st.modified += 1;
                    b.with_edit(mix(klaunch ^ 0xED, p as u64), 16)
                } else {
                    let kind = match rng.below(10) {
                        0..=4 => {
                            st.new_text += 1;
                            Kind::Text
                        }
                        5..=7 => {
                            st.new_random += 1;
                            Kind::Random
                        }
                        _ => {
                            st.new_struct += 1;
                            Kind::Struct
                        }
                    };
                    Desc::new(kind, mix(klaunch, p as u64))
                };
                launch[p] = d;
            }
        }
        i += run;
    }
    (base, launch, st)
}

// ---------------------------------------------------------------------------
// D1: disk pair.

const GROUP: usize = 32768; // blocks per group (128 MiB)
const INODE_TABLE: usize = 512;

#[derive(Debug, Clone, Copy)]
struct Extent {
    start: usize,
    len: usize,
}

#[derive(Default, Debug)]
struct DiskStats {
    base_files: u64,
    base_file_blocks: u64,
    base_meta_blocks: u64,
    new_files: u64,
    new_blocks: u64,
    dup_files: u64,
    dup_blocks: u64,
    modified_meta: u64,
}

fn file_len(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=5 => rng.range(1, 8) as usize,
        6..=8 => rng.log_range(9, 256) as usize,
        _ => rng.log_range(257, 4096) as usize,
    }
}

fn file_block_kind(rng: &mut Rng, file_kind: u64) -> Kind {
    match file_kind {
        0 => Kind::Text,
        1 => {
            // Executables / libraries: mostly structured, some packed data.
            if rng.below(10) < 6 {
                Kind::Struct
            } else {
                Kind::Random
            }
        }
        _ => Kind::Random,
    }
}

fn file_kind(rng: &mut Rng) -> u64 {
    match rng.below(20) {
        0..=6 => 0,  // text 35%
        7..=13 => 1, // binaries 35%
        _ => 2,      // media / compressed 30%
    }
}

fn plan_disk(blocks: usize, seed: u64) -> (Vec<Desc>, Vec<Desc>, DiskStats) {
    let mut st = DiskStats::default();
    let mut rng = Rng::new(mix(seed, 0xD1));
    let kbase = mix(seed, TAG_BASE ^ 0xD);
    let klaunch = mix(seed, TAG_LAUNCH ^ 0xD);
    let mut base = vec![Desc::ZERO; blocks];
    let mut meta: Vec<usize> = Vec::new();
    let mut files: Vec<Extent> = Vec::new();
    let groups = blocks.div_ceil(GROUP);
    // Free tail of every group: [cursor, end).
    let mut free: Vec<(usize, usize)> = Vec::with_capacity(groups);
    let data_target = blocks / 4;
    let mut data_used = 0usize;

    for g in 0..groups {
        let gs = g * GROUP;
        let ge = (gs + GROUP).min(blocks);
        let mut cur = gs;
        let put_meta = |b: usize, kind: Kind, base: &mut Vec<Desc>, meta: &mut Vec<usize>| {
            if b < ge {
                base[b] = Desc::new(kind, mix(kbase, b as u64));
                meta.push(b);
            }
        };
        if g == 0 || g == 1 || (g % 2 == 1 && [3, 5, 7, 9, 25, 27, 49, 81].contains(&g)) {
            put_meta(cur, Kind::Super, &mut base, &mut meta);
        }
        cur += 1;
        put_meta(cur, Kind::Bitmap, &mut base, &mut meta);
        put_meta(cur + 1, Kind::Bitmap, &mut base, &mut meta);
        cur += 2;
        // Inode table: the used part holds records, the rest was never
        // written (zeroes: holes).
        let it_used = rng.range(16, INODE_TABLE as u64) as usize;
        for b in cur..cur + it_used {
            put_meta(b, Kind::Inode, &mut base, &mut meta);
        }
        cur += INODE_TABLE;
        // File data up to this group's share of the data target.
        let left_groups = groups - g;
        let share = (data_target.saturating_sub(data_used)) / left_groups;
        let want = ((share as f64) * (0.5 + rng.unit())) as usize;
        let mut placed = 0usize;
        while placed < want && cur < ge {
            if rng.chance(0.08) {
                put_meta(cur, Kind::Dir, &mut base, &mut meta);
                cur += 1;
            }
            let fk = file_kind(&mut rng);
            let len = file_len(&mut rng).min(ge.saturating_sub(cur));
            if len == 0 {
                break;
            }
            let fid = files.len() as u64;
            for k in 0..len {
                let kind = file_block_kind(&mut rng, fk);
                base[cur + k] = Desc::new(kind, mix(kbase ^ fid.rotate_left(32), k as u64));
            }
            files.push(Extent { start: cur, len });
            placed += len;
            cur += len;
            if rng.chance(0.3) {
                cur += rng.log_range(1, 64) as usize; // free gap (hole)
            }
        }
        data_used += placed;
        let tail_start = (cur + rng.range(0, 256) as usize).min(ge);
        free.push((tail_start, ge));
    }
    st.base_files = files.len() as u64;
    st.base_file_blocks = files.iter().map(|e| e.len as u64).sum();
    st.base_meta_blocks = meta.len() as u64;

    // Launch: new files (~300 MiB per 4 GiB) in free space, ~30% of them
    // duplicates of base files; then metadata rewrites.
    let mut launch = base.clone();
    let new_target = blocks * 300 / 4096;
    let file_ends: Vec<usize> = files
        .iter()
        .scan(0usize, |acc, f| {
            *acc += f.len;
            Some(*acc)
        })
        .collect();
    let mut fails = 0;
    let mut new_id = 0u64;
    while (st.new_blocks as usize) < new_target && fails < 1000 && !free.is_empty() {
        let g = rng.below(free.len() as u64) as usize;
        let (cur, end) = free[g];
        // Keep ~30% of the new bytes duplicates of base files; pick the
        // source file weighted by size (as a random base data block would).
        let dup = !files.is_empty() && (st.dup_blocks as f64) < 0.3 * (st.new_blocks as f64 + 1.0);
        let (src, len) = if dup {
            let at = rng.below(file_ends[file_ends.len() - 1] as u64) as usize;
            let f = files[file_ends.partition_point(|&e| e <= at)];
            (Some(f), f.len)
        } else {
            (None, file_len(&mut rng))
        };
        let start = cur
            + if rng.chance(0.3) {
                rng.range(1, 16) as usize
            } else {
                0
            };
        if start + len > end {
            fails += 1;
            continue;
        }
        match src {
            Some(f) => {
                launch[start..start + len].copy_from_slice(&base[f.start..f.start + len]);
                st.dup_files += 1;
                st.dup_blocks += len as u64;
            }
            None => {
                let fk = file_kind(&mut rng);
                for k in 0..len {
                    let kind = file_block_kind(&mut rng, fk);
                    launch[start + k] =
                        Desc::new(kind, mix(klaunch ^ new_id.rotate_left(32), k as u64));
                }
            }
        }
        fails = 0;
        new_id += 1;
        st.new_files += 1;
        st.new_blocks += len as u64;
        free[g].0 = start + len;
    }

    // Metadata rewrites: ~3000 blocks per 4 GiB, a few bytes (bitmaps) to a
    // few hundred bytes (inode tables) each.
    let n_mod = (blocks * 3000 / (1 << 20)).max(16).min(meta.len() / 2);
    for k in 0..n_mod {
        let j = k + rng.below((meta.len() - k) as u64) as usize;
        meta.swap(k, j);
        let b = meta[k];
        let d = base[b];
        let max = match d.kind {
            Kind::Bitmap => 8,
            Kind::Dir => 64,
            Kind::Super => 32,
            _ => 256,
        };
        launch[b] = d.with_edit(mix(klaunch ^ 0xED, b as u64), max);
        st.modified_meta += 1;
    }
    (base, launch, st)
}

// ---------------------------------------------------------------------------

fn mib(pages: u64) -> f64 {
    pages as f64 * PAGE as f64 / (1u64 << 20) as f64
}

fn run_pair(args: &PairArgs, default_size: u64, disk: bool) -> Result<()> {
    let size = args.size.unwrap_or(default_size);
    ensure!(
        size.is_multiple_of(PAGE as u64),
        "size must be a multiple of 4096"
    );
    let pages = (size / PAGE as u64) as usize;
    if args.base == args.launch {
        bail!("--base and --launch must differ");
    }
    let t0 = Instant::now();
    let vocab = Vocab::new();
    let (base, launch, summary) = if disk {
        let (b, l, s) = plan_disk(pages, args.seed);
        let sum = format!(
            "base: {} files in {} blocks ({:.0} MiB), {} metadata blocks; launch: +{} files in {} blocks ({:.0} MiB), of which {} files / {} blocks ({:.0} MiB) duplicate base files; {} metadata blocks rewritten",
            s.base_files,
            s.base_file_blocks,
            mib(s.base_file_blocks),
            s.base_meta_blocks,
            s.new_files,
            s.new_blocks,
            mib(s.new_blocks),
            s.dup_files,
            s.dup_blocks,
            mib(s.dup_blocks),
            s.modified_meta
        );
        (b, l, sum)
    } else {
        let (b, l, s) = plan_memory(pages, args.seed);
        let changed = s.copy + s.zeroed + s.modified + s.new_text + s.new_random + s.new_struct;
        let sum = format!(
            "base: {} zero, {} text, {} random, {} struct pages; launch: {} changed ({:.1}%): {} copies of other base pages, {} zeroed, {} modified in place, {} new text, {} new random, {} new struct",
            s.base[0],
            s.base[1],
            s.base[2],
            s.base[3],
            changed,
            100.0 * changed as f64 / pages as f64,
            s.copy,
            s.zeroed,
            s.modified,
            s.new_text,
            s.new_random,
            s.new_struct
        );
        (b, l, sum)
    };
    remove_existing(&args.base)?;
    remove_existing(&args.launch)?;
    let wb = write_image(&args.base, &base, &vocab)?;
    let wl = write_image(&args.launch, &launch, &vocab)?;
    let secs = t0.elapsed().as_secs_f64();
    let written = (wb.data_pages + wl.data_pages) * PAGE as u64;
    println!(
        "{} size={} seed={}: {}; written: base {:.0} MiB, launch {:.0} MiB (holes: {} + {} pages) in {:.2}s ({:.2} GiB/s)",
        if disk { "D1 disk" } else { "M1 memory" },
        size,
        args.seed,
        summary,
        mib(wb.data_pages),
        mib(wl.data_pages),
        wb.hole_pages,
        wl.hole_pages,
        secs,
        written as f64 / secs / (1u64 << 30) as f64
    );
    Ok(())
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let threads = match &cli.cmd {
        Cmd::Memory(a) | Cmd::Disk(a) => a.threads,
        Cmd::Sample { .. } => None,
    };
    if let Some(t) = threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("building thread pool")?;
    }
    match &cli.cmd {
        Cmd::Memory(a) => run_pair(a, 1 << 30, false),
        Cmd::Disk(a) => run_pair(a, 4 << 30, true),
        Cmd::Sample { kind, pages, out } => {
            let k = match kind.as_str() {
                "text" => Kind::Text,
                "random" => Kind::Random,
                "struct" => Kind::Struct,
                "inode" => Kind::Inode,
                "bitmap" => Kind::Bitmap,
                "dir" => Kind::Dir,
                "super" => Kind::Super,
                _ => bail!("unknown kind {kind}"),
            };
            let descs: Vec<Desc> = (0..*pages)
                .map(|i| Desc::new(k, mix(99, i as u64)))
                .collect();
            remove_existing(out)?;
            write_image(out, &descs, &Vocab::new())?;
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("8192").unwrap(), 8192);
        assert!(parse_size("100").is_err());
        assert!(parse_size("x").is_err());
    }

    #[test]
    fn deterministic_and_distinct() {
        let (b1, l1, _) = plan_memory(4096, 7);
        let (b2, l2, _) = plan_memory(4096, 7);
        let v = Vocab::new();
        let mut p1 = vec![0u8; PAGE];
        let mut p2 = vec![0u8; PAGE];
        let mut changed = 0;
        for i in 0..4096 {
            fill_page(&b1[i], &v, &mut p1);
            fill_page(&b2[i], &v, &mut p2);
            assert_eq!(p1, p2);
            fill_page(&l1[i], &v, &mut p1);
            fill_page(&l2[i], &v, &mut p2);
            assert_eq!(p1, p2);
            fill_page(&b1[i], &v, &mut p2);
            if p1 != p2 {
                changed += 1;
            }
        }
        assert!((250..600).contains(&changed), "changed {changed}");
    }

    #[test]
    fn edits_change_pages() {
        let v = Vocab::new();
        let mut a = vec![0u8; PAGE];
        let mut b = vec![0u8; PAGE];
        for k in [
            Kind::Text,
            Kind::Random,
            Kind::Struct,
            Kind::Inode,
            Kind::Bitmap,
            Kind::Dir,
        ] {
            for key in 0..50 {
                let d = Desc::new(k, key);
                fill_page(&d, &v, &mut a);
                assert!(!page_is_zero(&a), "{k:?} page all zero");
                fill_page(&d.with_edit(key + 99, 16), &v, &mut b);
                assert_ne!(a, b);
            }
        }
    }
}
