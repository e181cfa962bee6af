//! Giving back freed blocks and pages before a suspend, in a Linux guest:
//! the `/bin/sh` script run through the agent and the reading of what it
//! printed (pure; the guest, and so its output, is untrusted).

use kimberley_machine::Reclaim;
/// What [`parse`] returns (the seam's types).
pub use kimberley_machine::{Reclaimed, Trimmed};

/// The first field of every line the script reports on.
const TAG: &str = "kimberley-reclaim";
/// File systems reported at most (more lines are ignored).
pub const MAX_FILE_SYSTEMS: usize = 64;
/// Notes kept at most.
pub const MAX_NOTES: usize = 16;
/// Longest mount point or note kept (longer ones are cut).
pub const MAX_TEXT: usize = 256;

/// The script for `what`: `sync`; with `trim`, `fstrim -v` on each mounted
/// file system on a block device (once per device, read-write ones, from
/// `/proc/mounts`; busybox and util-linux `fstrim` both); with
/// `drop_caches`, `sync` and `echo 3 > /proc/sys/vm/drop_caches`. It
/// reports one tab-separated line per step, prefixed with [`TAG`]:
/// `trim STATUS MOUNT OUTPUT`, `dropped`, `note TEXT`.
pub fn script(what: Reclaim) -> String {
    let mut s = String::from("sync\n");
    if what.trim {
        s.push_str(
            r#"if command -v fstrim >/dev/null 2>&1; then
    seen=' '
    while read -r dev mnt fstype opts rest; do
        case $fstype in ext2|ext3|ext4|xfs|btrfs|f2fs|vfat|exfat|ntfs3|jfs|nilfs2) ;; *) [ -b "$dev" ] || continue ;; esac
        case ",$opts," in *,ro,*) continue ;; esac
        case $seen in *" $dev "*) continue ;; esac
        seen="$seen$dev "
        out=$(fstrim -v "$(printf '%b' "$mnt")" 2>&1)
        st=$?
        printf 'kimberley-reclaim\ttrim\t%s\t%s\t%s\n' "$st" "$mnt" "$(printf '%s' "$out" | tr '\t\n' '  ')"
    done </proc/mounts
else
    printf 'kimberley-reclaim\tnote\tno fstrim in the guest: its file systems were not trimmed\n'
fi
"#,
        );
    }
    if what.drop_caches {
        s.push_str(
            r#"sync
if echo 3 >/proc/sys/vm/drop_caches 2>/dev/null; then
    printf 'kimberley-reclaim\tdropped\n'
else
    printf 'kimberley-reclaim\tnote\tthe guest refused to drop its caches (/proc/sys/vm/drop_caches)\n'
fi
"#,
        );
    }
    s
}

/// What the script's output `lines` say (lines without [`TAG`] are
/// ignored; so are lines past the limits). `status` is the script's: a
/// failed script is a note.
pub fn parse(lines: &[String], status: i32) -> Reclaimed {
    let mut trimmed = Vec::new();
    let mut notes = Vec::new();
    let mut caches_dropped = false;
    let note = |notes: &mut Vec<String>, n: String| {
        if notes.len() < MAX_NOTES {
            notes.push(n);
        }
    };
    for line in lines {
        let mut f = line.split('\t');
        if f.next() != Some(TAG) {
            continue;
        }
        match f.next() {
            Some("trim") if trimmed.len() < MAX_FILE_SYSTEMS => {
                let (Some(st), Some(mount), out) = (f.next(), f.next(), f.next().unwrap_or(""))
                else {
                    continue;
                };
                let mount = clean(mount);
                let out = out.trim();
                if st == "0" {
                    trimmed.push(Trimmed {
                        mount,
                        bytes: bytes_trimmed(out),
                        error: None,
                    });
                } else {
                    let why = if out.is_empty() {
                        format!("fstrim failed with status {}", clean(st))
                    } else {
                        clean(out)
                    };
                    note(&mut notes, format!("{mount} was not trimmed: {why}"));
                    trimmed.push(Trimmed {
                        mount,
                        bytes: None,
                        error: Some(why),
                    });
                }
            }
            Some("dropped") => caches_dropped = true,
            Some("note") => note(&mut notes, clean(f.next().unwrap_or(""))),
            _ => {}
        }
    }
    if status != 0 {
        note(
            &mut notes,
            format!("the guest's reclaim script ended with status {status}"),
        );
    }
    Reclaimed::Done {
        trimmed,
        caches_dropped,
        notes,
    }
}

/// The byte count in `fstrim -v`'s line: busybox says `/mnt: 123 bytes
/// trimmed`, util-linux `/mnt: 1.2 MiB (1234567 bytes) trimmed`. The number
/// is the token before the first `bytes`.
fn bytes_trimmed(out: &str) -> Option<u64> {
    let mut prev = None;
    for tok in out.split_whitespace() {
        if tok.starts_with("bytes") {
            return prev
                .map(|p: &str| p.trim_start_matches('('))
                .and_then(|p| p.parse().ok());
        }
        prev = Some(tok);
    }
    None
}

