//! Key files, passphrases and key derivation.

use hkdf::Hkdf;
use sha2::Sha256;

use crate::error::{Error, Result};

/// Length of a key file.
pub const KEY_LEN: usize = 32;

/// Argon2id parameters, stored in the overlay header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Argon2Params {
    /// Memory in KiB.
    pub m_cost: u32,
    /// Passes.
    pub t_cost: u32,
    /// Lanes.
    pub p_cost: u32,
}

impl Argon2Params {
    /// What `kimberlize` uses: 64 MiB, 3 passes, 1 lane.
    pub const DEFAULT: Argon2Params = Argon2Params {
        m_cost: 64 * 1024,
        t_cost: 3,
        p_cost: 1,
    };
    /// Largest lane count a reader accepts (a structural limit of the
    /// header; the memory and pass caps are the reader's [`KdfLimits`]).
    pub const MAX_P_COST: u32 = 16;

    /// Checks the lane cap and Argon2's own minimums (part of parsing a
    /// header; the cost caps are checked by [`KdfLimits::check`]).
    pub fn check(&self) -> Result<()> {
        if self.p_cost > Self::MAX_P_COST {
            return Err(Error::Corrupt(format!(
                "Argon2 lane count {} exceeds the limit of {}",
                self.p_cost,
                Self::MAX_P_COST
            )));
        }
        if self.t_cost == 0 || self.p_cost == 0 || self.m_cost < 8 * self.p_cost {
            return Err(Error::Corrupt("Argon2 parameters are invalid".into()));
        }
        Ok(())
    }
}

/// The most Argon2id work a reader does for a header it cannot yet
/// authenticate: the header chooses the cost, so without a cap anyone could
/// make a reader allocate and compute for minutes before the MAC fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KdfLimits {
    /// Most memory, in KiB (Argon2's unit).
    pub max_memory_kib: u32,
    /// Most passes.
    pub max_passes: u32,
}

impl KdfLimits {
    /// A reader's caps unless the user raises them: 256 MiB and 10 passes
    /// (4 and 3.3 times what `kimberlize` writes, [`Argon2Params::DEFAULT`]).
    pub const DEFAULT: KdfLimits = KdfLimits {
        max_memory_kib: 256 * 1024,
        max_passes: 10,
    };

    /// Refuses parameters over these caps, naming the flag that raises
    /// each one. Called before any Argon2 allocation or work.
    pub fn check(&self, p: &Argon2Params) -> Result<()> {
        let mut over = Vec::new();
        if p.m_cost > self.max_memory_kib {
            over.push(format!(
                "{} of memory (limit {}; raise it with --max-kdf-memory)",
                kib(p.m_cost),
                kib(self.max_memory_kib)
            ));
        }
        if p.t_cost > self.max_passes {
            over.push(format!(
                "{} passes (limit {}; raise it with --max-kdf-passes)",
                p.t_cost, self.max_passes
            ));
        }
        if over.is_empty() {
            return Ok(());
        }
        Err(Error::Corrupt(format!(
            "the header asks Argon2id for {}, over this reader's limits; refused before deriving any key (raise a limit only for an overlay from a source you trust)",
            over.join(" and ")
        )))
    }
}

impl Default for KdfLimits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// `n` KiB, in the largest binary unit that divides it.
fn kib(n: u32) -> String {
    match n {
        _ if n >= 1 << 20 && n.is_multiple_of(1 << 20) => format!("{} GiB", n >> 20),
        _ if n >= 1 << 10 && n.is_multiple_of(1 << 10) => format!("{} MiB", n >> 10),
        _ => format!("{n} KiB"),
    }
}

/// A secret the user holds.
#[derive(Clone)]
pub enum Secret {
    /// 32 bytes from a key file.
    Key([u8; KEY_LEN]),
    /// A passphrase (bytes of the passphrase file, one trailing newline removed).
    Passphrase(Vec<u8>),
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Key(_) => f.write_str("Secret::Key(..)"),
            Secret::Passphrase(_) => f.write_str("Secret::Passphrase(..)"),
        }
    }
}

/// Fills a buffer with random bytes.
pub fn random<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    getrandom::fill(&mut b).map_err(|e| Error::Key(format!("no randomness: {e}")))?;
    Ok(b)
}

/// BLAKE3 context of the key that derives an overlay's salt and id from
/// its content (FORMAT.md section 7.7).
const SALT_CONTEXT: &str = "kimberley 2026 overlay salt v1";

