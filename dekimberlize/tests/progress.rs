//! Progress and logs off and on a terminal: the one-line summaries (and -q), `--progress=plain` log lines, one bar of a fixed total on a pty, `build --guest-log`.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::*;
use kimberley_cli::progress::bytes;
use kimberley_formats::testkit::{make_pair, Pair, PairSpec};
use kimberley_formats::vmdir::VmDir;

fn size(dir: &Path) -> u64 {
    VmDir::open(dir)
        .unwrap()
        .manifest
        .components
        .iter()
        .map(|c| c.size)
        .sum()
}

/// A pair large enough that a diff takes about a second: 64 MiB of
/// random memory, and the same with every eighth MiB rewritten, imported.
/// A base of `mib` MiB of random bytes and a launch VM with every eighth
/// MiB changed.
fn big_pair(t: &Path, mib: usize) -> Pair {
    use std::io::Read;
    let mut data = vec![0u8; mib << 20];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut data)
        .unwrap();
    std::fs::write(t.join("base.raw"), &data).unwrap();
    for m in (0..mib).step_by(8) {
        data[m << 20..(m << 20) + (1 << 20)].fill(m as u8);
    }
    std::fs::write(t.join("launch.raw"), &data).unwrap();
    let pair = Pair {
        base: t.join("base"),
        launch: t.join("launch"),
    };
    for (dir, raw) in [(&pair.base, "base.raw"), (&pair.launch, "launch.raw")] {
        ok(run(Command::new(bin("kimberlize"))
            .args(["import", "-q", "--name", "vm", "-o"])
            .arg(dir)
            .arg("--memory")
            .arg(t.join(raw))));
    }
    pair
}

fn diff_cmd(p: &Pair, key: &Path, out: &Path) -> Command {
    let mut c = Command::new(bin("kimberlize"));
    c.args(["diff", "-j", "1", "--base"])
        .arg(&p.base)
        .arg("--launch")
        .arg(&p.launch)
        .arg("-k")
        .arg(key)
        .arg("-o")
        .arg(out);
    c
}

/// Every size and rate in `s` is in the unit that fits it: between 1 and
/// 1024 of a binary unit above bytes (never "0.0 MiB" or "0.02 GiB/s").
fn assert_human(s: &str) {
    let words: Vec<&str> = s.split_whitespace().collect();
    for w in words.windows(2) {
        let unit = w[1].trim_end_matches([',', ')', ';']);
        let unit = unit.strip_suffix("/s").unwrap_or(unit);
        if !["KiB", "MiB", "GiB", "TiB"].contains(&unit) {
            continue;
        }
        let n: f64 = w[0]
            .trim_start_matches('(')
            .parse()
            .unwrap_or_else(|_| panic!("{w:?} in {s:?}"));
        assert!((1.0..1024.0).contains(&n), "{} {} in {s:?}", w[0], w[1]);
    }
}

#[test]
fn summary_off_a_terminal_unless_quiet() {
    let t = tempfile::tempdir().unwrap();
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    let key = t.path().join("key");
    keygen(&key);
    let ovl = t.path().join("a.ovl");
    let o = run(&mut diff_cmd(&p, &key, &ovl));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    let want = format!(
        "wrote {}: {} overlay from {} launch VM in ",
        ovl.display(),
        bytes(std::fs::metadata(&ovl).unwrap().len()),
        bytes(size(&p.launch))
    );
    assert!(e.starts_with(&want), "{e:?} does not start with {want:?}");
    assert!(e.trim_end().ends_with("/s)"), "{e}");
    assert_human(&e);

    let apply = |out: &Path| {
        let mut c = Command::new(bin("dekimberlize"));
        c.arg("--base")
            .arg(&p.base)
            .arg("-i")
            .arg(&ovl)
            .arg("-k")
            .arg(&key)
            .arg("-o")
            .arg(out);
        c
    };
    let out = t.path().join("vm");
    let o = run(&mut apply(&out));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    let want = format!(
        "wrote {}: {} launch VM from {} of overlay in ",
        out.display(),
        bytes(size(&p.launch)),
        bytes(std::fs::metadata(&ovl).unwrap().len())
    );
    assert!(e.starts_with(&want), "{e:?} does not start with {want:?}");
    assert_human(&e);

    // -q: nothing at all.
    let o = run(diff_cmd(&p, &key, &t.path().join("b.ovl")).arg("-q"));
    assert_eq!(code(&o), 0);
    assert_eq!(stderr(&o), "");
    let o = run(apply(&t.path().join("vm2")).arg("-q"));
    assert_eq!(code(&o), 0);
    assert_eq!(stderr(&o), "");
}

/// `--progress=plain` lines: `[ELAPSED] STAGE: DONE of TOTAL (P%), RATE`.
fn plain_lines(e: &str) -> Vec<&str> {
    e.lines().filter(|l| l.starts_with('[')).collect()
}

