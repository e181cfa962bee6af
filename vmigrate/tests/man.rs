//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p vmigrate --test man` rewrites them.

use clap::CommandFactory;

#[test]
fn man_pages_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../man");
    let stale = kimberley_cli::man::check_or_update(
        vmigrate::cli::Cli::command(),
        kimberley_cli::exit::Tool::Vmigrate,
        &dir,
    );
    assert!(
        stale.is_empty(),
        "stale man pages {stale:?}: run UPDATE_MAN=1 cargo test -p vmigrate --test man"
    );
}

#[test]
fn help_teaches() {
    let help = vmigrate::cli::Cli::command().render_long_help().to_string();
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
