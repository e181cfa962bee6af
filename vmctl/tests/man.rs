//! The man pages in man/ are generated from the clap definitions and must
//! be current: `UPDATE_MAN=1 cargo test -p vmctl --test man` rewrites them.

use clap::CommandFactory;

#[test]
fn man_pages_are_current() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../man");
    let stale = kimberley_cli::man::check_or_update(
        vmctl::cli::Cli::command(),
        kimberley_cli::exit::Tool::Vmctl,
        &dir,
    );
    assert!(
        stale.is_empty(),
        "stale man pages {stale:?}: run UPDATE_MAN=1 cargo test -p vmctl --test man"
    );
}

#[test]
fn help_teaches() {
    let help = vmctl::cli::Cli::command().render_long_help().to_string();
    for needle in ["EXIT STATUS", "vmctl app.sock status", "exec", "125"] {
        assert!(help.contains(needle), "--help lacks {needle}");
    }
}
