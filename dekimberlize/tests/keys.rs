//! Keys and passphrases from the command line: the text form `keygen`
//! writes, `-k -`, malformed key files (exit 2 from every tool), warnings
//! for files others can read, and passphrases asked on a terminal.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::*;
use kimberley_cli::exit;
use kimberley_formats::crypto::keyfile;
use kimberley_formats::testkit::{make_pair, Pair, PairSpec};

fn os(s: &str) -> &std::ffi::OsStr {
    std::ffi::OsStr::new(s)
}

/// Runs a tool with `input` on stdin.
fn with_stdin(name: &str, args: &[&std::ffi::OsStr], input: &[u8]) -> std::process::Output {
    let mut c = Command::new(bin(name))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A tool that exits without reading all of it (a refusal) closes the
    // pipe: its exit status says what happened, not the write.
    if let Err(e) = c.stdin.take().unwrap().write_all(input) {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    c.wait_with_output().unwrap()
}

fn diff_args<'a>(p: &'a Pair, ovl: &'a Path) -> Vec<&'a std::ffi::OsStr> {
    vec![
        os("diff"),
        os("-q"),
        os("--base"),
        p.base.as_os_str(),
        os("--launch"),
        p.launch.as_os_str(),
        os("-o"),
        ovl.as_os_str(),
    ]
}

#[test]
fn keygen_writes_the_text_form_privately_and_to_stdout() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("k");
    keygen(&key);
    let bytes = std::fs::read(&key).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        text.starts_with("KIMBERLEY-KEY-1") && text.ends_with('\n'),
        "{text:?}"
    );
    assert_eq!(text.len(), keyfile::TEXT_LEN + 1);
    keyfile::parse(&bytes).unwrap();
    let mode = std::fs::metadata(&key).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    // Never replaces a key.
    let o = tool!("kimberlize", "keygen", "-o", &key);
    assert_eq!(code(&o), exit::EXISTS as i32, "{}", stderr(&o));
    assert_eq!(std::fs::read(&key).unwrap(), bytes);
    // `-o -`: one line on stdout, a different key, nothing written.
    let o = tool!("kimberlize", "keygen", "-o", "-");
    ok(o.clone());
    let line = String::from_utf8(o.stdout).unwrap();
    assert_eq!(line.lines().count(), 1);
    let k2 = keyfile::parse(line.as_bytes()).unwrap();
    assert_ne!(k2, keyfile::parse(&bytes).unwrap());
    assert!(!t.path().join("-").exists());
    // A stream that exists (here /dev/null) is written in place, not
    // refused as existing.
    ok(tool!("kimberlize", "keygen", "-o", "/dev/null"));
}

