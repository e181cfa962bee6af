//! `--key-file`, `--passphrase-file`, `--no-encrypt`, and what a reader
//! accepts: `--allow-unencrypted`, `--max-kdf-memory`, `--max-kdf-passes`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use kimberley_formats::crypto::keys::{Argon2Params, KdfLimits, Secret};
use kimberley_formats::crypto::ReadPolicy;
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
            None => return Err(crate::run::usage(
                "overlays are encrypted by default: give --key-file FILE (make one with `kimberlize keygen -o FILE`), --passphrase-file FILE, or --no-encrypt"
            )),
        })
    }
}

/// What a reader of overlays accepts (flattened next to [`KeyArgs`] in
/// every command that reads overlays).
#[derive(Debug, Clone, Args)]
pub struct ReadArgs {
    /// Accept an unencrypted overlay (made with --no-encrypt) although a key
    /// or passphrase is given. Such an overlay is checked for integrity only:
    /// anyone who knows the base could have written it. Without this, it is
    /// refused (exit 4) whenever a key or passphrase is given.
    #[arg(long)]
    pub allow_unencrypted: bool,
    /// Most memory Argon2id may use for a passphrase overlay. The header
    /// chooses the cost before anything can be authenticated, so a header
    /// asking for more is refused before any key derivation; raise this only
    /// for an overlay from a source you trust.
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = kdf_memory)]
    pub max_kdf_memory: u32,
    /// Most Argon2id passes for a passphrase overlay (see --max-kdf-memory).
    #[arg(long, value_name = "N", default_value_t = KdfLimits::DEFAULT.max_passes,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_kdf_passes: u32,
}

impl ReadArgs {
    /// The library's reader policy.
    pub fn policy(&self) -> ReadPolicy {
        ReadPolicy {
            allow_unencrypted: self.allow_unencrypted,
            kdf: KdfLimits {
                max_memory_kib: self.max_kdf_memory,
                max_passes: self.max_kdf_passes,
            },
        }
    }
}

/// Parses `--max-kdf-memory`: a size (e.g. 256M, 1G) in whole KiB, as KiB.
fn kdf_memory(s: &str) -> Result<u32, String> {
    let bytes = crate::run::parse_size(s)?;
    if bytes < 1024 || !bytes.is_multiple_of(1024) {
        return Err(format!(
            "{s:?} is not a whole number of KiB (e.g. 256M, 1G)"
        ));
    }
    u32::try_from(bytes / 1024).map_err(|_| format!("{s:?} is more than Argon2id can use"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct T {
        #[command(flatten)]
        read: ReadArgs,
    }

    #[test]
    fn defaults_are_the_library_caps() {
        let t = T::try_parse_from(["t"]).unwrap();
        assert_eq!(t.read.policy(), ReadPolicy::default());
        assert!(!t.read.policy().allow_unencrypted);
    }

    #[test]
    fn flags_set_the_policy() {
        let t = T::try_parse_from([
            "t",
            "--allow-unencrypted",
            "--max-kdf-memory",
            "1G",
            "--max-kdf-passes",
            "64",
        ])
        .unwrap();
        let p = t.read.policy();
        assert!(p.allow_unencrypted);
        assert_eq!(p.kdf.max_memory_kib, 1 << 20);
        assert_eq!(p.kdf.max_passes, 64);
        for bad in [
            ["--max-kdf-memory", "1000"],
            ["--max-kdf-memory", "8T"],
            ["--max-kdf-passes", "0"],
        ] {
            assert!(T::try_parse_from(["t", bad[0], bad[1]]).is_err(), "{bad:?}");
        }
    }
}
