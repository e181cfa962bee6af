//! The fixed 192-byte overlay header.

use crate::crypto::keys::{Argon2Params, KeyMaterial, OverlayKeys};
use crate::crypto::stream::constant_time_eq;
use crate::error::{Error, Result};
use crate::le::{LeError, Reader};

/// First bytes of every overlay.
pub const MAGIC: [u8; 8] = *b"KIMBOVL\0";
/// The newest format version this build reads and writes (FORMAT.md
/// section 10.5).
pub const VERSION: u16 = 2;
/// The version written when none is asked for: version 1 until version
/// 2's overhead is shown small enough to make it the default.
pub const DEFAULT_VERSION: u16 = VERSION_1;
/// The first format version: no coverage map.
pub const VERSION_1: u16 = 1;
/// The version with a coverage map after the manifest segment.
pub const VERSION_MAP: u16 = 2;
/// Encoded size of the header, MAC included.
pub const HEADER_LEN: usize = 192;
/// Bytes covered by the MAC.
pub const MAC_OFFSET: usize = 160;

/// A decoded header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// Format version: [`VERSION_1`] or [`VERSION_MAP`].
    pub version: u16,
    /// How segments are protected.
    pub protection: KeyMaterial,
    /// Names this overlay (children name it as their parent): random, or
    /// derived with the salt (FORMAT.md section 7.7).
    pub overlay_id: [u8; 16],
    /// HKDF salt (and Argon2id salt): random, or derived from everything
    /// the overlay's bytes depend on (FORMAT.md section 7.7).
    pub salt: [u8; 32],
    /// Identity of the VM this overlay applies to.
    pub base_id: [u8; 32],
    /// Identity of the VM it produces.
    pub result_id: [u8; 32],
    /// `overlay_id` of the overlay that must be applied first (zeros: none).
    pub parent_id: [u8; 16],
    /// 0 for an overlay on a base VM, parent's depth + 1 otherwise.
    pub depth: u32,
    /// The MAC as stored.
    pub mac: [u8; 32],
}

impl Header {
    /// True when the overlay has a coverage map (version 2).
    pub fn has_map(&self) -> bool {
        self.version >= VERSION_MAP
    }

    /// True when the overlay names a parent.
    pub fn has_parent(&self) -> bool {
        self.parent_id != [0; 16]
    }

