//! Long help around the clap definitions: verbatim examples per command,
//! the tool's exit-code table, and shell completions.

use std::io::Write;

use crate::exit::{self, Tool};

/// Example blocks per command, keyed by the command's path as typed
/// (`"kimberlize"`, `"kimberlize build"`): lines shown verbatim in long
/// `--help` and in the man page's EXAMPLES section.
pub type Examples = &'static [(&'static str, &'static str)];

/// The examples of the command at `path`, if any.
pub fn examples_for(examples: Examples, path: &str) -> Option<&'static str> {
    examples.iter().find(|(p, _)| *p == path).map(|(_, e)| *e)
}

/// The examples as a help section: a heading and the lines indented, verbatim.
fn examples_text(ex: &str) -> String {
    let mut s = String::from("Examples:\n");
    for line in ex.lines() {
        if line.is_empty() {
            s.push('\n');
        } else {
            s.push_str(&format!("\n  {line}"));
        }
    }
    s
}

/// Adds each command's examples and the tool's exit-code table after its
/// long help (`--help`; `-h` stays short). clap does not reflow
/// `after_long_help`, so the examples keep their lines.
pub fn decorate(cmd: clap::Command, tool: Tool, examples: Examples) -> clap::Command {
    let path = cmd.get_name().to_string();
    decorate_at(cmd, &path, tool, examples)
}

fn decorate_at(cmd: clap::Command, path: &str, tool: Tool, examples: Examples) -> clap::Command {
    let mut after = String::new();
    if let Some(ex) = examples_for(examples, path) {
        after.push_str(&examples_text(ex));
        after.push_str("\n\n");
    }
    after.push_str(&exit::render(tool));
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    let mut cmd = cmd.after_long_help(after);
    for n in names {
        let sub_path = format!("{path} {n}");
        cmd = cmd.mut_subcommand(&n, |s| decorate_at(s, &sub_path, tool, examples));
    }
    cmd
}

/// Parses the process's arguments against `cmd` (a [`decorate`]d
/// command) into `T`; exits with usage or help text as clap does.
pub fn parse<T: clap::FromArgMatches>(cmd: clap::Command) -> T {
    T::from_arg_matches(&cmd.get_matches()).unwrap_or_else(|e| e.exit())
}

/// `completions SHELL`: the shell's completion script on stdout.
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// Writes `cmd`'s completion script for `shell` to `out`.
pub fn completions(
    mut cmd: clap::Command,
    shell: clap_complete::Shell,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    let name = cmd.get_name().to_string();
    let mut buf = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut buf);
    out.write_all(&buf)?;
    out.flush()
}
