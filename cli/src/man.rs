//! Man pages from clap definitions (checked by tests to be current).

use std::path::Path;

use roff::{bold, roman, Roff};

use crate::exit::{self, Tool};
use crate::help::{examples_for, Examples};

/// The suite's tools: each root page names the others under SEE ALSO.
pub const TOOLS: &[&str] = &[
    "kimberlize",
    "dekimberlize",
    "vmigrate",
    "vmctl",
    "kimberlized",
];

/// The sections every page has, in order.
pub const REQUIRED_SECTIONS: &[&str] = &[
    "NAME",
    "SYNOPSIS",
    "DESCRIPTION",
    "OPTIONS",
    "EXIT STATUS",
    "EXAMPLES",
    "SEE ALSO",
];

/// One page to write: its name (`kimberlize-build`), the command, and the
/// path its examples are keyed by (`kimberlize build`).
struct Page {
    name: String,
    path: String,
    cmd: clap::Command,
    parent: Option<String>,
}

/// The pages of `cmd`: itself and every visible subcommand, without the
/// `help` subcommand (it has no page).
fn pages(
    cmd: &clap::Command,
    name: String,
    path: String,
    parent: Option<String>,
    out: &mut Vec<Page>,
) {
    let page_cmd = cmd.clone().name(name.clone()).disable_help_subcommand(true);
    out.push(Page {
        name: name.clone(),
        path: path.clone(),
        cmd: page_cmd,
        parent,
    });
    for sub in cmd.get_subcommands() {
        if sub.is_hide_set() || sub.get_name() == "help" {
            continue;
        }
        pages(
            sub,
            format!("{name}-{}", sub.get_name()),
            format!("{path} {}", sub.get_name()),
            Some(name.clone()),
            out,
        );
    }
}

/// Renders `cmd` and each subcommand into `(file name, roff)` pairs:
/// clap_mangen's NAME, SYNOPSIS, DESCRIPTION, OPTIONS and SUBCOMMANDS,
/// then the tool's EXIT STATUS, the command's EXAMPLES and SEE ALSO.
pub fn render(cmd: clap::Command, tool: Tool, examples: Examples) -> Vec<(String, Vec<u8>)> {
    let mut all = Vec::new();
    let root = cmd.get_name().to_string();
    pages(&cmd, root.clone(), root, None, &mut all);
    let names: Vec<&str> = all.iter().map(|p| p.name.as_str()).collect();
    all.iter()
        .map(|p| {
            let see_also = see_also(p, &all, &names);
            (
                format!("{}.1", p.name),
                render_page(p, tool, examples_for(examples, &p.path), &see_also),
            )
        })
        .collect()
}

/// Related pages: a root page names its subcommands and the other tools;
/// a subcommand page its parent, its own subcommands and its siblings.
fn see_also(p: &Page, all: &[Page], names: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    match &p.parent {
        None => {
            v.extend(
                all.iter()
                    .filter(|q| q.parent.as_ref() == Some(&p.name))
                    .map(|q| q.name.clone()),
            );
            v.extend(
                TOOLS
                    .iter()
                    .filter(|t| **t != p.name)
                    .map(|t| t.to_string()),
            );
        }
        Some(parent) => {
            v.push(parent.clone());
            v.extend(
                all.iter()
                    .filter(|q| {
                        q.parent.as_ref() == Some(&p.name)
                            || (q.parent.as_ref() == Some(parent) && q.name != p.name)
                    })
                    .map(|q| q.name.clone()),
            );
        }
    }
    // Pages of this tool that exist; the other tools' root pages.
    v.retain(|n| names.contains(&n.as_str()) || TOOLS.contains(&n.as_str()));
    v
}

/// Strips the apostrophe preamble every `roff` rendering starts with, so
/// that the composed page defines it once.
fn body(full: Vec<u8>, preamble: &[u8]) -> Vec<u8> {
    match full.strip_prefix(preamble) {
        Some(rest) => rest.to_vec(),
        None => full,
    }
}

fn render_page(p: &Page, tool: Tool, examples: Option<&str>, see_also: &[String]) -> Vec<u8> {
    let man = clap_mangen::Man::new(p.cmd.clone());
    let preamble = Roff::new().render().into_bytes();
    let mut out = preamble.clone();
    let section = |f: &dyn Fn(&mut Vec<u8>) -> std::io::Result<()>| {
        let mut b = Vec::new();
        f(&mut b).expect("rendering to memory");
        body(b, &preamble)
    };
    out.extend(section(&|w| man.render_title(w)));
    out.extend(section(&|w| man.render_name_section(w)));
    out.extend(section(&|w| man.render_synopsis_section(w)));
    out.extend(section(&|w| man.render_description_section(w)));
    out.extend(section(&|w| man.render_options_section(w)));
    if p.cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        out.extend(section(&|w| man.render_subcommands_section(w)));
    }

    let mut r = Roff::new();
    r.control("SH", ["EXIT STATUS"]);
    for c in exit::table(tool) {
        r.control("TP", []);
        r.text([bold(c.code.to_string())]);
        r.text([roman(c.meaning)]);
    }
    r.control("SH", ["EXAMPLES"]);
    if let Some(ex) = examples {
        r.control("PP", []).control("RS", ["4"]).control("nf", []);
        for line in ex.lines() {
            r.text([roman(line)]);
        }
        r.control("fi", []).control("RE", []);
    }
    r.control("SH", ["SEE ALSO"]);
    let refs: Vec<_> = see_also
        .iter()
        .enumerate()
        .flat_map(|(i, n)| {
            let sep = if i + 1 < see_also.len() {
                "(1), "
            } else {
                "(1)"
            };
            [bold(n.clone()), roman(sep)]
        })
        .collect();
    r.text(refs);
    out.extend(body(r.render().into_bytes(), &preamble));
    out
}

/// Compares rendered pages with `dir`, or rewrites them when
/// `UPDATE_MAN=1`. Returns the names of stale pages.
pub fn check_or_update(
    cmd: clap::Command,
    tool: Tool,
    examples: Examples,
    dir: &Path,
) -> Vec<String> {
    let update = std::env::var("UPDATE_MAN").is_ok_and(|v| v == "1");
    let mut stale = Vec::new();
    for (name, roff) in render(cmd, tool, examples) {
        let p = dir.join(&name);
        if update {
            std::fs::write(&p, &roff).expect("writing a man page");
        } else if std::fs::read(&p).ok().as_deref() != Some(&roff[..]) {
            stale.push(name);
        }
    }
    stale
}
