//! docs/CLOUDLET.md's set-up: the unit files in docs/cloudlet/ are the ones
//! the page shows, and every `kimberlize fetch` command line it gives
//! parses.

use std::path::Path;

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// Parses a `kimberlize ...` command line (words split on blanks).
fn parses(line: &str) {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert!(words[0].ends_with("kimberlize"), "{line}");
    let mut argv = vec!["kimberlize"];
    argv.extend(&words[1..]);
    if let Err(e) = kimberlize::cli::command().try_get_matches_from(&argv) {
        panic!("{line}: {e}");
    }
}

#[test]
fn units_and_crontab_match_the_page_and_parse() {
    let page = std::fs::read_to_string(root().join("docs/CLOUDLET.md")).unwrap();
    for unit in ["kimberley-fetch.service", "kimberley-fetch.timer"] {
        let text = std::fs::read_to_string(root().join("docs/cloudlet").join(unit)).unwrap();
        assert!(
            page.contains(&format!("```ini\n{text}```")),
            "{unit} differs from docs/CLOUDLET.md"
        );
    }
    let service =
        std::fs::read_to_string(root().join("docs/cloudlet/kimberley-fetch.service")).unwrap();
    let joined = service.replace("\\\n", " ");
    let exec = joined
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    parses(exec);
    assert!(service.contains("SuccessExitStatus=10"));
    assert_eq!(kimberley_cli::exit::NOTHING_NEW, 10);
    let cron = page
        .lines()
        .find(|l| l.trim_start().starts_with("*/15 "))
        .expect("a crontab line");
    let cmd = cron.trim_start().splitn(6, ' ').nth(5).unwrap();
    parses(cmd.split("||").next().unwrap());
}
