//! STREAM: each segment sealed under a nonce made of its counter and a
//! last-segment flag, so dropping, reordering, duplicating, truncating or
//! appending segments is detected.

use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Nonce, Tag};

use crate::error::{Error, Result};

/// Bytes a sealed segment adds with encryption (Poly1305 tag).
pub const AEAD_TAG: usize = 16;
/// Bytes a sealed segment adds without encryption (BLAKE3 tag).
pub const PLAIN_TAG: usize = 32;

/// Seals and opens segments of one overlay.
#[derive(Clone)]
pub enum Sealer {
    /// ChaCha20-Poly1305 with the payload key.
    Aead(Box<ChaCha20Poly1305>),
    /// `--no-encrypt`: a BLAKE3 tag keyed by the header's hash (integrity
    /// against accidents, binding segments to their header; no secrecy).
    Plain([u8; 32]),
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sealer::Aead(_) => f.write_str("Sealer::Aead"),
            Sealer::Plain(_) => f.write_str("Sealer::Plain"),
        }
    }
}

/// The 12-byte nonce: 11-byte big-endian counter, then 1 on the last
/// segment, else 0.
pub fn nonce(counter: u64, last: bool) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[3..11].copy_from_slice(&counter.to_be_bytes());
    n[11] = u8::from(last);
    n
}

impl Sealer {
    /// An encrypting sealer.
    pub fn aead(payload_key: &[u8; 32]) -> Sealer {
        Sealer::Aead(Box::new(ChaCha20Poly1305::new(payload_key.into())))
    }

    /// Tag length this sealer appends.
    pub fn overhead(&self) -> usize {
        match self {
            Sealer::Aead(_) => AEAD_TAG,
            Sealer::Plain(_) => PLAIN_TAG,
        }
    }

    /// Seals `data` in place (appending the tag).
    pub fn seal(&self, counter: u64, last: bool, aad: &[u8], data: &mut Vec<u8>) {
        let n = nonce(counter, last);
        match self {
            Sealer::Aead(c) => {
                let tag = c
                    .encrypt_in_place_detached(Nonce::from_slice(&n), aad, data)
                    .expect("segment sizes are far below the AEAD limit");
                data.extend_from_slice(&tag);
            }
            Sealer::Plain(k) => {
                let tag = plain_tag(k, &n, aad, data);
                data.extend_from_slice(&tag);
            }
        }
    }

    /// Opens a sealed segment in place (removing the tag).
    pub fn open(&self, counter: u64, last: bool, aad: &[u8], data: &mut Vec<u8>) -> Result<()> {
        let t = self.overhead();
        if data.len() < t {
            return Err(Error::Corrupt(format!(
                "segment {counter} is shorter than its tag"
            )));
        }
        let body = data.len() - t;
        let n = nonce(counter, last);
        match self {
            Sealer::Aead(c) => {
                let tag = *Tag::from_slice(&data[body..]);
                data.truncate(body);
                c.decrypt_in_place_detached(Nonce::from_slice(&n), aad, data, &tag)
                    .map_err(|_| Error::Auth(format!("segment {counter} does not authenticate (corrupted, reordered or from another overlay)")))
            }
            Sealer::Plain(k) => {
                let want = plain_tag(k, &n, aad, &data[..body]);
                if !constant_time_eq(&want, &data[body..]) {
                    return Err(Error::Corrupt(format!(
                        "segment {counter} fails its BLAKE3 check"
                    )));
                }
                data.truncate(body);
                Ok(())
            }
        }
    }
}

fn plain_tag(key: &[u8; 32], nonce: &[u8; 12], aad: &[u8], data: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(nonce);
    h.update(&(aad.len() as u64).to_le_bytes());
    h.update(aad);
    h.update(data);
    *h.finalize().as_bytes()
}

/// Compares without an early exit.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_detects_reorder_truncation_and_flips() {
        for s in [Sealer::aead(&[7; 32]), Sealer::Plain([7; 32])] {
            let mut a = b"segment zero".to_vec();
            s.seal(0, false, b"aad", &mut a);
            let mut ok = a.clone();
            s.open(0, false, b"aad", &mut ok).unwrap();
            assert_eq!(ok, b"segment zero");
            for (ctr, last, aad) in [
                (1, false, &b"aad"[..]),
                (0, true, b"aad"),
                (0, false, b"aae"),
            ] {
                assert!(s.open(ctr, last, aad, &mut a.clone()).is_err());
            }
            for i in 0..a.len() {
                let mut b = a.clone();
                b[i] ^= 0x10;
                assert!(s.open(0, false, b"aad", &mut b).is_err(), "flip at {i}");
            }
        }
    }
}
