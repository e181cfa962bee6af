//! Output streams and files.

use std::fs::File;
use std::io::{self, IsTerminal, Write};
use std::path::Path;

use anyhow::{bail, Context, Result};
use kimberley_formats::fsutil::AtomicFile;

/// Where an overlay goes: a file written atomically, or stdout.
pub enum OverlayOut {
    /// `-o FILE`.
    File(AtomicFile),
    /// stdout (no `-o`, or `-o -`).
    Stdout,
}

impl OverlayOut {
    /// Opens the destination. Refuses to write binary to a terminal.
    pub fn open(path: Option<&Path>, overwrite: bool) -> Result<OverlayOut> {
        match path {
            Some(p) if p != Path::new("-") => {
                Ok(OverlayOut::File(AtomicFile::create(p, overwrite)?))
            }
            _ => {
                if io::stdout().is_terminal() {
                    bail!("refusing to write an overlay to a terminal: use -o FILE, or pipe it into a command");
                }
                Ok(OverlayOut::Stdout)
            }
        }
    }

    /// A writer for the pipeline.
    pub fn writer(&self) -> Result<Box<dyn Write + Send>> {
        Ok(match self {
            OverlayOut::File(f) => Box::new(io::BufWriter::with_capacity(
                1 << 20,
                f.file()
                    .try_clone()
                    .context("duplicating the output handle")?,
            )),
            OverlayOut::Stdout => Box::new(io::BufWriter::with_capacity(1 << 20, io::stdout())),
        })
    }

    /// Makes a file output durable and visible under its name.
    pub fn commit(self) -> Result<()> {
        match self {
            OverlayOut::File(f) => Ok(f.commit()?),
            OverlayOut::Stdout => Ok(()),
        }
    }
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

/// Writes `value` as pretty JSON to `path`, atomically.
pub fn write_json<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let f = AtomicFile::create(path, true)?;
    let mut v = serde_json::to_vec_pretty(value)?;
    v.push(b'\n');
    std::os::unix::fs::FileExt::write_all_at(f.file(), &v, 0)
        .with_context(|| format!("writing {}", path.display()))?;
    f.commit()?;
    Ok(())
}