#[test]
fn text_raw_and_stdin_keys_are_the_same_key() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let raw = t.path().join("raw");
    let k = keyfile::parse(&std::fs::read(&key).unwrap()).unwrap();
    write_private(&raw, k);
    // Sealed with the key from stdin, opened with the raw file, and with
    // the text file (lower case, no newline) from stdin.
    let ovl = t.path().join("a.ovl");
    let mut args = diff_args(&p, &ovl);
    args.extend([os("-k"), os("-")]);
    let text = std::fs::read(&key).unwrap();
    let o = with_stdin("kimberlize", &args, &text);
    assert!(o.status.success(), "{}", stderr(&o));
    ok(tool!("dekimberlize", "verify", "-i", &ovl, "-k", &raw));
    let lower = String::from_utf8(text).unwrap().trim_end().to_lowercase();
    let o = with_stdin(
        "dekimberlize",
        &[os("verify"), os("-i"), ovl.as_os_str(), os("-k"), os("-")],
        lower.as_bytes(),
    );
    assert!(o.status.success(), "{}", stderr(&o));
    // stdin cannot carry both the key and the overlay.
    let o = with_stdin(
        "dekimberlize",
        &[os("verify"), os("-k"), os("-")],
        lower.as_bytes(),
    );
    assert_eq!(code(&o), exit::USAGE as i32, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stdin cannot carry both"),
        "{}",
        stderr(&o)
    );
    let o = with_stdin(
        "kimberlize",
        &[os("inspect"), os("-"), os("-k"), os("-")],
        lower.as_bytes(),
    );
    assert_eq!(code(&o), exit::USAGE as i32, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("stdin cannot carry both"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn malformed_key_files_are_usage_errors_in_every_tool() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let ovl = t.path().join("a.ovl");
    ok(diff(&p.base, &p.launch, &ovl, &[os("-k"), key.as_os_str()]));
    let good = std::fs::read_to_string(&key).unwrap();
    let mut typo = good.clone().into_bytes();
    typo[20] = if typo[20] == b'Q' { b'P' } else { b'Q' };
    let bad: Vec<(&str, Vec<u8>, &str)> = vec![
        ("short.key", vec![7; 31], "31 bytes"),
        ("typo.key", typo, "checksum mismatch"),
        (
            "two-lines.key",
            format!("{good}{good}").into_bytes(),
            "invalid character",
        ),
    ];
    for (name, bytes, needle) in bad {
        let k = t.path().join(name);
        write_private(&k, bytes);
        let out = t.path().join(format!("out-{name}"));
        let runs = [
            diff(&p.base, &p.launch, &out, &[os("-k"), k.as_os_str()]),
            tool!("kimberlize", "inspect", &ovl, "-k", &k),
            tool!(
                "dekimberlize",
                "--base",
                &p.base,
                "-i",
                &ovl,
                "-k",
                &k,
                "-o",
                &out
            ),
            tool!("dekimberlize", "verify", "-i", &ovl, "-k", &k),
            tool!(
                "vmigrate",
                "send",
                "--control",
                t.path().join("no.sock"),
                "--to",
                "127.0.0.1:1",
                "-k",
                &k
            ),
            tool!(
                "vmigrate",
                "recv",
                "--listen",
                "127.0.0.1:0",
                "--key-file",
                &k,
                "-o",
                &out
            ),
        ];
        for o in runs {
            let e = stderr(&o);
            assert_eq!(code(&o), exit::USAGE as i32, "{name}: {e}");
            assert!(e.starts_with("error: key file ") && e.contains(name), "{e}");
            assert!(e.contains(needle), "{e} lacks {needle:?}");
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(!out.exists());
        }
    }
}

#[test]
fn secret_files_others_can_read_get_one_warning() {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup(t.path());
    let pw = t.path().join("pw");
    std::fs::write(&pw, "a passphrase\n").unwrap();
    let ovl = t.path().join("a.ovl");
    let sealed = t.path().join("p.ovl");
    for (mode, warns) in [
        (0o600, false),
        (0o640, true),
        (0o604, true),
        (0o620, true),
        (0o400, false),
    ] {
        for f in [&key, &pw] {
            std::fs::set_permissions(f, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let _ = std::fs::remove_file(&ovl);
        let o = diff(&p.base, &p.launch, &ovl, &[os("-k"), key.as_os_str()]);
        let e = stderr(&o);
        assert!(o.status.success(), "{e}");
        let want = format!(
            "warning: key file {} is readable or writable by group or others (mode {mode:04o})",
            key.display()
        );
        if warns {
            assert_eq!(e.lines().count(), 1, "{e}");
            assert!(e.starts_with(&want), "{e}");
        } else {
            assert_eq!(e, "", "mode {mode:o}");
        }
        let _ = std::fs::remove_file(&sealed);
        let o = diff(
            &p.base,
            &p.launch,
            &sealed,
            &[os("--passphrase-file"), pw.as_os_str()],
        );
        let e = stderr(&o);
        assert!(o.status.success(), "{e}");
        assert_eq!(
            e.lines()
                .filter(|l| l.starts_with("warning: passphrase file"))
                .count(),
            usize::from(warns),
            "{e}"
        );
        assert_eq!(e.lines().count(), usize::from(warns), "{e}");
    }
}

/// A command under `script` (a pseudo-terminal as its stdin, stdout and
/// stderr): answers each prompt as it appears, returns the exit code and
/// everything the terminal showed.
fn on_terminal(cmd: &str, answers: &[(&str, &str)]) -> (i32, String) {
    let mut child = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let mut seen = String::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut pos = 0;
    for (prompt, answer) in answers {
        // Answer only once the prompt is shown: echo is off by then.
        while !seen[pos..].contains(prompt) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(_) => panic!("no prompt {prompt:?}; the terminal showed {seen:?}"),
            }
        }
        pos = seen.rfind(prompt).unwrap() + prompt.len();
        // As a person does, read the prompt before typing: the prompt is
        // written just before echo is turned off, so an answer typed
        // within microseconds of it would be echoed (as by sudo or ssh).
        std::thread::sleep(Duration::from_millis(500));
        stdin.write_all(format!("{answer}\r").as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    while let Ok(b) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        seen.push_str(&String::from_utf8_lossy(&b));
    }
    let status = child.wait().unwrap();
    (status.code().expect("exited"), seen)
}

#[test]
fn passphrases_are_asked_on_a_terminal_without_echo() {
    let t = tempfile::tempdir().unwrap();
    let p = make_pair(t.path(), &PairSpec::default()).unwrap();
    let ovl = t.path().join("p.ovl");
    let diff = |extra: &str| {
        format!(
            "{} diff -q --base {} --launch {} -o {} {extra}",
            bin("kimberlize").display(),
            p.base.display(),
            p.launch.display(),
            ovl.display()
        )
    };
    // Sealing asks twice; different answers are refused and write nothing.
    let (c, seen) = on_terminal(
        &diff("--passphrase"),
        &[
            ("passphrase: ", "secret one"),
            ("passphrase (again): ", "secret two"),
        ],
    );
    assert_eq!(c, exit::USAGE as i32, "{seen}");
    assert!(seen.contains("error: the passphrases differ"), "{seen}");
    assert!(!ovl.exists());
    let (c, seen) = on_terminal(
        &diff("--passphrase-file -"),
        &[
            ("passphrase: ", "secret one"),
            ("passphrase (again): ", "secret one"),
        ],
    );
    assert_eq!(c, 0, "{seen}");
    assert!(!seen.contains("secret one"), "echoed: {seen:?}");
    // Opening asks once, from the terminal even when stdin is not it.
    let pw = t.path().join("pw");
    write_private(&pw, "secret one\n");
    ok(tool!(
        "dekimberlize",
        "verify",
        "-i",
        &ovl,
        "--passphrase-file",
        &pw
    ));
    let verify = format!(
        "{} verify -i {} --passphrase",
        bin("dekimberlize").display(),
        ovl.display()
    );
    let (c, seen) = on_terminal(&verify, &[("passphrase: ", "secret one")]);
    assert_eq!(c, 0, "{seen}");
    assert!(seen.contains("every segment authenticated"), "{seen}");
    assert_eq!(seen.matches("passphrase").count(), 1, "{seen}");
    let (c, seen) = on_terminal(&verify, &[("passphrase: ", "secret two")]);
    assert_eq!(c, exit::AUTH as i32, "{seen}");
    // Without a terminal, --passphrase is a usage error, not a hang.
    let o = tool!("dekimberlize", "verify", "-i", &ovl, "--passphrase");
    assert_eq!(code(&o), exit::USAGE as i32, "{}", stderr(&o));
    assert!(stderr(&o).contains("--passphrase-file"), "{}", stderr(&o));
}
