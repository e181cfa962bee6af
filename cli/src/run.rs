//! `main` for every binary: SIGINT/SIGTERM cleanup, errors printed as a
//! chain, documented exit codes, sizes in human units.

use std::process::ExitCode;

use kimberley_formats::Error as FormatError;

use crate::exit;

/// `-q` handling.
pub type Quiet = bool;

/// How the process is named in the interruption message: the program and
/// its subcommand, if the first argument is one (`kimberlize diff`).
fn program_name() -> String {
    let mut args = std::env::args_os();
    let prog = args
        .next()
        .and_then(|a| {
            std::path::Path::new(&a)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "kimberley".into());
    match args.next() {
        Some(sub) if !sub.to_string_lossy().starts_with('-') => {
            format!("{prog} {}", sub.to_string_lossy())
        }
        _ => prog,
    }
}

/// True if an `io::Error` in `e`'s chain is a broken pipe.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<FormatError>()
            .is_some_and(|fe| fe.is_broken_pipe())
            || c.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Runs `f` with SIGINT/SIGTERM cleaning up (every temporary output
/// removed, one line on stderr, exit 130 or 143:
/// [`kimberley_formats::cleanup::on_signals`]), prints `error: ...` with
/// its causes on failure and maps the root cause to an exit code. An
/// output cut by its reader (a broken pipe) exits [`exit::BROKEN_PIPE`].
pub fn main_with(f: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    // Without the thread, the signals keep their default action (the
    // process dies, as before), so a failure here is not fatal.
    let _ =
        kimberley_formats::cleanup::on_signals(program_name(), |sig| exit::for_signal(sig) as i32);
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) if e.downcast_ref::<QuietExit>().is_some() => {
            ExitCode::from(e.downcast_ref::<QuietExit>().map_or(exit::ERROR, |q| q.0))
        }
        Err(e) => {
            if kimberley_formats::cleanup::interrupted() {
                // The error is the interruption's doing (an EINTR, a
                // removed temporary): the signal thread reports and exits.
                loop {
                    std::thread::park();
                }
            }
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            if is_broken_pipe(&e) {
                eprintln!("{msg} (the output was cut: its reader went away)");
                return ExitCode::from(exit::BROKEN_PIPE);
            }
            if let Some(sig) = kimberley_formats::sys::signal::stopped_by() {
                // A command that stops on SIGINT/SIGTERM (a served VM, a
                // receive) and failed while stopping: interrupted.
                eprintln!(
                    "{msg} (interrupted by {})",
                    kimberley_formats::sys::signal::name(sig)
                );
                return ExitCode::from(exit::for_signal(sig));
            }
            eprintln!("{msg}");
            ExitCode::from(exit_code(&e))
        }
    }
}

/// The documented exit code for `e`: a [`WithCode`] or library error in its
/// chain (the first found), else [`exit::ERROR`].
pub fn exit_code(e: &anyhow::Error) -> u8 {
    e.chain()
        .find_map(|c| {
            c.downcast_ref::<WithCode>().map(|w| w.0).or_else(|| {
                c.downcast_ref::<FormatError>()
                    .and_then(|fe| u8::try_from(fe.exit_code()).ok())
            })
        })
        .unwrap_or(exit::ERROR)
}

/// An error with this message that exits with `code` (one of [`exit`]'s).
pub fn with_code(code: u8, msg: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(WithCode(code, msg.into()))
}

/// A usage error (exit [`exit::USAGE`]) with this message.
pub fn usage(msg: impl Into<String>) -> anyhow::Error {
    with_code(exit::USAGE, msg)
}

/// Ends the run with `code`, one of [`exit`]'s that is not a failure
/// (`kimberlize fetch`'s [`exit::NOTHING_NEW`]), printing nothing.
pub fn quiet_exit(code: u8) -> anyhow::Error {
    anyhow::Error::new(QuietExit(code))
}

/// What [`quiet_exit`] makes.
#[derive(Debug)]
pub struct QuietExit(pub u8);

impl std::fmt::Display for QuietExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}

impl std::error::Error for QuietExit {}

/// An error carrying its own exit code (made by [`with_code`]).
#[derive(Debug)]
pub struct WithCode(pub u8, pub String);

impl std::fmt::Display for WithCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for WithCode {}

/// Configures the rayon pool; returns the thread count used.
pub fn threads(n: Option<usize>) -> usize {
    let n = n
        .unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
        .max(1);
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global();
    n
}