#[test]
fn plain_progress_lines_for_logs() {
    let t = tempfile::tempdir().unwrap();
    let p = big_pair(t.path(), 64);
    let key = t.path().join("key");
    keygen(&key);
    let total = bytes(size(&p.base) + size(&p.launch));
    let t0 = Instant::now();
    let o = run(diff_cmd(&p, &key, &t.path().join("a.ovl")).arg("--progress=plain"));
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let e = stderr(&o);
    let lines = plain_lines(&e);
    assert!(!lines.is_empty(), "no progress lines in {e:?}");
    // At most one a second or so.
    assert!(
        lines.len() as f64 <= secs + 2.0,
        "{} lines in {secs:.1} s: {e}",
        lines.len()
    );
    for l in &lines {
        let (_, rest) = l.split_once("] ").unwrap();
        let (stage, counts) = rest.split_once(": ").unwrap_or((rest, ""));
        assert!(
            ["indexing base", "diffing"].contains(&stage),
            "stage {stage:?} in {l:?}"
        );
        assert!(counts.contains(&format!(" of {total} (")), "{l:?}");
        assert!(counts.ends_with("/s"), "{l:?}");
        assert_human(l);
    }
    // The summary still ends the run.
    assert!(e.lines().last().unwrap().starts_with("wrote "), "{e}");
}

/// Removes ANSI escape sequences.
fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\x1b' {
            if it.peek() == Some(&'[') {
                it.next();
                for c in it.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

#[test]
fn one_bar_with_a_fixed_total_on_a_terminal() {
    let t = tempfile::tempdir().unwrap();
    // Large enough that the diff lasts several of the bar's 100 ms draws
    // on a fast machine too (64 MiB took 0.19 s on CI: a single draw).
    let p = big_pair(t.path(), 320);
    let key = t.path().join("key");
    keygen(&key);
    let cmd = diff_cmd(&p, &key, &t.path().join("a.ovl"));
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_str().unwrap().to_string())
        .collect::<Vec<_>>()
        .join(" ");
    // `script` gives the command a pseudo-terminal; -f flushes each draw.
    let o = run(Command::new("script").args(["-qfec", &line, "/dev/null"]));
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stdout));
    let text = strip_ansi(&String::from_utf8_lossy(&o.stdout));
    // Every draw of the bar: "STAGE [====>   ] DONE/TOTAL RATE eta LEFT".
    let mut totals = Vec::new();
    let mut stages = Vec::new();
    for draw in text.split(['\r', '\n']) {
        let Some((head, tail)) = draw.split_once("] ") else {
            continue;
        };
        let Some((_, rest)) = tail.split_once('/') else {
            continue;
        };
        let total: Vec<&str> = rest.split_whitespace().take(2).collect();
        totals.push(total.join(" "));
        stages.push(head.split('[').next().unwrap().trim().to_string());
    }
    assert!(
        totals.len() >= 2,
        "fewer than two draws of the bar: {text:?}"
    );
    let want = bytes(size(&p.base) + size(&p.launch));
    assert!(
        totals.iter().all(|t| *t == want),
        "the total changed: {totals:?}, want {want}"
    );
    // One bar through the stages, its message always a stage's name.
    // (Which stages are drawn depends on their length against the
    // 100 ms poll: this small diff's last stage can be shorter.)
    assert!(
        stages
            .iter()
            .all(|s| ["indexing base", "diffing"].contains(&s.as_str())),
        "{stages:?}"
    );
    assert!(text.contains("wrote "), "no summary: {text:?}");
}

#[test]
fn build_sends_the_guest_output_to_a_log() {
    if !kvm() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let t = tempfile::tempdir().unwrap();
    let f = |n: &str| t.path().join(n);
    keygen(&f("key"));
    make_base(&f("base"), "32M", "4M");
    std::fs::write(f("install"), "print hello-from-install\nsleep 1500\n").unwrap();
    std::fs::write(f("resume"), "print hello-from-resume\n").unwrap();
    let build = |out: &str, extra: &[&str]| {
        run(Command::new(bin("kimberlize"))
            .arg("build")
            .args(extra)
            .arg("--base")
            .arg(f("base"))
            .arg("--install")
            .arg(f("install"))
            .arg("--resume")
            .arg(f("resume"))
            .arg("-k")
            .arg(f("key"))
            .arg("--guest-log")
            .arg(f("guest.log"))
            .arg("-o")
            .arg(f(out)))
    };
    // -q with plain progress: the guest's output only in the log, the
    // stages (the scripts' too) in the progress lines, no summary.
    let o = build("a.ovl", &["-q", "--progress=plain"]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let e = stderr(&o);
    assert!(!e.contains("hello-from"), "guest output on stderr: {e}");
    let stages: Vec<&str> = plain_lines(&e)
        .iter()
        .map(|l| l.split_once("] ").unwrap().1)
        .map(|r| r.split(':').next().unwrap())
        .collect();
    assert!(stages.contains(&"install script"), "{e}");
    assert!(!e.contains("wrote "), "{e}");
    let log = std::fs::read_to_string(f("guest.log")).unwrap();
    assert_eq!(log, "hello-from-install\nhello-from-resume\n");
    let mode = std::fs::metadata(f("guest.log"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    // A log: a second build appends; without -q its summary ends stderr.
    let o = build("b.ovl", &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.starts_with(&format!("wrote {}: ", f("b.ovl").display())),
        "{e}"
    );
    assert!(e.contains(" (guest "), "{e}");
    assert_eq!(
        std::fs::read_to_string(f("guest.log")).unwrap(),
        "hello-from-install\nhello-from-resume\n".repeat(2)
    );
}
