//! What the guest agent (and QMP) sends back (kimberley_qemu::qga::reply,
//! kimberley_qemu::qmp::reply): no input may panic, and what is accepted
//! stays in range. The first byte picks the parser; modes 0-5 take the
//! rest as JSON, mode 6 as script output for the line assembler, mode 7 as
//! the output of the reclaim script (kimberley_qemu::reclaim).
#![no_main]

use kimberley_qemu::qga::reply::{
    answer, exec_pid, exec_status, file_handle, file_read, is_sync_answer, Answer, Output,
    MAX_DESC, MAX_PID, UNKNOWN_STATUS,
};
use kimberley_qemu::qmp::reply::{migration, status, version, Migration, MAX_DETAIL};
use kimberley_qemu::reclaim::{self, MAX_FILE_SYSTEMS, MAX_NOTES, MAX_TEXT};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// Read sizes tried by mode 4 (the second byte picks one).
const ASKED: [usize; 8] = [0, 1, 2, 3, 4, 16, 255, 1 << 20];

/// Cut to `max` bytes (plus "...") and without control characters.
fn clean(s: &str, max: usize) -> bool {
    s.len() <= max + 3 && !s.chars().any(char::is_control)
}

fn json(mode: u8, bytes: &[u8]) {
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    match mode {
        0 => {
            let Value::Object(o) = v else { return };
            let id = o.get("id").and_then(Value::as_u64);
            let has_return = o.contains_key("return");
            let sync = o.get("return").and_then(Value::as_u64);
            for probe in [1, u64::MAX, id.unwrap_or(0), sync.unwrap_or(0)] {
                assert_eq!(is_sync_answer(&o, probe), sync == Some(probe));
                match answer(o.clone(), probe) {
                    Answer::Other => assert_ne!(id, Some(probe), "a matching id is an answer"),
                    Answer::Return(_) => assert!(id == Some(probe) && has_return),
                    Answer::Error(e) => {
                        assert!(id == Some(probe) && !has_return);
                        assert!(clean(&e.desc, MAX_DESC), "desc not cleaned: {:?}", e.desc);
                        assert!(e.class.as_deref().is_none_or(|c| clean(c, MAX_DESC)));
                    }
                }
            }
        }
        1 => {
            if let Ok(p) = exec_pid(&v) {
                assert!((1..=MAX_PID).contains(&p), "pid {p}");
            }
        }
        2 => {
            if let Ok(Some(s)) = exec_status(&v) {
                assert!(s == UNKNOWN_STATUS || (0..=255).contains(&s), "status {s}");
            }
        }
        3 => {
            if let Ok(h) = file_handle(&v) {
                assert!(h >= 1, "handle {h}");
            }
        }
        5 => {
            let _ = version(&v);
            if let Ok(s) = status(&v) {
                assert!(s.len() <= 64 && !s.chars().any(char::is_control));
            }
            if let Ok(Migration::Failed {
                detail: Some(d), ..
            }) = migration(&v)
            {
                assert!(clean(&d, MAX_DETAIL), "detail not cleaned: {d:?}");
            }
        }
        _ => {}
    }
}

fn file(sel: u8, bytes: &[u8]) {
    let asked = ASKED[usize::from(sel % 8)];
    let Ok(v) = serde_json::from_slice::<Value>(bytes) else {
        return;
    };
    if let Ok(r) = file_read(&v, asked) {
        assert!(r.data.len() <= asked, "{} bytes for {asked}", r.data.len());
        assert_eq!(v["count"].as_u64(), Some(r.data.len() as u64));
        assert_eq!(v["eof"].as_bool(), Some(r.eof));
    }
}

/// Mode 6: byte 1 is the line cap (4..=259), bytes 2-3 the output cap
/// (LE), byte 4 the size of the pieces the rest is fed in (1..=256).
fn output(data: &[u8]) {
    let [a, b, c, d, rest @ ..] = data else {
        return;
    };
    let max_line = usize::from(*a) + 4;
    let max_output = usize::from(u16::from_le_bytes([*b, *c]));
    let piece = usize::from(*d) + 1;
    let mut seen: Vec<String> = Vec::new();
    let mut on = |l: &str| seen.push(l.to_string());
    let mut o = Output::new(&mut on, max_line, max_output);
    for p in rest.chunks(piece) {
        o.feed(p);
        assert!(o.kept() <= max_output, "kept {} > {max_output}", o.kept());
    }
    o.finish();
    let kept = o.kept();
    let (lines, truncated) = o.into_lines();
    assert!(kept <= max_output, "kept {kept} > {max_output}");
    assert_eq!(kept, lines.iter().map(|l| l.len() + 1).sum::<usize>());
    for l in &seen {
        assert!(l.len() <= max_line, "a line of {} > {max_line}", l.len());
    }
    assert!(lines.len() <= seen.len());
    assert_eq!(lines[..], seen[..lines.len()], "kept lines are a prefix");
    assert_eq!(truncated, lines.len() < seen.len());
    // ASCII without carriage returns comes out exactly, cut into lines.
    if rest.is_ascii() && !rest.contains(&b'\r') {
        let joined: Vec<u8> = rest.iter().copied().filter(|&b| b != b'\n').collect();
        assert_eq!(seen.concat().as_bytes(), &joined[..]);
        let ends = rest.iter().filter(|&&b| b == b'\n').count();
        assert!(seen.len() >= ends);
    }
}

/// Mode 7: the rest as the reclaim script's output lines: bounded counts,
/// cleaned text.
fn reclaimed(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let lines: Vec<String> = text.split('\n').map(str::to_string).collect();
    let r = reclaim::parse(&lines, i32::from(data.first().copied().unwrap_or(0)));
    let _ = r.trimmed_bytes();
    let reclaim::Reclaimed::Done { trimmed, notes, .. } = r else {
        panic!("the QEMU guest's answer is always Done");
    };
    assert!(trimmed.len() <= MAX_FILE_SYSTEMS && notes.len() <= MAX_NOTES);
    for t in &trimmed {
        assert!(clean(&t.mount, MAX_TEXT), "mount {:?}", t.mount);
        assert!(t.error.as_deref().is_none_or(|e| clean(e, MAX_TEXT)));
    }
    for n in &notes {
        // A note is a cleaned mount, a fixed text and a cleaned message.
        assert!(n.len() <= 2 * MAX_TEXT + 64 && !n.chars().any(char::is_control), "{n:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 8 {
        4 => {
            let Some((&sel, json)) = rest.split_first() else {
                return;
            };
            file(sel, json);
        }
        6 => output(rest),
        7 => reclaimed(rest),
        m => json(m, rest),
    }
});
