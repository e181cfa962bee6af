//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p vmigrate --test man` rewrites them.
//! Also: the pages' sections, verbatim examples, completions, `--version`.

#[path = "../../cli/tests/common/docs.rs"]
#[macro_use]
mod docs;

use kimberley_cli::exit::Tool;
use vmigrate::cli;

man_suite!(vmigrate, Tool::Vmigrate);

fn bin() -> std::path::PathBuf {
    env!("CARGO_BIN_EXE_vmigrate").into()
}

#[test]
fn help_teaches() {
    let help = cli::command().render_long_help().to_string();
    for needle in ["EXIT STATUS", "vmigrate recv", "vmigrate send", "keygen"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}

#[test]
fn rates() {
    use vmigrate::cli::parse_rate;
    assert_eq!(parse_rate("100mbit"), Ok(12_500_000));
    assert_eq!(parse_rate("12M"), Ok(12 << 20));
    assert!(parse_rate("0").is_err());
    assert!(parse_rate("fast").is_err());
}

#[test]
fn completions_parse() {
    docs::check_completions(&bin());
}

#[test]
fn version_names_commit_and_formats() {
    docs::check_version(
        &bin(),
        &[format!(
            "migration protocol: {}",
            vmigrate::protocol::VERSION
        )],
    );
}
