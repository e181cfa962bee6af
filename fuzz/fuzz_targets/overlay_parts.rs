//! The overlay's pure parsers, one at a time. The first byte selects the
//! parser; the rest is its input. Every parser must refuse bad input with
//! an error, never panic, and what it accepts must encode back to the same
//! bytes (the formats are canonical).
#![no_main]

use kimberley_formats::chunk::{chunk_count, chunk_len};
use kimberley_formats::crypto::Sealer;
use kimberley_formats::overlay::frame::{Footer, FrameHeader, FOOTER_LEN, FRAME_HEADER_LEN};
use kimberley_formats::overlay::header::{Header, HEADER_LEN, MAC_OFFSET};
use kimberley_formats::overlay::io;
use kimberley_formats::overlay::record::{self, Geometry, Op, MAX_RUN};
use kimberley_formats::overlay::segment::{Index, ManifestSegment, MAX_BODY};
use kimberley_formats::overlay::{delta, Pos};
use kimberley_formats::vmdir::Manifest;
use libfuzzer_sys::fuzz_target;

/// Reads little-endian fields off the front of the input.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn uint(&mut self, n: usize) -> u64 {
        (0..n).fold(0u64, |v, i| v | (u64::from(self.u8()) << (8 * i)))
    }
}

fn header(b: &[u8]) {
    let Ok(h) = Header::decode(b) else { return };
    assert!(b.len() >= HEADER_LEN);
    assert_eq!(&h.encode_unsigned()[..], &b[..MAC_OFFSET], "header round trip");
    assert_eq!(&h.mac[..], &b[MAC_OFFSET..HEADER_LEN]);
    let _ = h.verify_mac(None);
    let _ = h.binding();
    let _ = h.has_parent();
    if let kimberley_formats::crypto::KeyMaterial::Passphrase(p) = h.protection {
        p.check().expect("decode accepted these Argon2 parameters");
    }
    let mut h2 = h.clone();
    let sealed = h2.seal(None);
    assert_eq!(Header::decode(&sealed).expect("sealed header decodes"), h2);
}

fn frame_header(b: &[u8]) {
    let Some(a) = b.get(..FRAME_HEADER_LEN) else { return };
    let a: &[u8; FRAME_HEADER_LEN] = a.try_into().unwrap();
    if let Ok(f) = FrameHeader::decode(a) {
        assert_eq!(&f.encode(), a, "frame header round trip");
    }
}

fn footer(b: &[u8]) {
    let Some(a) = b.get(..FOOTER_LEN) else { return };
    let a: &[u8; FOOTER_LEN] = a.try_into().unwrap();
    if let Ok(f) = Footer::decode(a) {
        assert_eq!(&f.encode(), a, "footer round trip");
    }
}

fn manifest_segment(b: &[u8]) {
    let Ok(m) = ManifestSegment::decode(b) else { return };
    assert_eq!(m.encode(), b, "manifest segment round trip");
    let launch = m.launch_manifest();
    let _ = launch.identity();
    // A manifest segment's launch manifest is a valid manifest.json.
    let json = launch.encode();
    assert_eq!(Manifest::parse(&json).expect("launch manifest parses"), launch);
}

fn index(b: &[u8]) {
    let Ok(ix) = Index::decode(b) else { return };
    assert_eq!(ix.encode(), b, "index round trip");
    // Statistics are untrusted: summing them must not panic (regression:
    // regressions/overlay_parts-index_stats_total_overflow.bin).
    let _ = ix.stats.total();
}

/// Component sizes: small (up to 16 MiB, so runs can be valid) or any size
/// a manifest accepts (up to 1 TiB).
fn geometry(r: &mut Bytes<'_>, large: bool) -> Geometry {
    let size = |r: &mut Bytes<'_>| {
        if large {
            r.uint(6).min(1 << 40)
        } else {
            r.uint(3)
        }
    };
    let nl = usize::from(r.u8() % 4) + 1;
    let launch = (0..nl).map(|_| size(r)).collect();
    let nb = usize::from(r.u8() % 4);
    let base = (0..nb).map(|_| size(r)).collect();
    Geometry { launch, base }
}

