//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p kimberlize --test man` rewrites them.
//! Also: the pages' sections, verbatim examples, completions, `--version`.

#[path = "../../cli/tests/common/docs.rs"]
#[macro_use]
mod docs;

use kimberley_cli::exit::Tool;
use kimberlize::cli;

man_suite!(kimberlize, Tool::Kimberlize);

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_kimberlize").into()
}

#[test]
fn help_teaches() {
    let help = cli::command().render_long_help().to_string();
    for needle in ["EXIT STATUS", "keygen", "ssh cloudlet"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn completions_parse() {
    docs::check_completions(&bin());
}

#[test]
fn completions_complete() {
    let subs = docs::bash_complete(&bin(), &["kimberlize", "b"]);
    assert!(
        subs.contains(&"build".to_string()) && subs.contains(&"base".to_string()),
        "{subs:?}"
    );
    let opts = docs::bash_complete(&bin(), &["kimberlize", "build", "--inst"]);
    assert_eq!(opts, ["--install"]);
}

#[test]
fn version_names_commit_and_formats() {
    docs::check_version(&bin(), &[]);
}