    /// The 160 bytes before the MAC.
    pub fn encode_unsigned(&self) -> [u8; MAC_OFFSET] {
        let mut b = [0u8; MAC_OFFSET];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&(HEADER_LEN as u16).to_le_bytes());
        let (prot, argon) = match self.protection {
            KeyMaterial::None => (0u8, None),
            KeyMaterial::KeyFile => (1, None),
            KeyMaterial::Passphrase(p) => (2, Some(p)),
        };
        b[12] = prot;
        b[16..32].copy_from_slice(&self.overlay_id);
        b[32..64].copy_from_slice(&self.salt);
        b[64..96].copy_from_slice(&self.base_id);
        b[96..128].copy_from_slice(&self.result_id);
        b[128..144].copy_from_slice(&self.parent_id);
        if let Some(p) = argon {
            b[144..148].copy_from_slice(&p.m_cost.to_le_bytes());
            b[148..152].copy_from_slice(&p.t_cost.to_le_bytes());
            b[152..156].copy_from_slice(&p.p_cost.to_le_bytes());
        }
        b[156..160].copy_from_slice(&self.depth.to_le_bytes());
        b
    }

    /// The MAC over the first 160 bytes: keyed BLAKE3 with the header key,
    /// or plain BLAKE3 for an unencrypted overlay.
    pub fn compute_mac(unsigned: &[u8; MAC_OFFSET], keys: Option<&OverlayKeys>) -> [u8; 32] {
        match keys {
            Some(k) => *blake3::keyed_hash(&k.header, unsigned).as_bytes(),
            None => *blake3::hash(unsigned).as_bytes(),
        }
    }

    /// Encodes with the MAC computed from `keys`; stores the MAC in `self`.
    pub fn seal(&mut self, keys: Option<&OverlayKeys>) -> [u8; HEADER_LEN] {
        let unsigned = self.encode_unsigned();
        self.mac = Self::compute_mac(&unsigned, keys);
        let mut b = [0u8; HEADER_LEN];
        b[..MAC_OFFSET].copy_from_slice(&unsigned);
        b[MAC_OFFSET..].copy_from_slice(&self.mac);
        b
    }

    /// Checks the stored MAC.
    pub fn verify_mac(&self, keys: Option<&OverlayKeys>) -> Result<()> {
        let want = Self::compute_mac(&self.encode_unsigned(), keys);
        if constant_time_eq(&want, &self.mac) {
            Ok(())
        } else if keys.is_some() {
            Err(Error::Auth(
                "wrong key, or the overlay header was modified".into(),
            ))
        } else {
            Err(Error::Corrupt("header checksum mismatch".into()))
        }
    }

    /// The header's own hash (binds unencrypted segments to it).
    pub fn binding(&self) -> [u8; 32] {
        let mut h = blake3::Hasher::new_derive_key("kimberley 2026 overlay binding v1");
        h.update(&self.encode_unsigned());
        h.update(&self.mac);
        *h.finalize().as_bytes()
    }

    /// Parses a header (not checking the MAC). `bytes` is what was read;
    /// fewer than [`HEADER_LEN`] bytes means a truncated input.
    pub fn decode(bytes: &[u8]) -> Result<Header> {
        if bytes.is_empty() {
            return Err(Error::Empty);
        }
        let m = bytes.len().min(MAGIC.len());
        if bytes[..m] != MAGIC[..m] {
            return Err(Error::NotAnOverlay);
        }
        if bytes.len() < 12 {
            return Err(Error::Truncated("inside the header".into()));
        }
        // Every read below is within the lengths checked above; a failure
        // would still be reported as a truncated header, never a panic.
        let truncated = |_: LeError| Error::Truncated("inside the header".into());
        let mut c = Reader::new(bytes, "overlay header");
        c.take(MAGIC.len()).map_err(truncated)?;
        let version = c.u16().map_err(truncated)?;
        if version != VERSION_1 && version != VERSION_MAP {
            return Err(Error::Version {
                what: "overlay",
                found: version.into(),
                supported: VERSION.into(),
            });
        }
        let len = c.u16().map_err(truncated)?;
        if usize::from(len) != HEADER_LEN {
            return Err(Error::Corrupt(format!(
                "header length {len}, expected {HEADER_LEN}"
            )));
        }
        if bytes.len() < HEADER_LEN {
            return Err(Error::Truncated("inside the header".into()));
        }
        let prot = c.u8().map_err(truncated)?;
        let reserved = c.take(3).map_err(truncated)?;
        let overlay_id = c.array().map_err(truncated)?;
        let salt = c.array().map_err(truncated)?;
        let base_id = c.array().map_err(truncated)?;
        let result_id = c.array().map_err(truncated)?;
        let parent_id = c.array().map_err(truncated)?;
        let argon = Argon2Params {
            m_cost: c.u32().map_err(truncated)?,
            t_cost: c.u32().map_err(truncated)?,
            p_cost: c.u32().map_err(truncated)?,
        };
        let depth = c.u32().map_err(truncated)?;
        let mac = c.array().map_err(truncated)?;
        if reserved != [0, 0, 0] {
            return Err(Error::Corrupt("reserved header bytes are not zero".into()));
        }
        let no_argon = argon
            == Argon2Params {
                m_cost: 0,
                t_cost: 0,
                p_cost: 0,
            };
        let protection = match prot {
            0 if no_argon => KeyMaterial::None,
            1 if no_argon => KeyMaterial::KeyFile,
            2 => {
                argon.check()?;
                KeyMaterial::Passphrase(argon)
            }
            0 | 1 => {
                return Err(Error::Corrupt(
                    "Argon2 parameters on an overlay without a passphrase".into(),
                ))
            }
            p => return Err(Error::Corrupt(format!("unknown protection {p}"))),
        };
        if (parent_id == [0; 16]) != (depth == 0) {
            return Err(Error::Corrupt("parent and depth disagree".into()));
        }
        Ok(Header {
            version,
            protection,
            overlay_id,
            salt,
            base_id,
            result_id,
            parent_id,
            depth,
            mac,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::keys::derive;

    fn sample() -> Header {
        Header {
            version: VERSION,
            protection: KeyMaterial::Passphrase(Argon2Params::DEFAULT),
            overlay_id: [1; 16],
            salt: [2; 32],
            base_id: [3; 32],
            result_id: [4; 32],
            parent_id: [5; 16],
            depth: 1,
            mac: [0; 32],
        }
    }

    #[test]
    fn round_trip_and_mac() {
        let keys = derive(&[9; 32], &[2; 32]);
        let mut h = sample();
        let bytes = h.seal(Some(&keys));
        let d = Header::decode(&bytes).unwrap();
        assert_eq!(d, h);
        d.verify_mac(Some(&keys)).unwrap();
        assert!(matches!(
            d.verify_mac(Some(&derive(&[8; 32], &[2; 32]))),
            Err(Error::Auth(_))
        ));
    }

    #[test]
    fn refuses_garbage() {
        let bytes = sample().seal(None);
        assert!(matches!(Header::decode(&[]), Err(Error::Empty)));
        assert!(matches!(Header::decode(b"hello"), Err(Error::NotAnOverlay)));
        assert!(matches!(
            Header::decode(&bytes[..100]),
            Err(Error::Truncated(_))
        ));
        let mut v = bytes;
        v[8] = 3;
        assert!(matches!(
            Header::decode(&v),
            Err(Error::Version { found: 3, .. })
        ));
    }
}
