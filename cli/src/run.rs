//! `main` for every binary: errors printed as a chain, documented exit
//! codes, broken pipes ignored.

use std::process::ExitCode;

use kimberley_formats::Error as FormatError;

/// `-q` handling.
pub type Quiet = bool;

/// Runs `f`, prints `error: ...` with its causes on failure and maps the
/// root cause to an exit code. A broken pipe on stdout exits quietly.
pub fn main_with(f: impl FnOnce() -> anyhow::Result<()>) -> ExitCode {
    match f() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let fe = e.chain().find_map(|c| c.downcast_ref::<FormatError>());
            if fe.is_some_and(|fe| fe.is_broken_pipe())
                || e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
                })
            {
                return ExitCode::SUCCESS;
            }
            let mut msg = format!("error: {e}");
            for cause in e.chain().skip(1) {
                msg.push_str(&format!(": {cause}"));
            }
            eprintln!("{msg}");
            let code = fe
                .map(|fe| fe.exit_code())
                .or_else(|| e.chain().find_map(exit_code_of))
                .unwrap_or(1);
            ExitCode::from(code as u8)
        }
    }
}

/// An error carrying its own exit code (for front ends: VM failures).
#[derive(Debug)]
pub struct WithCode(pub i32, pub String);

impl std::fmt::Display for WithCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.1)
    }
}

impl std::error::Error for WithCode {}

fn exit_code_of(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    e.downcast_ref::<WithCode>().map(|w| w.0)
}

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

/// Exit code of VM failures.
pub const EXIT_VM: i32 = crate::exit::VM as i32;

/// Parses a size: a number with an optional K, M, G or T suffix (binary
/// multiples), e.g. `256M`, `1G`, `4096`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix {c:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (e.g. 256M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }
}
