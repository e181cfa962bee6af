//! Checks shared by the binaries' `man` suites: man page sections and
//! rendering, verbatim examples in `--help`, completions, `--version`.

#![allow(dead_code)]

use std::path::Path;
use std::process::{Command, Stdio};

use kimberley_cli::exit::Tool;
use kimberley_cli::help::Examples;

/// The tests every binary's `man` suite has: pages current (`UPDATE_MAN=1`
/// rewrites them), every section present, examples verbatim in `--help`.
/// `$krate` is the binary's library crate, `$tool` its `Tool`.
macro_rules! man_suite {
    ($krate:ident, $tool:expr) => {
        #[test]
        fn man_pages_are_current() {
            use clap::CommandFactory;
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../man");
            let stale = kimberley_cli::man::check_or_update(
                $krate::cli::Cli::command(),
                $tool,
                $krate::cli::EXAMPLES,
                &dir,
            );
            assert!(
                stale.is_empty(),
                "stale man pages {stale:?}: run UPDATE_MAN=1 cargo test -p {} --test man",
                stringify!($krate)
            );
        }

        #[test]
        fn pages_have_every_section() {
            use clap::CommandFactory;
            docs::check_pages($krate::cli::Cli::command(), $tool, $krate::cli::EXAMPLES);
        }

        #[test]
        fn help_shows_examples_verbatim() {
            docs::check_examples($krate::cli::command(), $krate::cli::EXAMPLES);
        }
    };
}

/// Every page has the required sections in order, no `EXTRA`, EXAMPLES
/// with content, SEE ALSO naming only pages that exist, and renders
/// without warnings where groff is installed.
pub fn check_pages(cmd: clap::Command, tool: Tool, examples: Examples) {
    let pages = kimberley_cli::man::render(cmd, tool, examples);
    let names: Vec<String> = pages
        .iter()
        .map(|(n, _)| n.trim_end_matches(".1").to_string())
        .collect();
    for (name, roff) in &pages {
        let text = String::from_utf8(roff.clone()).unwrap();
        let heads: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix(".SH "))
            .map(|h| h.trim_matches('"'))
            .collect();
        let wanted: Vec<&str> = kimberley_cli::man::REQUIRED_SECTIONS.to_vec();
        let found: Vec<&str> = heads
            .iter()
            .copied()
            .filter(|h| wanted.contains(h))
            .collect();
        assert_eq!(found, wanted, "{name}: sections {heads:?}");
        assert!(!heads.contains(&"EXTRA"), "{name}: has an EXTRA section");
        assert!(!text.contains("help(1)"), "{name}: names a help page");
        let ex = text
            .split(".SH EXAMPLES")
            .nth(1)
            .unwrap()
            .split(".SH ")
            .next()
            .unwrap();
        assert!(
            ex.contains(".nf") && ex.lines().count() > 4,
            "{name}: no examples"
        );
        let see = text.split(".SH \"SEE ALSO\"").nth(1).unwrap();
        let refs: Vec<&str> = see
            .split("\\fB")
            .skip(1)
            .map(|r| r.split("\\fR").next().unwrap())
            .collect();
        assert!(!refs.is_empty(), "{name}: SEE ALSO is empty");
        for r in refs {
            let r = r.replace("\\-", "-");
            assert!(
                names.contains(&r) || kimberley_cli::man::TOOLS.contains(&r.as_str()),
                "{name}: SEE ALSO names {r}(1), which has no page"
            );
        }
        groff_clean(name, roff);
    }
}

