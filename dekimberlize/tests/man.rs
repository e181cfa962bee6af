//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p dekimberlize --test man` rewrites them.
//! Also: the pages' sections, verbatim examples, completions, `--version`.

#[path = "../../cli/tests/common/docs.rs"]
mod docs;

use clap::CommandFactory;
use dekimberlize::cli;
use kimberley_cli::exit::Tool;

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_dekimberlize").into()
}

#[test]
fn man_pages_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../man");
    let stale = kimberley_cli::man::check_or_update(
        dekimberlize::cli::Cli::command(),
        Tool::Dekimberlize,
        cli::EXAMPLES,
        &dir,
    );
    assert!(
        stale.is_empty(),
        "stale man pages {stale:?}: run UPDATE_MAN=1 cargo test -p dekimberlize --test man"
    );
}

#[test]
fn help_teaches() {
    let help = cli::command().render_long_help().to_string();
    for needle in ["EXIT STATUS", "--key-file", "Examples:"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn pages_have_every_section() {
    docs::check_pages(cli::Cli::command(), Tool::Dekimberlize, cli::EXAMPLES);
}

#[test]
fn help_shows_examples_verbatim() {
    docs::check_examples(cli::command(), cli::EXAMPLES);
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
