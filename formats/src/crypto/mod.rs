//! Keys and segment protection.
//!
//! [`keyfile`] encodes and parses key files; [`keys`] turns a key file or
//! passphrase into the overlay's keys (HKDF over a per-overlay salt,
//! Argon2id for passphrases) and derives reproducible salts
//! ([`keys::derived_salt`]); [`stream`] seals and opens
//! segments with the STREAM construction (ChaCha20-Poly1305, nonce = segment
//! counter + last-segment flag) or, with `--no-encrypt`, BLAKE3 integrity.
//! A reader derives keys only through [`reader_keys`], under a
//! [`ReadPolicy`].

pub mod keyfile;
pub mod keys;
pub mod stream;

pub use keys::{Argon2Params, KdfLimits, KeyMaterial, OverlayKeys, Secret};
pub use stream::Sealer;

use crate::error::{Error, Result};
use crate::overlay::header::Header;

/// What a reader accepts from an overlay header, besides the secret it
/// holds. The default is the safe one: with a secret, only overlays sealed
/// with it; Argon2id within [`KdfLimits::DEFAULT`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadPolicy {
    /// Accept an unencrypted overlay although a secret was given
    /// (`--allow-unencrypted`). Without a secret, unencrypted overlays are
    /// always accepted (integrity only).
    pub allow_unencrypted: bool,
    /// Caps on the Argon2id cost a header may ask for.
    pub kdf: KdfLimits,
}

/// Derives the keys to read an overlay with `header` (None for an
/// unencrypted overlay), enforcing `policy` before any key derivation:
///
/// - a secret was given but the header says unencrypted: refused
///   ([`Error::Auth`]) unless `policy.allow_unencrypted`, since anyone who
///   knows the base can write such an overlay, or flip the protection byte
///   of a sealed one;
/// - an encrypted header and no secret: [`Error::Usage`] (a missing option);
/// - Argon2id parameters over `policy.kdf`: refused before Argon2 runs.
pub fn reader_keys(
    header: &Header,
    secret: Option<&Secret>,
    policy: &ReadPolicy,
) -> Result<Option<OverlayKeys>> {
    match (header.protection, secret) {
        (KeyMaterial::None, Some(s)) if !policy.allow_unencrypted => {
            let what = match s {
                Secret::Key(_) => "key file",
                Secret::Passphrase(_) => "passphrase",
            };
            Err(Error::Auth(format!(
                "the overlay is not encrypted, so the {what} given cannot authenticate it (anyone who knows its base could have written it); add --allow-unencrypted to accept it with integrity checks only"
            )))
        }
        (KeyMaterial::None, _) => Ok(None),
        (_, None) => Err(Error::Usage(
            "this overlay is encrypted: give --key-file or --passphrase-file".into(),
        )),
        (m, Some(s)) => {
            if let (KeyMaterial::Passphrase(p), Secret::Passphrase(_)) = (m, s) {
                policy.kdf.check(&p)?;
            }
            let uk = keys::user_key(s, m, &header.salt)?;
            Ok(Some(keys::derive(&uk, &header.salt)))
        }
    }
}

/// Derives the keys for a header this process is writing, from the secret
/// it was made with (None for an unencrypted overlay). No reader limits:
/// the writer chose the parameters.
pub fn writer_keys(header: &Header, secret: Option<&Secret>) -> Result<Option<OverlayKeys>> {
    match (header.protection, secret) {
        (KeyMaterial::None, _) => Ok(None),
        (_, None) => Err(Error::Invalid(
            "an encrypted header needs the secret it is written with".into(),
        )),
        (m, Some(s)) => {
            let uk = keys::user_key(s, m, &header.salt)?;
            Ok(Some(keys::derive(&uk, &header.salt)))
        }
    }
}

/// The segment sealer for a header whose MAC is set.
pub fn sealer_for(header: &Header, keys: Option<&OverlayKeys>) -> Sealer {
    match keys {
        Some(k) => Sealer::aead(&k.payload),
        None => Sealer::Plain(header.binding()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(protection: KeyMaterial) -> Header {
        Header {
            version: crate::overlay::header::VERSION,
            protection,
            overlay_id: [1; 16],
            salt: [2; 32],
            base_id: [3; 32],
            result_id: [4; 32],
            parent_id: [0; 16],
            depth: 0,
            mac: [0; 32],
        }
    }

    #[test]
    fn a_secret_requires_a_sealed_overlay_unless_allowed() {
        let h = header(KeyMaterial::None);
        let strict = ReadPolicy::default();
        let lax = ReadPolicy {
            allow_unencrypted: true,
            ..strict
        };
        for s in [Secret::Key([7; 32]), Secret::Passphrase(b"pw".to_vec())] {
            let e = reader_keys(&h, Some(&s), &strict).unwrap_err();
            assert!(matches!(e, Error::Auth(_)), "{e:?}");
            assert_eq!(e.exit_code(), 4);
            assert!(e.to_string().contains("--allow-unencrypted"), "{e}");
            assert!(reader_keys(&h, Some(&s), &lax).unwrap().is_none());
        }
        assert!(reader_keys(&h, None, &strict).unwrap().is_none());
        let sealed = header(KeyMaterial::KeyFile);
        assert!(reader_keys(&sealed, Some(&Secret::Key([7; 32])), &strict)
            .unwrap()
            .is_some());
        assert!(matches!(
            reader_keys(&sealed, None, &lax),
            Err(Error::Usage(_))
        ));
    }

    #[test]
    fn kdf_caps_are_checked_before_argon2_and_can_be_raised() {
        let pw = Secret::Passphrase(b"pw".to_vec());
        // 1 GiB and 64 passes: Argon2id would run for minutes.
        let evil = Argon2Params {
            m_cost: 1 << 20,
            t_cost: 64,
            p_cost: 1,
        };
        let h = header(KeyMaterial::Passphrase(evil));
        let t0 = std::time::Instant::now();
        let e = reader_keys(&h, Some(&pw), &ReadPolicy::default()).unwrap_err();
        assert!(t0.elapsed() < std::time::Duration::from_secs(1));
        let msg = e.to_string();
        assert_eq!(e.exit_code(), 3, "{msg}");
        for needle in [
            "1 GiB",
            "256 MiB",
            "64 passes",
            "--max-kdf-memory",
            "--max-kdf-passes",
        ] {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
        // The caps are pure checks: a raised cap admits the same header.
        let raised = KdfLimits {
            max_memory_kib: 1 << 20,
            max_passes: 64,
        };
        raised.check(&evil).unwrap();
        // Only the exceeded cap is named.
        let e = KdfLimits::DEFAULT
            .check(&Argon2Params {
                m_cost: 64,
                t_cost: 11,
                p_cost: 1,
            })
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--max-kdf-passes") && !e.contains("--max-kdf-memory"),
            "{e}"
        );
        // A key file for a passphrase overlay is a key error, whatever the cost.
        assert!(matches!(
            reader_keys(&h, Some(&Secret::Key([7; 32])), &ReadPolicy::default()),
            Err(Error::Key(_))
        ));
    }

    #[test]
    fn what_kimberlize_writes_is_within_the_default_caps() {
        KdfLimits::DEFAULT.check(&Argon2Params::DEFAULT).unwrap();
        assert_eq!(KdfLimits::default(), KdfLimits::DEFAULT);
        assert_eq!(KdfLimits::DEFAULT.max_memory_kib, 256 * 1024);
        assert_eq!(KdfLimits::DEFAULT.max_passes, 10);
    }
}
