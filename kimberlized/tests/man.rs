//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p kimberlized --test man` rewrites them.
//! Also: the pages' sections, verbatim examples, completions, `--version`.

#[path = "../../cli/tests/common/docs.rs"]
#[macro_use]
mod docs;

use kimberley_cli::exit::Tool;
use kimberlized::cli;

man_suite!(kimberlized, Tool::Kimberlized);

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_kimberlized").into()
}

#[test]
fn help_teaches() {
    let help = cli::command().render_long_help().to_string();
    for needle in [
        "EXIT STATUS",
        "Examples:",
        "--allow-registry registry.example.org",
        "https://cloudlet1.example.org:7466/v1/info",
        "systemctl stop kimberlized",
    ] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn completions_parse() {
    docs::check_completions(&bin());
}

#[test]
fn completions_complete() {
    let opts = docs::bash_complete(&bin(), &["kimberlized", "--client-c"]);
    assert_eq!(opts, ["--client-ca"]);
    let subs = docs::bash_complete(&bin(), &["kimberlized", "comp"]);
    assert_eq!(subs, ["completions"]);
}

#[test]
fn completions_need_no_daemon_options() {
    // `completions` must not ask for --base, --cert, --key, --client-ca.
    let out = std::process::Command::new(bin())
        .args(["completions", "bash"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and the daemon still requires them (exit 2, usage).
    let out = std::process::Command::new(bin())
        .args(["--base", "/nonexistent"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--cert"), "{err}");
}

#[test]
fn version_names_commit_formats_and_api() {
    docs::check_version(
        &bin(),
        &[format!("cloudlet API: {}", kimberlized::API_VERSION)],
    );
}