fn records(b: &[u8], large: bool) {
    let mut r = Bytes(b);
    let geo = geometry(&mut r, large);
    let sel = r.u8();
    let after: Pos = (sel % 4, r.uint(2));
    // Bit 7: a version-2 working-set segment (records in any order).
    let ordered = sel & 0x80 == 0;
    let body = r.0;
    let Ok(recs) = record::parse(body, &geo, ordered.then_some(after)) else { return };
    let mut prev = after;
    for rec in &recs {
        let size = geo.launch[usize::from(rec.comp)];
        assert!(!ordered || rec.start_pos() >= prev, "records out of order");
        assert!(rec.count >= 1 && rec.count <= MAX_RUN);
        assert!(rec.start + u64::from(rec.count) <= chunk_count(size));
        prev = rec.end_pos();
        match &rec.op {
            Op::Zero => {}
            Op::Literal(range) => {
                let want = record::run_bytes(size, rec.start, rec.end_pos().1);
                assert_eq!(range.len(), want, "literal length");
                assert!(range.end <= body.len());
            }
            Op::RefBase { comp, chunk } | Op::RefSelf { comp, chunk } => {
                let sizes = if matches!(rec.op, Op::RefBase { .. }) {
                    &geo.base
                } else {
                    &geo.launch
                };
                let src = sizes[usize::from(*comp)];
                assert!(chunk + u64::from(rec.count) <= chunk_count(src));
            }
            Op::Delta(range) => {
                assert_eq!(rec.count, 1);
                let len = chunk_len(size, rec.start);
                let mut chunk = vec![0x5a; len];
                delta::apply(&body[range.clone()], &mut chunk);
            }
        }
    }
}

/// Validates a delta against a chunk of `len` bytes and applies it to a
/// chunk of that length and to a full 4096-byte chunk.
fn delta_apply(b: &[u8]) {
    let mut r = Bytes(b);
    let len = (r.uint(2) % 4097) as usize;
    let bytes = r.0;
    let Ok(n) = delta::validate(bytes, len) else { return };
    assert!(n <= bytes.len());
    let mut chunk = vec![0xa5u8; len];
    delta::apply(bytes, &mut chunk);
    let mut full = vec![0xa5u8; 4096];
    delta::apply(&bytes[..n], &mut full);
    assert_eq!(&full[..len], &chunk[..], "apply depends on the buffer");
}

/// delta::encode → validate → apply gives the new chunk back.
fn delta_round_trip(b: &[u8]) {
    let mut r = Bytes(b);
    let len = (r.uint(2) % 4097) as usize;
    let limit = r.uint(2) as usize;
    let rest = r.0;
    let base: Vec<u8> = (0..len).map(|i| rest.get(i).copied().unwrap_or(0)).collect();
    // The new chunk: the base with a sparse set of bytes changed.
    let mut new = base.clone();
    for pair in rest.get(len..).unwrap_or(&[]).chunks(3) {
        if let [a, b2, v] = *pair {
            if len > 0 {
                let i = usize::from(u16::from_le_bytes([a, b2])) % len;
                new[i] = v;
            }
        }
    }
    let Some(d) = delta::encode(&base, &new, limit) else { return };
    assert!(d.len() < limit);
    if base == new {
        // Nothing to patch (the diff never asks for this delta).
        return;
    }
    assert_eq!(delta::validate(&d, len), Ok(d.len()), "encoded delta validates");
    let mut out = base.clone();
    delta::apply(&d, &mut out);
    assert_eq!(out, new, "delta round trip");
}

fn decompress(b: &[u8]) {
    if let Ok(v) = io::decompress(b) {
        assert!(v.len() <= MAX_BODY);
    }
    let c = io::compress(b, 1);
    assert_eq!(io::decompress(&c).expect("own output decompresses"), b);
}

fn sealer_open(b: &[u8]) {
    let mut r = Bytes(b);
    let sel = r.u8();
    let counter = r.uint(8);
    let aad_len = usize::from(r.u8() % 16);
    let aad: Vec<u8> = (0..aad_len).map(|_| r.u8()).collect();
    let last = sel & 2 != 0;
    let s = if sel & 1 == 0 {
        Sealer::Plain([7; 32])
    } else {
        Sealer::aead(&[7; 32])
    };
    let mut data = r.0.to_vec();
    let _ = s.open(counter, last, &aad, &mut data);
    let plain = r.0.to_vec();
    let mut sealed = plain.clone();
    s.seal(counter, last, &aad, &mut sealed);
    s.open(counter, last, &aad, &mut sealed).expect("own seal opens");
    assert_eq!(sealed, plain);
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, b)) = data.split_first() else { return };
    match sel % 11 {
        0 => header(b),
        1 => frame_header(b),
        2 => footer(b),
        3 => manifest_segment(b),
        4 => index(b),
        5 => records(b, false),
        6 => records(b, true),
        7 => delta_apply(b),
        8 => delta_round_trip(b),
        9 => decompress(b),
        _ => sealer_open(b),
    }
});
