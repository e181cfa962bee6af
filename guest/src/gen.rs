//! Deterministic data generators and the checksum (XXH64).
//!
//! Pure `core` code: the VMM's tests include this file too, to compute the
//! expected checksums on the host.

#![allow(dead_code)]

/// SplitMix64: a fast, statistically good (incompressible) stream.
#[derive(Clone, Copy, Debug)]
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fills `buf` with the next bytes of the stream, 8 bytes per step.
    /// Consecutive calls continue the stream as long as every call but the
    /// last has a length that is a multiple of 8.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        if !rest.is_empty() {
            let v = self.next_u64().to_le_bytes();
            let n = rest.len();
            rest.copy_from_slice(&v[..n]);
        }
    }
}

/// `random` fill: the SplitMix64 stream of `seed`, little-endian.
pub fn fill_random(buf: &mut [u8], seed: u64) {
    SplitMix::new(seed).fill(buf);
}

const WORDS: [&[u8]; 32] = [
    b"the", b"of", b"and", b"to", b"in", b"is", b"that", b"for", b"it", b"as", b"was", b"with",
    b"be", b"by", b"on", b"not", b"he", b"this", b"are", b"or", b"his", b"from", b"at", b"which",
    b"but", b"have", b"an", b"had", b"they", b"you", b"were", b"their",
];

/// `text` fill: words from a 32-word list chosen by SplitMix64(`seed`),
/// separated by spaces, a newline after every 12th word; the last word is
/// cut at the end of the buffer. Compresses well.
pub fn fill_text(buf: &mut [u8], seed: u64) {
    let mut rng = SplitMix::new(seed);
    let mut pos = 0usize;
    let mut bits = 0u64;
    let mut avail = 0u32;
    let mut nword = 0u32;
    while pos < buf.len() {
        if avail < 5 {
            bits = rng.next_u64();
            avail = 64;
        }
        let w = WORDS[(bits & 31) as usize];
        bits >>= 5;
        avail -= 5;
        nword += 1;
        let sep = if nword == 12 {
            nword = 0;
            b'\n'
        } else {
            b' '
        };
        for &b in w.iter().chain(core::iter::once(&sep)) {
            if pos >= buf.len() {
                break;
            }
            buf[pos] = b;
            pos += 1;
        }
    }
}

const P1: u64 = 0x9E37_79B1_85EB_CA87;
const P2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const P3: u64 = 0x1656_67B1_9E37_79F9;
const P4: u64 = 0x85EB_CA77_C2B2_AE63;
const P5: u64 = 0x27D4_EB2F_1656_67C5;

#[inline(always)]
fn round(acc: u64, input: u64) -> u64 {
    acc.wrapping_add(input.wrapping_mul(P2))
        .rotate_left(31)
        .wrapping_mul(P1)
}

#[inline(always)]
fn merge(acc: u64, val: u64) -> u64 {
    (acc ^ round(0, val)).wrapping_mul(P1).wrapping_add(P4)
}

#[inline(always)]
fn rd64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

#[inline(always)]
fn rd32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[..4]);
    u32::from_le_bytes(a)
}

/// Streaming XXH64 (seed 0 unless given), bit-compatible with the reference.
#[derive(Clone, Copy, Debug)]
pub struct Xxh64 {
    v: [u64; 4],
    seed: u64,
    total: u64,
    buf: [u8; 32],
    buf_len: usize,
}

impl Xxh64 {
    pub fn new(seed: u64) -> Self {
        Xxh64 {
            v: [
                seed.wrapping_add(P1).wrapping_add(P2),
                seed.wrapping_add(P2),
                seed,
                seed.wrapping_sub(P1),
            ],
            seed,
            total: 0,
            buf: [0; 32],
            buf_len: 0,
        }
    }

    #[inline(always)]
    fn stripe(v: &mut [u64; 4], s: &[u8]) {
        v[0] = round(v[0], rd64(&s[0..]));
        v[1] = round(v[1], rd64(&s[8..]));
        v[2] = round(v[2], rd64(&s[16..]));
        v[3] = round(v[3], rd64(&s[24..]));
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.total = self.total.wrapping_add(data.len() as u64);
        if self.buf_len > 0 {
            let take = core::cmp::min(32 - self.buf_len, data.len());
            self.buf[self.buf_len..self.buf_len + take].copy_from_slice(&data[..take]);
            self.buf_len += take;
            data = &data[take..];
            if self.buf_len < 32 {
                return;
            }
            let b = self.buf;
            Self::stripe(&mut self.v, &b);
            self.buf_len = 0;
        }
        let mut chunks = data.chunks_exact(32);
        let mut v = self.v;
        for c in &mut chunks {
            Self::stripe(&mut v, c);
        }
        self.v = v;
        let rest = chunks.remainder();
        self.buf[..rest.len()].copy_from_slice(rest);
        self.buf_len = rest.len();
    }

    pub fn digest(&self) -> u64 {
        let mut h = if self.total >= 32 {
            let v = self.v;
            let mut h = v[0]
                .rotate_left(1)
                .wrapping_add(v[1].rotate_left(7))
                .wrapping_add(v[2].rotate_left(12))
                .wrapping_add(v[3].rotate_left(18));
            h = merge(h, v[0]);
            h = merge(h, v[1]);
            h = merge(h, v[2]);
            merge(h, v[3])
        } else {
            self.seed.wrapping_add(P5)
        };
        h = h.wrapping_add(self.total);
        let mut rest = &self.buf[..self.buf_len];
        while rest.len() >= 8 {
            h ^= round(0, rd64(rest));
            h = h.rotate_left(27).wrapping_mul(P1).wrapping_add(P4);
            rest = &rest[8..];
        }
        if rest.len() >= 4 {
            h ^= (rd32(rest) as u64).wrapping_mul(P1);
            h = h.rotate_left(23).wrapping_mul(P2).wrapping_add(P3);
            rest = &rest[4..];
        }
        for &b in rest {
            h ^= (b as u64).wrapping_mul(P5);
            h = h.rotate_left(11).wrapping_mul(P1);
        }
        h ^= h >> 33;
        h = h.wrapping_mul(P2);
        h ^= h >> 29;
        h = h.wrapping_mul(P3);
        h ^ (h >> 32)
    }
}

/// One-shot XXH64 with seed 0.
pub fn xxh64(data: &[u8]) -> u64 {
    let mut h = Xxh64::new(0);
    h.update(data);
    h.digest()
}
