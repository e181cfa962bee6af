//! docs/CLOUDLET.md's daemon section matches the code: the unit file is
//! the one the page shows and its command line parses; the error table's
//! reasons and statuses are the API's.

use std::path::Path;

use kimberlized::api::Reason;

fn page() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/CLOUDLET.md"))
        .unwrap()
}

#[test]
fn the_unit_matches_the_page_and_parses() {
    let unit = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/cloudlet/kimberlized.service"),
    )
    .unwrap();
    assert!(
        page().contains(&format!("```ini\n{unit}```")),
        "the unit differs from the page"
    );
    let joined = unit.replace("\\\n", " ");
    let exec = joined
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("an ExecStart line");
    let words: Vec<&str> = exec.split_whitespace().collect();
    assert!(words[0].ends_with("/kimberlized"));
    let mut argv = vec!["kimberlized"];
    argv.extend(&words[1..]);
    if let Err(e) = kimberlized::cli::command().try_get_matches_from(&argv) {
        panic!("{exec}: {e}");
    }
}

#[test]
fn the_error_table_is_the_apis() {
    let page = page();
    let mut rows = 0;
    for line in page.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let Ok(status) = cells[2].parse::<u16>() else {
            continue;
        };
        for name in cells[1].split(", ") {
            let r: Reason = serde_json::from_str(&format!("\"{}\"", name.trim_matches('`')))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.status(), status, "{name}");
            rows += 1;
        }
    }
    assert_eq!(rows, 15, "every reason has a row");
}
