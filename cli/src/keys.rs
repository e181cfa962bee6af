//! Key options and reading secrets (files, stdin, the terminal); what a reader accepts (`--allow-unencrypted`, KDF caps).

use std::io::{IsTerminal, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use kimberley_formats::crypto::keyfile;
use kimberley_formats::crypto::keys::{Argon2Params, KdfLimits, Secret, KEY_LEN};
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::diff::Protection;

/// How an overlay is (to be) protected.
#[derive(Debug, Clone, Args)]
#[group(multiple = false)]
pub struct KeyArgs {
    /// Key file ("-" for stdin): the one-line KIMBERLEY-KEY-1… text form
    /// that `kimberlize keygen` writes, or 32 raw bytes.
    #[arg(long, short = 'k', value_name = "FILE")]
    pub key_file: Option<PathBuf>,
    /// File holding a passphrase (one newline at its end is removed); the key
    /// is derived with Argon2id, whose parameters travel in the header. "-"
    /// reads stdin, or asks on the terminal when stdin is one.
    #[arg(long, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
    /// Ask for the passphrase on the terminal without echo (twice when
    /// making an overlay).
    #[arg(long)]
    pub passphrase: bool,
    /// No encryption: segments keep BLAKE3 integrity checks but anyone can
    /// read them. Only for data that is not secret.
    #[arg(long)]
    pub no_encrypt: bool,
}

impl KeyArgs {
    /// The secret for reading (None when no key option was given). A
    /// passphrase asked on the terminal is asked once.
    pub fn secret(&self) -> Result<Option<Secret>> {
        self.load(false)
    }

    /// True when a key or passphrase is read from stdin (`-`) rather than
    /// a file or the terminal: stdin then cannot also carry an overlay.
    pub fn reads_stdin(&self) -> bool {
        let dash = |p: &Option<PathBuf>| p.as_deref() == Some(Path::new("-"));
        dash(&self.key_file) || (dash(&self.passphrase_file) && !std::io::stdin().is_terminal())
    }

    /// Refuses (usage error) reading both the secret and an overlay from
    /// stdin.
    pub fn check_stdin(&self, overlay_from_stdin: bool) -> Result<()> {
        if overlay_from_stdin && self.reads_stdin() {
            return Err(crate::run::usage(
                "stdin cannot carry both the key or passphrase and the overlay: give the overlay with -i FILE",
            ));
        }
        Ok(())
    }

    fn load(&self, sealing: bool) -> Result<Option<Secret>> {
        Ok(if let Some(k) = &self.key_file {
            Some(Secret::Key(read_key_file(k)?))
        } else if let Some(p) = &self.passphrase_file {
            Some(Secret::Passphrase(read_passphrase_file(p, sealing)?))
        } else if self.passphrase {
            Some(Secret::Passphrase(prompt_passphrase(sealing)?))
        } else {
            None
        })
    }

    /// The protection for writing: encryption is the default, so one of the
    /// options is required. A passphrase asked on the terminal is asked
    /// twice.
    pub fn protection(&self) -> Result<Protection> {
        Ok(match self.load(true)? {
            Some(Secret::Key(k)) => Protection::Key(k),
            Some(Secret::Passphrase(p)) => Protection::Passphrase(p, Argon2Params::DEFAULT),
            None if self.no_encrypt => Protection::None,
            None => {
                return Err(crate::run::usage(
                    "overlays are encrypted by default: give --key-file FILE (make one with `kimberlize keygen -o FILE`), --passphrase-file FILE, --passphrase, or --no-encrypt",
                ))
            }
        })
    }
}

/// The secret that `protection` seals with, for reading what it sealed
/// (parent overlays) without asking or reading again.
pub fn secret_of(protection: &Protection) -> Option<Secret> {
    match protection {
        Protection::None => None,
        Protection::Key(k) => Some(Secret::Key(*k)),
        Protection::Passphrase(p, _) => Some(Secret::Passphrase(p.clone())),
    }
}

/// Most bytes read from a key or passphrase file: a key file is at most 75.
const SECRET_FILE_MAX: u64 = 64 << 10;

/// Reads a secret file ("-": stdin), warning when others may read or write
/// it. Returns its name for messages and its bytes.
fn read_secret(path: &Path, what: &str) -> Result<(String, Vec<u8>)> {
    let mut bytes = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .lock()
            .take(SECRET_FILE_MAX + 1)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading the {what} from stdin"))?;
        return Ok(("stdin".into(), bytes));
    }
    let name = path.display().to_string();
    let f = std::fs::File::open(path).with_context(|| format!("opening {what} {name}"))?;
    let meta = f
        .metadata()
        .with_context(|| format!("reading {what} {name}"))?;
    if let Some(w) = exposure_warning(what, &name, &meta) {
        eprintln!("{w}");
    }
    f.take(SECRET_FILE_MAX + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading {what} {name}"))?;
    Ok((name, bytes))
}

/// The `warning:` line for a regular secret file that its group or others
/// may read or write (pipes and devices are not files at rest).
fn exposure_warning(what: &str, name: &str, meta: &std::fs::Metadata) -> Option<String> {
    let mode = meta.permissions().mode() & 0o777;
    (meta.is_file() && mode & 0o066 != 0).then(|| {
        format!(
            "warning: {what} {name} is readable or writable by group or others (mode {mode:04o}); make it private with `chmod 600 {name}`"
        )
    })
}

/// Reads a key file ("-": stdin) in either form of docs/FORMAT.md "Key
/// files"; anything else is a usage error naming the file.
pub fn read_key_file(path: &Path) -> Result<[u8; KEY_LEN]> {
    let (name, bytes) = read_secret(path, "key file")?;
    if bytes.len() as u64 > SECRET_FILE_MAX {
        return Err(crate::run::usage(format!(
            "key file {name}: not a key file: longer than {} KiB",
            SECRET_FILE_MAX >> 10
        )));
    }
    keyfile::parse(&bytes).map_err(|e| {
        crate::run::usage(format!(
            "key file {name}: {e} (make one with `kimberlize keygen -o FILE`)"
        ))
    })
}

/// Reads a passphrase file ("-": stdin, or the terminal when stdin is
/// one); one trailing newline is removed.
pub fn read_passphrase_file(path: &Path, sealing: bool) -> Result<Vec<u8>> {
    if path == Path::new("-") && std::io::stdin().is_terminal() {
        return prompt_passphrase(sealing);
    }
    let (name, mut bytes) = read_secret(path, "passphrase file")?;
    if bytes.len() as u64 > SECRET_FILE_MAX {
        return Err(crate::run::usage(format!(
            "passphrase file {name} is longer than {} KiB",
            SECRET_FILE_MAX >> 10
        )));
    }
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    if bytes.is_empty() {
        return Err(crate::run::usage(format!(
            "passphrase file {name} holds an empty passphrase"
        )));
    }
    Ok(bytes)
}

/// Asks for a passphrase on the controlling terminal without echo; when
/// `sealing`, asks again and requires the same answer. Only when stdin or
/// stderr is a terminal (a user is there to answer): otherwise a usage
/// error, never a wait for input nobody sees asked for.
pub fn prompt_passphrase(sealing: bool) -> Result<Vec<u8>> {
    if !std::io::stdin().is_terminal() && !std::io::stderr().is_terminal() {
        return Err(crate::run::usage(
            "cannot ask for a passphrase: neither stdin nor stderr is a terminal; use --passphrase-file FILE",
        ));
    }
    let ask = |prompt: &str| -> Result<String> {
        rpassword::prompt_password(prompt).map_err(|e| {
            crate::run::usage(format!(
                "cannot ask for a passphrase without a terminal ({e}): use --passphrase-file FILE"
            ))
        })
    };
    let first = ask("passphrase: ")?;
    if first.is_empty() {
        return Err(crate::run::usage("empty passphrase"));
    }
    if sealing && ask("passphrase (again): ")? != first {
        return Err(crate::run::usage("the passphrases differ"));
    }
    Ok(first.into_bytes())
}

/// `kimberlize keygen -o PATH`: a new random key in the text form. `-`
/// prints it on stdout, terminal or not: the text form exists to be copied
/// (into a secret store, a mail, another host's file), as `age-keygen` does.
pub fn keygen(path: &Path) -> Result<()> {
    let key = kimberley_formats::crypto::keys::random::<KEY_LEN>()?;
    let line = format!("{}\n", keyfile::encode(&key));
    crate::output::write_file(path, line.as_bytes(), false)
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
