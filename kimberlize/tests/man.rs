//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p kimberlize --test man` rewrites them.

use clap::CommandFactory;

#[test]
fn man_pages_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../man");
    let stale = kimberley_cli::man::check_or_update(
        kimberlize::cli::Cli::command(),
        kimberley_cli::exit::Tool::Kimberlize,
        &dir,
    );
    assert!(
        stale.is_empty(),
        "stale man pages {stale:?}: run UPDATE_MAN=1 cargo test -p kimberlize --test man"
    );
}

#[test]
fn help_teaches() {
    let help = kimberlize::cli::Cli::command()
        .render_long_help()
        .to_string();
    for needle in ["EXIT STATUS", "keygen", "ssh cloudlet"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}
