//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p vmctl --test man` rewrites them.
//! Also: the pages' sections, verbatim examples, completions, `--version`.

#[path = "../../cli/tests/common/docs.rs"]
#[macro_use]
mod docs;

use kimberley_cli::exit::Tool;
use vmctl::cli;

man_suite!(vmctl, Tool::Vmctl);

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_vmctl").into()
}

#[test]
fn help_teaches() {
    let help = cli::command().render_long_help().to_string();
    for needle in ["EXIT STATUS", "vmctl app.sock status", "exec", "125"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn completions_parse() {
    docs::check_completions_with(&bin(), "--completions");
}

#[test]
fn completions_complete() {
    let subs = docs::bash_complete_with(&bin(), "--completions", &["vmctl", "app.sock", "s"]);
    assert!(
        subs.contains(&"status".to_string()) && subs.contains(&"snapshot".to_string()),
        "{subs:?}"
    );
}

#[test]
fn version_names_commit_and_formats() {
    docs::check_version(&bin(), &[]);
}

#[test]
fn a_socket_without_a_command_is_a_usage_error() {
    let out = std::process::Command::new(bin())
        .arg("x.sock")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("a command is required"));
}
