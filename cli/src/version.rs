//! The long `--version` text: version, git commit and format versions.

/// The git commit the binaries were built from ("unknown" outside git).
pub const COMMIT: &str = env!("KIMBERLEY_GIT_COMMIT");

/// `--version` after the program's name: the crate version and commit,
/// then one line per format this build reads and writes. `extra` adds
/// the versions only one tool speaks (vmigrate's wire protocol).
pub fn long(extra: &[(&str, String)]) -> String {
    use kimberley_formats::{overlay::header, vmdir::manifest};
    let mut s = format!(
        "{} (commit {COMMIT})\noverlay format: {} (reads 1 and 2, writes {} unless asked)\nVM directory manifest: {} (microVM), {} (with a machine description)",
        env!("CARGO_PKG_VERSION"),
        header::VERSION,
        header::DEFAULT_VERSION,
        manifest::VERSION,
        manifest::VERSION_MACHINE,
    );
    for (what, v) in extra {
        s.push_str(&format!("\n{what}: {v}"));
    }
    s
}
