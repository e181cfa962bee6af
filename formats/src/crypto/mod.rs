//! Keys and segment protection.
//!
//! [`keys`] turns a key file or passphrase into the overlay's keys (HKDF over
//! a per-overlay salt, Argon2id for passphrases); [`stream`] seals and opens
//! segments with the STREAM construction (ChaCha20-Poly1305, nonce = segment
//! counter + last-segment flag) or, with `--no-encrypt`, BLAKE3 integrity.

pub mod keys;
pub mod stream;

pub use keys::{Argon2Params, KeyMaterial, OverlayKeys, Secret};
pub use stream::Sealer;

use crate::error::Result;
use crate::overlay::header::Header;

/// Derives the keys for `header` (None for an unencrypted overlay).
pub fn overlay_keys(header: &Header, secret: Option<&Secret>) -> Result<Option<OverlayKeys>> {
    match header.protection {
        KeyMaterial::None => Ok(None),
        m => {
            let secret = secret.ok_or_else(|| {
                crate::Error::Key(
                    "this overlay is encrypted: give --key-file or --passphrase-file".into(),
                )
            })?;
            let uk = keys::user_key(secret, m, &header.salt)?;
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