/// The `salt` and `overlay_id` a writer derives for a reproducible
/// overlay: the first 48 bytes of BLAKE3-keyed(salt_key, transcript) where
/// salt_key = BLAKE3-derive-key([`SALT_CONTEXT`], key file bytes), or over
/// no key material for an unencrypted overlay (`user_key` None).
///
/// `transcript` must commit to everything that determines the overlay's
/// bytes (see [`crate::diff::salt_transcript`]): then equal salts under
/// one key mean equal segment plaintexts, and no (payload key, nonce) pair
/// ever seals two different plaintexts. Not for passphrases: the salt is
/// public and Argon2id needs it, so a salt keyed by a fast function of
/// the passphrase would let anyone test guesses without running Argon2id.
pub fn derived_salt(user_key: Option<&[u8; KEY_LEN]>, transcript: &[u8]) -> ([u8; 32], [u8; 16]) {
    let salt_key = blake3::derive_key(SALT_CONTEXT, user_key.map_or(&[][..], |k| &k[..]));
    let mut h = blake3::Hasher::new_keyed(&salt_key);
    h.update(transcript);
    let mut out = [0u8; 48];
    h.finalize_xof().fill(&mut out);
    let mut salt = [0u8; 32];
    let mut id = [0u8; 16];
    salt.copy_from_slice(&out[..32]);
    id.copy_from_slice(&out[32..]);
    (salt, id)
}

/// How an overlay is protected, as stored in its header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyMaterial {
    /// `--no-encrypt`: BLAKE3 integrity only.
    None,
    /// A 32-byte key file.
    KeyFile,
    /// A passphrase through Argon2id.
    Passphrase(Argon2Params),
}

/// The keys of one overlay.
#[derive(Clone)]
pub struct OverlayKeys {
    /// Keys the header MAC (keyed BLAKE3).
    pub header: [u8; 32],
    /// ChaCha20-Poly1305 key for segments.
    pub payload: [u8; 32],
    /// Keys the VM identities stored in the header (see [`commit_id`]).
    pub ident: [u8; 32],
}

/// The form in which a VM identity is stored in an overlay header: keyed
/// BLAKE3 under the identity key for an encrypted overlay (so headers do
/// not reveal which VMs they involve), the identity itself otherwise.
pub fn commit_id(keys: Option<&OverlayKeys>, id: &[u8; 32]) -> [u8; 32] {
    match keys {
        Some(k) => *blake3::keyed_hash(&k.ident, id).as_bytes(),
        None => *id,
    }
}

impl std::fmt::Debug for OverlayKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OverlayKeys(..)")
    }
}

/// The user key: the key file's key, or Argon2id(passphrase, salt).
pub fn user_key(secret: &Secret, material: KeyMaterial, salt: &[u8; 32]) -> Result<[u8; 32]> {
    match (material, secret) {
        (KeyMaterial::KeyFile, Secret::Key(k)) => Ok(*k),
        (KeyMaterial::Passphrase(p), Secret::Passphrase(pw)) => {
            p.check()?;
            let params = argon2::Params::new(p.m_cost, p.t_cost, p.p_cost, Some(32))
                .map_err(|e| Error::Corrupt(format!("Argon2 parameters: {e}")))?;
            let a =
                argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
            let mut out = [0u8; 32];
            a.hash_password_into(pw, salt, &mut out)
                .map_err(|e| Error::Key(format!("Argon2id failed: {e}")))?;
            Ok(out)
        }
        (KeyMaterial::KeyFile, Secret::Passphrase(_)) => Err(Error::Key(
            "this overlay is encrypted with a key file; use --key-file".into(),
        )),
        (KeyMaterial::Passphrase(_), Secret::Key(_)) => Err(Error::Key(
            "this overlay is encrypted with a passphrase; use --passphrase-file".into(),
        )),
        (KeyMaterial::None, _) => Err(Error::Invalid("no key for an unencrypted overlay".into())),
    }
}

/// Derives the header and payload keys: HKDF-SHA256(ikm = user key, salt).
pub fn derive(user_key: &[u8; 32], salt: &[u8; 32]) -> OverlayKeys {
    let hk = Hkdf::<Sha256>::new(Some(salt), user_key);
    let mut header = [0u8; 32];
    let mut payload = [0u8; 32];
    let mut ident = [0u8; 32];
    hk.expand(b"kimberley overlay v1 header", &mut header)
        .expect("32 bytes is a valid HKDF length");
    hk.expand(b"kimberley overlay v1 payload", &mut payload)
        .expect("32 bytes is a valid HKDF length");
    hk.expand(b"kimberley overlay v1 identity", &mut ident)
        .expect("32 bytes is a valid HKDF length");
    OverlayKeys {
        header,
        payload,
        ident,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_salts_repeat_only_with_key_and_transcript() {
        let (s, id) = derived_salt(Some(&[1; 32]), b"transcript");
        assert_eq!(derived_salt(Some(&[1; 32]), b"transcript"), (s, id));
        let others = [
            derived_salt(Some(&[2; 32]), b"transcript"),
            derived_salt(Some(&[1; 32]), b"transcripT"),
            derived_salt(None, b"transcript"),
            // No key is not the all-zero key.
            derived_salt(Some(&[0; 32]), b"transcript"),
        ];
        for (i, (s2, id2)) in others.iter().enumerate() {
            assert_ne!(*s2, s, "variant {i}");
            assert_ne!(*id2, id, "variant {i}");
        }
        assert_ne!(derived_salt(None, b"t"), derived_salt(Some(&[0; 32]), b"t"));
        // The id is not a piece of the salt.
        assert!(!s.windows(16).any(|w| w == id));
    }
}
