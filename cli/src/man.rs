//! Man pages from clap definitions (checked by tests to be current).

use std::path::Path;

/// Renders `cmd` and each subcommand into `(file name, roff)` pairs.
pub fn render(cmd: clap::Command, tool: crate::exit::Tool) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    let cmd = cmd.after_long_help(crate::exit::render(tool));
    render_into(&cmd, cmd.get_name().to_string(), &mut out);
    out
}

fn render_into(cmd: &clap::Command, name: String, out: &mut Vec<(String, Vec<u8>)>) {
    let mut buf = Vec::new();
    let c = cmd.clone().name(name.clone());
    clap_mangen::Man::new(c)
        .render(&mut buf)
        .expect("rendering to memory");
    out.push((format!("{name}.1"), buf));
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        render_into(sub, format!("{name}-{}", sub.get_name()), out);
    }
}

/// Compares rendered pages with `dir`, or rewrites them when
/// `UPDATE_MAN=1`. Returns the names of stale pages.
pub fn check_or_update(cmd: clap::Command, tool: crate::exit::Tool, dir: &Path) -> Vec<String> {
    let update = std::env::var("UPDATE_MAN").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for (name, roff) in render(cmd, tool) {
        let p = dir.join(&name);
        if update {
            std::fs::write(&p, &roff).expect("writing a man page");
        } else if std::fs::read(&p).ok().as_deref() != Some(&roff[..]) {
            stale.push(name);
        }
    }
    stale
}
