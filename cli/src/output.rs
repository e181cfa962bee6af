//! Outputs and inputs named on the command line: `-` for stdout/stdin,
//! streams written in place, files written atomically.

use std::fs::{File, OpenOptions};
use std::io::{self, IsTerminal, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use anyhow::{Context, Result};
use kimberley_formats::fsutil::AtomicFile;
use kimberley_formats::Error as FormatError;

/// An output file named on the command line (`-o`, `--stats-json`,
/// `keygen -o`):
///
/// - `-`: standard output;
/// - `/dev/stdout`, `/dev/stderr`, `/dev/fd/N`, `/proc/self/fd/N`: that
///   open descriptor (a shell's `>(cmd)`), written where it stands;
/// - an existing FIFO or character device (`/dev/null`, also behind a
///   symbolic link): opened and written in place, never replaced;
/// - anything else: a new file written under a temporary name, private
///   (0600), renamed into place at [`Output::commit`]; what is there is
///   refused (exit 6) unless `force`, which replaces a regular file (or a
///   symbolic link) and nothing else.
///
/// Streams are not atomic: an interrupted run leaves what it wrote.
pub struct Output {
    target: Target,
    name: String,
}

enum Target {
    Atomic(AtomicFile),
    Stream(File),
}

/// The descriptor a path names without opening anything new, if it does.
fn descriptor_path(path: &Path) -> Option<i32> {
    let s = path.to_str()?;
    match s {
        "/dev/stdout" => return Some(1),
        "/dev/stderr" => return Some(2),
        _ => {}
    }
    let n = s
        .strip_prefix("/dev/fd/")
        .or_else(|| s.strip_prefix("/proc/self/fd/"))?;
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    n.parse().ok()
}

impl Output {
    /// Opens the output `path` (see the type's documentation).
    pub fn create(path: &Path, force: bool) -> Result<Output> {
        let name = path.display().to_string();
        if path == Path::new("-") {
            let fd = io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating standard output")?;
            return Ok(Output {
                target: Target::Stream(File::from(fd)),
                name: "stdout".into(),
            });
        }
        if let Some(fd) = descriptor_path(path) {
            let owned = kimberley_formats::sys::file::dup(fd)
                .with_context(|| format!("{name}: descriptor {fd} is not open"))?;
            return Ok(Output {
                target: Target::Stream(File::from(owned)),
                name,
            });
        }
        // `stat`, following links: a link to /dev/null is a stream too.
        if let Ok(m) = std::fs::metadata(path) {
            let t = m.file_type();
            if t.is_fifo() || t.is_char_device() {
                return Ok(Output {
                    target: Target::Stream(open_stream(path)?),
                    name,
                });
            }
            if force && !t.is_file() {
                let what = if t.is_dir() {
                    "a directory"
                } else if t.is_block_device() {
                    "a block device"
                } else {
                    "not a regular file"
                };
                return Err(
                    anyhow::Error::new(FormatError::Exists(path.to_path_buf())).context(format!(
                        "{name} is {what}; --force replaces regular files only"
                    )),
                );
            }
        }
        Ok(Output {
            target: Target::Atomic(AtomicFile::create(path, force)?),
            name,
        })
    }

    /// Like [`Output::create`] with `None` as stdout, for an overlay:
    /// refuses a terminal (usage error).
    pub fn binary(path: Option<&Path>, force: bool) -> Result<Output> {
        let o = Output::create(path.unwrap_or(Path::new("-")), force)?;
        if o.is_terminal() {
            return Err(crate::run::usage(format!(
                "refusing to write an overlay to a terminal ({}): use -o FILE, or pipe it into a command",
                o.name
            )));
        }
        Ok(o)
    }

    /// What to call it in messages (`stdout` for `-`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// True for a stream that is a terminal.
    pub fn is_terminal(&self) -> bool {
        matches!(&self.target, Target::Stream(f) if f.is_terminal())
    }

    /// The open file (the temporary file, or the stream).
    pub fn file(&self) -> &File {
        match &self.target {
            Target::Atomic(a) => a.file(),
            Target::Stream(f) => f,
        }
    }

    /// A buffered writer of its own.
    pub fn writer(&self) -> Result<Box<dyn Write + Send>> {
        let f = self
            .file()
            .try_clone()
            .context("duplicating the output handle")?;
        Ok(Box::new(io::BufWriter::with_capacity(1 << 20, f)))
    }

    /// Writes all of `bytes`.
    pub fn write_all(&self, bytes: &[u8]) -> Result<()> {
        let mut f = self.file();
        f.write_all(bytes)
            .with_context(|| format!("writing {}", self.name))
    }

    /// Makes a file durable and visible under its name; a stream has
    /// nothing more to do.
    pub fn commit(self) -> Result<()> {
        match self.target {
            Target::Atomic(f) => Ok(f.commit()?),
            Target::Stream(_) => Ok(()),
        }
    }
}

/// Opens an existing FIFO or character device for writing, in place (no
/// creation, no truncation; a FIFO waits for its reader), and checks on the
/// descriptor that it still is one.
fn open_stream(path: &Path) -> Result<File> {
    let f = OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let t = f
        .metadata()
        .with_context(|| format!("checking {}", path.display()))?
        .file_type();
    if !(t.is_fifo() || t.is_char_device()) {
        anyhow::bail!(
            "{} changed while it was opened (no longer a FIFO or device)",
            path.display()
        );
    }
    Ok(f)
}

/// Opens an input: a file, or stdin for `-`.
pub fn open_input(path: &Path) -> Result<(String, Box<dyn io::Read + Send>)> {
    if path == Path::new("-") {
        Ok(("stdin".into(), Box::new(io::stdin())))
    } else {
        let f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        Ok((
            path.display().to_string(),
            Box::new(io::BufReader::with_capacity(1 << 20, f)),
        ))
    }
}

/// Opens overlays named on the command line (`-`: stdin), in order, as
/// inputs to apply.
pub fn open_overlays(paths: &[std::path::PathBuf]) -> Result<Vec<kimberley_formats::apply::Input>> {
    paths
        .iter()
        .map(|p| {
            let (name, reader) = open_input(p)?;
            Ok(kimberley_formats::apply::Input { name, reader })
        })
        .collect()
}

/// Writes `bytes` as the whole output `path` (see [`Output::create`]:
/// `-` is stdout, streams are written in place; `force` replaces a regular
/// file).
pub fn write_file(path: &Path, bytes: &[u8], force: bool) -> Result<()> {
    let out = Output::create(path, force)?;
    out.write_all(bytes)?;
    out.commit()
}

/// Writes `value` as pretty JSON to `path` (`-`: stdout), replacing a
/// regular file that is there.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut v = serde_json::to_vec_pretty(value)?;
    v.push(b'\n');
    write_file(path, &v, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptor_paths() {
        for (p, fd) in [
            ("/dev/stdout", Some(1)),
            ("/dev/stderr", Some(2)),
            ("/dev/fd/63", Some(63)),
            ("/proc/self/fd/5", Some(5)),
            ("/dev/fd/", None),
            ("/dev/fd/1x", None),
            ("/dev/null", None),
            ("out.ovl", None),
        ] {
            assert_eq!(descriptor_path(Path::new(p)), fd, "{p}");
        }
    }
}