/// Parses a size: a whole number with an optional binary unit, `K`, `M`,
/// `G` or `T` or the same with `iB` (`KiB`, `MiB`, ...), any case: `4096`,
/// `64M`, `64m`, `64MiB`, `1GiB`. Decimal units (`MB`) are refused rather
/// than guessed.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let unit = unit.trim_start();
    let shift = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        "kb" | "mb" | "gb" | "tb" => {
            return Err(format!(
                "{s:?}: say {}{} or {}{}iB (binary units)",
                num,
                &unit[..1].to_ascii_uppercase(),
                num,
                &unit[..1].to_ascii_uppercase()
            ))
        }
        _ => return Err(format!("{s:?} is not a size (e.g. 4096, 64M, 64MiB, 1GiB)")),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 4096, 64M, 64MiB, 1GiB)"))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

/// A size in the largest binary unit that shows it exactly ("64 MiB",
/// "3 GiB", "4097 bytes"), for messages about limits.
pub fn human_size(bytes: u64) -> String {
    for (shift, unit) in [(40, "TiB"), (30, "GiB"), (20, "MiB"), (10, "KiB")] {
        if bytes >= 1 << shift && bytes.is_multiple_of(1 << shift) {
            return format!("{} {unit}", bytes >> shift);
        }
    }
    format!("{bytes} bytes")
}

/// Parses a size that must lie in `min..=max` and be a multiple of
/// `align`; the messages give the limits in human units.
pub fn parse_size_in(s: &str, min: u64, max: u64, align: u64) -> Result<u64, String> {
    let v = parse_size(s)?;
    check_size(v, min, max, align)?;
    Ok(v)
}

/// Checks a size against `min..=max` and `align` (see [`parse_size_in`]).
pub fn check_size(v: u64, min: u64, max: u64, align: u64) -> Result<(), String> {
    if v < min {
        return Err(format!(
            "{} is too small: at least {}",
            human_size(v),
            human_size(min)
        ));
    }
    if v > max {
        return Err(format!(
            "{} is too large: at most {}",
            human_size(v),
            human_size(max)
        ));
    }
    if !v.is_multiple_of(align) {
        return Err(format!(
            "{} is not a multiple of {}",
            human_size(v),
            human_size(align)
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        for (s, v) in [
            ("4096", 4096),
            ("64M", 64 << 20),
            ("64m", 64 << 20),
            ("64MiB", 64 << 20),
            ("64mib", 64 << 20),
            ("64 MiB", 64 << 20),
            ("1GiB", 1 << 30),
            ("1g", 1 << 30),
            ("2K", 2048),
            ("1T", 1 << 40),
            ("512B", 512),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for bad in ["1X", "", "M", "1.5G", "-1", "99999999999T", "1GiBs"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
        let e = parse_size("64MB").unwrap_err();
        assert!(e.contains("64M") && e.contains("64MiB"), "{e}");
    }

    #[test]
    fn limits_in_human_units() {
        assert_eq!(human_size(64 << 20), "64 MiB");
        assert_eq!(human_size(3 << 30), "3 GiB");
        assert_eq!(human_size(1 << 40), "1 TiB");
        assert_eq!(human_size(1536 << 20), "1536 MiB");
        assert_eq!(human_size(4097), "4097 bytes");
        let e = parse_size_in("8M", 64 << 20, 1 << 40, 1 << 20).unwrap_err();
        assert!(e.contains("at least 64 MiB"), "{e}");
        let e = parse_size_in("2T", 64 << 20, 1 << 40, 1 << 20).unwrap_err();
        assert!(e.contains("at most 1 TiB"), "{e}");
        let e = parse_size_in("65537K", 64 << 20, 1 << 40, 1 << 20).unwrap_err();
        assert!(e.contains("multiple of 1 MiB"), "{e}");
        assert_eq!(
            parse_size_in("64MiB", 64 << 20, 1 << 40, 1 << 20),
            Ok(64 << 20)
        );
    }

    #[test]
    fn exit_codes_from_error_chains() {
        use anyhow::Context;
        let e = anyhow::Error::new(FormatError::Usage("bad key file".into()));
        assert_eq!(exit_code(&e), exit::USAGE);
        let e = Err::<(), _>(FormatError::Auth("x".into()))
            .context("reading")
            .unwrap_err();
        assert_eq!(exit_code(&e), exit::AUTH);
        assert_eq!(exit_code(&usage("--memory")), exit::USAGE);
        assert_eq!(exit_code(&anyhow::anyhow!("plain")), exit::ERROR);
        let pipe = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe))
            .context("writing the overlay");
        assert!(is_broken_pipe(&pipe));
        assert!(!is_broken_pipe(&usage("x")));
    }
}