/// Guest text made printable (control characters escaped), cut to
/// [`MAX_TEXT`] bytes: the agent's own rule for what the guest says.
fn clean(s: &str) -> String {
    crate::qga::reply::clean(s, MAX_TEXT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(s: &[&str]) -> Vec<String> {
        s.iter().map(|l| l.to_string()).collect()
    }

    fn done(r: Reclaimed) -> (Vec<Trimmed>, bool, Vec<String>) {
        match r {
            Reclaimed::Done {
                trimmed,
                caches_dropped,
                notes,
            } => (trimmed, caches_dropped, notes),
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn busybox_and_util_linux_outputs_are_read() {
        let (t, dropped, notes) = done(parse(
            &lines(&[
                "some output of its own",
                "kimberley-reclaim\ttrim\t0\t/mnt/app\t/mnt/app: 50331648 bytes trimmed",
                "kimberley-reclaim\ttrim\t0\t/\t/: 1.2 GiB (1288490188 bytes) trimmed on /dev/vda",
                "kimberley-reclaim\ttrim\t1\t/boot\tfstrim: /boot: the discard operation is not supported",
                "kimberley-reclaim\ttrim\t0\t/odd\t/odd: trimmed",
                "kimberley-reclaim\tdropped",
            ]),
            0,
        ));
        assert_eq!(
            t.iter().map(|t| t.bytes).collect::<Vec<_>>(),
            [Some(50331648), Some(1288490188), None, None]
        );
        assert_eq!(t[1].mount, "/");
        assert!(t[2].error.as_deref().unwrap().contains("not supported"));
        assert!(dropped);
        assert_eq!(
            notes,
            ["/boot was not trimmed: fstrim: /boot: the discard operation is not supported"]
        );
        let r = parse(
            &lines(&["kimberley-reclaim\ttrim\t0\t/\t/: 7 bytes trimmed"]),
            0,
        );
        assert_eq!(r.trimmed_bytes(), Some(7));
    }

    #[test]
    fn no_fstrim_and_a_failed_script_are_notes() {
        let (t, dropped, notes) = done(parse(
            &lines(&["kimberley-reclaim\tnote\tno fstrim in the guest: x"]),
            2,
        ));
        assert!(t.is_empty() && !dropped);
        assert_eq!(notes.len(), 2, "{notes:?}");
        assert!(notes[1].contains("status 2"));
    }

    /// A hostile guest: huge numbers, control characters, long text, more
    /// lines than kept, malformed lines. Nothing panics, everything is
    /// bounded.
    #[test]
    fn hostile_output_is_bounded() {
        let mut l = vec![
            "kimberley-reclaim\ttrim\t0\t/a\t/a: 99999999999999999999999 bytes trimmed".to_string(),
            "kimberley-reclaim\ttrim\t0\t/b\t/b: -5 bytes trimmed".into(),
            "kimberley-reclaim\ttrim\t0\t/c\t/c: 18446744073709551615 bytes".into(),
            "kimberley-reclaim\ttrim\t0\t/d\t/d: 18446744073709551615 bytes".into(),
            "kimberley-reclaim\ttrim".into(),
            "kimberley-reclaim\ttrim\t0".into(),
            "kimberley-reclaim".into(),
            "kimberley-reclaim\tbogus\t1".into(),
            format!(
                "kimberley-reclaim\ttrim\t9\t/e\x1b[2J{}",
                "x".repeat(100_000)
            ),
            format!("kimberley-reclaim\tnote\t{}", "\u{7}é".repeat(50_000)),
        ];
        for i in 0..1000 {
            l.push(format!("kimberley-reclaim\ttrim\t0\t/m{i}\t1 bytes"));
            l.push(format!("kimberley-reclaim\tnote\tn{i}"));
        }
        let r = parse(&l, 0);
        assert_eq!(r.trimmed_bytes(), Some(u64::MAX));
        let (t, _, notes) = done(r);
        assert_eq!(t.len(), MAX_FILE_SYSTEMS);
        assert_eq!(notes.len(), MAX_NOTES);
        assert_eq!(t[0].bytes, None);
        assert_eq!(t[1].bytes, None);
        for n in &notes {
            assert!(n.len() <= 2 * MAX_TEXT + 64, "{}", n.len());
            assert!(!n.chars().any(char::is_control), "{n:?}");
        }
        assert!(t.iter().all(|t| t.mount.len() <= MAX_TEXT + 4));
    }

    #[test]
    fn the_script_asks_only_what_is_asked() {
        let both = script(Reclaim {
            trim: true,
            drop_caches: true,
        });
        assert!(both.starts_with("sync\n"));
        assert!(both.contains("fstrim -v") && both.contains("drop_caches"));
        let t = script(Reclaim {
            trim: true,
            drop_caches: false,
        });
        assert!(t.contains("fstrim") && !t.contains("drop_caches"));
        let d = script(Reclaim {
            trim: false,
            drop_caches: true,
        });
        assert!(!d.contains("fstrim") && d.contains("drop_caches"));
    }
}
