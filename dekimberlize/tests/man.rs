//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p dekimberlize --test man` rewrites them.
//! Also: the pages' sections, verbatim examples, completions, `--version`.

#[path = "../../cli/tests/common/docs.rs"]
#[macro_use]
mod docs;

use dekimberlize::cli;
use kimberley_cli::exit::Tool;

man_suite!(dekimberlize, Tool::Dekimberlize);

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_dekimberlize").into()
}

#[test]
fn help_teaches() {
    let help = cli::command().render_long_help().to_string();
    for needle in ["EXIT STATUS", "--key-file", "Examples:"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn completions_parse() {
    docs::check_completions(&bin());
}

#[test]
fn completions_complete_apply_and_verify() {
    // The apply command is flattened into the top level, beside `verify`.
    let top = docs::bash_complete(&bin(), &["dekimberlize", "--ba"]);
    assert_eq!(top, ["--base"]);
    let sub = docs::bash_complete(&bin(), &["dekimberlize", "ver"]);
    assert_eq!(sub, ["verify"]);
    let v = docs::bash_complete(&bin(), &["dekimberlize", "verify", "--inp"]);
    assert_eq!(v, ["--input"]);
}

#[test]
fn version_names_commit_and_formats() {
    docs::check_version(&bin(), &[]);
}