/// `groff -k -man -Tutf8 -ww -z` prints nothing for the page (skipped when groff is
/// not installed).
fn groff_clean(name: &str, roff: &[u8]) {
    let Ok(mut child) = Command::new("groff")
        .args(["-k", "-man", "-Tutf8", "-ww", "-z"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
    else {
        return;
    };
    use std::io::Write;
    child.stdin.take().unwrap().write_all(roff).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{name}: groff failed");
    assert!(
        out.stderr.is_empty(),
        "{name}: groff warns: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every command of the tool has examples, each line short enough not to
/// be wrapped on an 80-column terminal, and its long `--help` shows them
/// line for line.
pub fn check_examples(cmd: clap::Command, examples: Examples) {
    let root = cmd.get_name().to_string();
    let mut paths = vec![root.clone()];
    paths.extend(
        cmd.get_subcommands()
            .filter(|s| !s.is_hide_set() && s.get_name() != "help")
            .map(|s| format!("{root} {}", s.get_name())),
    );
    for path in &paths {
        let ex = kimberley_cli::help::examples_for(examples, path)
            .unwrap_or_else(|| panic!("{path} has no examples"));
        let mut argv: Vec<&str> = path.split(' ').collect();
        argv.push("--help");
        let err = cmd
            .clone()
            .term_width(80)
            .try_get_matches_from(argv)
            .unwrap_err();
        let help = err.render().to_string();
        for line in ex.lines() {
            assert!(
                line.len() <= 76,
                "{path}: example line longer than 76 columns: {line}"
            );
            if !line.is_empty() {
                assert!(
                    help.contains(&format!("\n  {line}\n")),
                    "{path} --help does not show {line:?} verbatim:\n{help}"
                );
            }
        }
    }
}

/// `BIN completions SHELL` prints a script that the shell parses (bash
/// always; zsh and fish where installed).
pub fn check_completions(bin: &Path) {
    check_completions_with(bin, "completions")
}

/// [`check_completions`] for a tool whose completions come from `ARG SHELL`
/// (vmctl: `--completions SHELL`).
pub fn check_completions_with(bin: &Path, arg: &str) {
    for (shell, check) in [
        ("bash", vec!["bash", "-n"]),
        ("zsh", vec!["zsh", "-n"]),
        ("fish", vec!["fish", "--no-execute"]),
    ] {
        let out = Command::new(bin).args([arg, shell]).output().unwrap();
        assert!(
            out.status.success(),
            "completions {shell}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "completions {shell}: empty");
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("script");
        std::fs::write(&f, &out.stdout).unwrap();
        match Command::new(check[0]).args(&check[1..]).arg(&f).output() {
            Ok(o) => assert!(
                o.status.success(),
                "{shell} does not parse the script: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(_) if shell != "bash" => {}
            Err(e) => panic!("bash: {e}"),
        }
    }
}

/// Completes `words` (the last one being completed) with the bash script;
/// returns the candidates.
pub fn bash_complete(bin: &Path, words: &[&str]) -> Vec<String> {
    bash_complete_with(bin, "completions", words)
}

/// [`bash_complete`] with the script from `BIN ARG bash`.
pub fn bash_complete_with(bin: &Path, arg: &str, words: &[&str]) -> Vec<String> {
    let name = bin.file_name().unwrap().to_str().unwrap();
    let out = Command::new(bin).args([arg, "bash"]).output().unwrap();
    let script = String::from_utf8(out.stdout).unwrap();
    let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
    let prog = format!(
        "{script}\nCOMP_WORDS=({})\nCOMP_CWORD={}\nCOMP_LINE='{}'\nCOMP_POINT=${{#COMP_LINE}}\n_{} {name} '{}' '{}'\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n",
        quoted.join(" "),
        words.len() - 1,
        words.join(" "),
        name.replace('-', "__"),
        words[words.len() - 1],
        if words.len() > 1 { words[words.len() - 2] } else { "" },
    );
    let o = Command::new("bash").arg("-c").arg(prog).output().unwrap();
    assert!(
        o.status.success(),
        "bash: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

/// `BIN --version` names the version, the commit it was built from and
/// the format versions `more` adds to the overlay's and the manifest's.
pub fn check_version(bin: &Path, more: &[String]) {
    let out = Command::new(bin).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains(env!("CARGO_PKG_VERSION")), "{text}");
    let head = Command::new("git")
        .args([
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "rev-parse",
            "--short",
            "HEAD",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8(o.stdout).unwrap().trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    assert!(text.contains(&format!("(commit {head})")), "{text}");
    let mut want = vec![
        format!(
            "overlay format: {}",
            kimberley_formats::overlay::header::VERSION
        ),
        format!(
            "VM directory manifest: {} (microVM), {}",
            kimberley_formats::vmdir::manifest::VERSION,
            kimberley_formats::vmdir::manifest::VERSION_MACHINE
        ),
    ];
    want.extend(more.iter().cloned());
    for w in want {
        assert!(text.contains(&w), "--version lacks {w:?}: {text}");
    }
}
