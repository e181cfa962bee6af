//! `--key-file`, `--passphrase-file`, `--no-encrypt`.

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;
use kimberley_formats::crypto::keys::{Argon2Params, Secret};
use kimberley_formats::diff::Protection;

/// How an overlay is (to be) protected.
#[derive(Debug, Clone, Args)]
#[group(multiple = false)]
pub struct KeyArgs {
    /// 32-byte key file (make one with `kimberlize keygen -o FILE`).
    #[arg(long, short = 'k', value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// File holding a passphrase (one newline at its end is removed); the key
    /// is derived with Argon2id, whose parameters travel in the header.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// No encryption: segments keep BLAKE3 integrity checks but anyone can
    /// read them. Only for data that is not secret.
    #[arg(long)]
    pub no_encrypt: bool,
}

impl KeyArgs {
    /// The secret for reading (None when no key option was given).
    pub fn secret(&self) -> Result<Option<Secret>> {
        Ok(match (&self.key_file, &self.passphrase_file) {
            (Some(k), _) => Some(Secret::from_key_file(k)?),
            (_, Some(p)) => Some(Secret::from_passphrase_file(p)?),
            _ => None,
        })
    }

    /// The protection for writing: encryption is the default, so one of the
    /// three options is required.
    pub fn protection(&self) -> Result<Protection> {
        Ok(match self.secret()? {
            Some(Secret::Key(k)) => Protection::Key(k),
            Some(Secret::Passphrase(p)) => Protection::Passphrase(p, Argon2Params::DEFAULT),
            None if self.no_encrypt => Protection::None,
            None => bail!(
                "overlays are encrypted by default: give --key-file FILE (make one with `kimberlize keygen -o FILE`), --passphrase-file FILE, or --no-encrypt"
            ),
        })
    }
}
