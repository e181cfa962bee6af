//! Pure interpretation of what the guest agent (untrusted) sends back: the reply envelope, `guest-exec`, `guest-exec-status`, `guest-file-open`, `guest-file-read`, and script output cut into bounded lines.
//!
//! Nothing here does I/O and nothing panics on any input (fuzzed by
//! `fuzz/fuzz_targets/guest_agent.rs`). Every value the guest controls is
//! checked against the range the protocol allows on a Linux guest and
//! refused with a [`Refused`] otherwise.

use base64ct::{Base64, Encoding};
use serde_json::{Map, Value};

/// Longest agent error description handed on (longer ones are cut).
pub const MAX_DESC: usize = 1024;
/// Largest pid accepted (`pid_t` is an `i32`).
pub const MAX_PID: i64 = i32::MAX as i64;
/// Largest signal number accepted (`WTERMSIG` is 7 bits).
pub const MAX_SIGNAL: i64 = 127;
/// Largest exit code accepted (`WEXITSTATUS` is 8 bits).
pub const MAX_EXIT_CODE: i64 = 255;
/// The status of a script that exited with neither an exit code nor a
/// signal reported.
pub const UNKNOWN_STATUS: i32 = -1;

/// Why a reply was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Why {
    /// The `return` value is not a JSON object.
    #[error("not an object")]
    NotAnObject,
    /// A member the command must return is missing.
    #[error("no {0}")]
    Missing(&'static str),
    /// A member has the wrong JSON type.
    #[error("{0} has the wrong type")]
    WrongType(&'static str),
    /// An integer member outside its range.
    #[error("{field} {value} is out of range {min}..={max}")]
    OutOfRange {
        /// The member.
        field: &'static str,
        /// Its value (as sent, possibly shortened).
        value: String,
        /// Smallest accepted.
        min: i64,
        /// Largest accepted.
        max: i64,
    },
    /// `buf-b64` is longer than what `count` bytes asked for can encode to.
    #[error("buf-b64 of {len} characters for at most {asked} bytes")]
    TooLong {
        /// Its length.
        len: usize,
        /// The bytes asked for.
        asked: usize,
    },
    /// `buf-b64` is not (padded, standard) base64.
    #[error("bad base64: {0}")]
    BadBase64(String),
    /// `count` is not the length of the decoded `buf-b64`.
    #[error("count {count} but {decoded} bytes in buf-b64")]
    CountMismatch {
        /// The count sent.
        count: u64,
        /// The bytes decoded.
        decoded: usize,
    },
}

/// A reply to `command` that does not make sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{command}: {why}")]
pub struct Refused {
    /// The command answered.
    pub command: &'static str,
    /// What is wrong with the answer.
    pub why: Why,
}

fn refuse(command: &'static str, why: Why) -> Refused {
    Refused { command, why }
}

/// An `error` reply: its class and description (cut to [`MAX_DESC`]
/// bytes, control characters escaped), as far as it has them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorReply {
    /// `error.class`, if it is a string (cleaned like the description).
    pub class: Option<String>,
    /// `error.desc`, or "an error without a description".
    pub desc: String,
}

/// What one received object is, for a command sent with `id`.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Not the answer to this command (another id, an event, a late
    /// answer): skipped.
    Other,
    /// Its `return` value.
    Return(Value),
    /// An error (anything with the id and no `return`).
    Error(ErrorReply),
}

/// Interprets `obj` as the answer to the command sent with `id`: the
/// object must carry that id as an unsigned integer; `return` wins over
/// `error`; an object with neither is an error without a description.
pub fn answer(mut obj: Map<String, Value>, id: u64) -> Answer {
    if obj.get("id").and_then(Value::as_u64) != Some(id) {
        return Answer::Other;
    }
    if let Some(r) = obj.remove("return") {
        return Answer::Return(r);
    }
    let err = obj.get("error");
    let text = |k: &str| {
        err.and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .map(|s| clean(s, MAX_DESC))
    };
    Answer::Error(ErrorReply {
        class: text("class"),
        desc: text("desc").unwrap_or_else(|| "an error without a description".to_string()),
    })
}

/// True if `obj` is the agent's answer to `guest-sync-delimited` with `id`.
pub fn is_sync_answer(obj: &Map<String, Value>, id: u64) -> bool {
    obj.get("return").and_then(Value::as_u64) == Some(id)
}

/// `s` cut to at most `max` bytes (at a character boundary, "..."
/// appended when cut) with control characters escaped, so that what the
/// guest says cannot move the user's cursor or fill the screen.
pub(crate) fn clean(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let piece: String = if c.is_control() {
            c.escape_default().collect()
        } else {
            c.to_string()
        };
        if out.len().saturating_add(piece.len()) > max {
            out.push_str("...");
            break;
        }
        out.push_str(&piece);
    }
    out
}

fn object<'a>(command: &'static str, v: &'a Value) -> Result<&'a Map<String, Value>, Refused> {
    v.as_object().ok_or(refuse(command, Why::NotAnObject))
}

/// A short rendering of an out-of-range value for an error message.
fn shown(v: &Value) -> String {
    let mut s = v.to_string();
    if s.len() > 40 {
        let mut cut = 40;
        while cut > 0 && !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

/// Member `field` of `o`: an integer in `min..=max`.
fn int_in(
    command: &'static str,
    o: &Map<String, Value>,
    field: &'static str,
    min: i64,
    max: i64,
) -> Result<Option<i64>, Refused> {
    let Some(v) = o.get(field) else {
        return Ok(None);
    };
    if !(v.is_i64() || v.is_u64()) {
        return Err(refuse(command, Why::WrongType(field)));
    }
    match v.as_i64() {
        Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
        _ => Err(refuse(
            command,
            Why::OutOfRange {
                field,
                value: shown(v),
                min,
                max,
            },
        )),
    }
}

fn required<T>(command: &'static str, field: &'static str, v: Option<T>) -> Result<T, Refused> {
    v.ok_or(refuse(command, Why::Missing(field)))
}

/// `guest-exec`'s return: the pid of the started process (1..=[`MAX_PID`]).
pub fn exec_pid(ret: &Value) -> Result<i64, Refused> {
    const C: &str = "guest-exec";
    let o = object(C, ret)?;
    required(C, "pid", int_in(C, o, "pid", 1, MAX_PID)?)
}

/// `guest-file-open`'s return: the handle (a positive integer).
pub fn file_handle(ret: &Value) -> Result<i64, Refused> {
    const C: &str = "guest-file-open";
    // The agent returns the handle itself, not an object.
    if !(ret.is_i64() || ret.is_u64()) {
        return Err(refuse(C, Why::WrongType("handle")));
    }
    match ret.as_i64() {
        Some(h) if h >= 1 => Ok(h),
        _ => Err(refuse(
            C,
            Why::OutOfRange {
                field: "handle",
                value: shown(ret),
                min: 1,
                max: i64::MAX,
            },
        )),
    }
}

/// `guest-exec-status`'s return: `None` while the process runs, else its
/// status: the exit code (0..=255), or 128 + N for a process killed by
/// signal N (1..=127; a signal wins over an exit code), or
/// [`UNKNOWN_STATUS`] when the agent reports neither.
pub fn exec_status(ret: &Value) -> Result<Option<i32>, Refused> {
    const C: &str = "guest-exec-status";
    let o = object(C, ret)?;
    let exited = required(C, "exited", o.get("exited"))?;
    let exited = exited
        .as_bool()
        .ok_or(refuse(C, Why::WrongType("exited")))?;
    if !exited {
        return Ok(None);
    }
    let signal = int_in(C, o, "signal", 1, MAX_SIGNAL)?;
    let code = int_in(C, o, "exitcode", 0, MAX_EXIT_CODE)?;
    let status = match (signal, code) {
        (Some(sig), _) => 128 + sig,
        (None, Some(code)) => code,
        (None, None) => i64::from(UNKNOWN_STATUS),
    };
    // In range by the checks above (at most 128 + 127).
    Ok(Some(i32::try_from(status).unwrap_or(UNKNOWN_STATUS)))
}

/// What one `guest-file-read` returned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileRead {
    /// The bytes read.
    pub data: Vec<u8>,
    /// The agent saw the end of the file.
    pub eof: bool,
}

/// `guest-file-read`'s return for a read of at most `asked` bytes:
/// `buf-b64` no longer than `asked` bytes encode to (checked before
/// decoding), standard padded base64, `count` equal to the decoded length,
/// `eof` a boolean.
pub fn file_read(ret: &Value, asked: usize) -> Result<FileRead, Refused> {
    const C: &str = "guest-file-read";
    let o = object(C, ret)?;
    let count = required(C, "count", o.get("count"))?;
    let count = count.as_u64().ok_or_else(|| {
        if count.is_i64() {
            refuse(
                C,
                Why::OutOfRange {
                    field: "count",
                    value: shown(count),
                    min: 0,
                    max: i64::MAX,
                },
            )
        } else {
            refuse(C, Why::WrongType("count"))
        }
    })?;
    let b64 = required(C, "buf-b64", o.get("buf-b64"))?;
    let b64 = b64.as_str().ok_or(refuse(C, Why::WrongType("buf-b64")))?;
    let eof = required(C, "eof", o.get("eof"))?;
    let eof = eof.as_bool().ok_or(refuse(C, Why::WrongType("eof")))?;
    let max_len = asked.div_ceil(3).saturating_mul(4);
    if b64.len() > max_len {
        return Err(refuse(
            C,
            Why::TooLong {
                len: b64.len(),
                asked,
            },
        ));
    }
    let data = Base64::decode_vec(b64).map_err(|e| refuse(C, Why::BadBase64(e.to_string())))?;
    if u64::try_from(data.len()).ok() != Some(count) || data.len() > asked {
        return Err(refuse(
            C,
            Why::CountMismatch {
                count,
                decoded: data.len(),
            },
        ));
    }
    Ok(FileRead { data, eof })
}

/// Script output cut into lines: each handed to `on_line` as it completes
/// (split at `max_line` bytes; a trailing `\r` dropped; invalid UTF-8
/// replaced), and kept while the kept lines, each counted with its line
/// end, fit in `max_output` bytes. Once one is left out, no later line is
/// kept: the kept lines are always a prefix of those handed on.
pub struct Output<'a> {
    on_line: &'a mut dyn FnMut(&str),
    max_line: usize,
    max_output: usize,
    partial: Vec<u8>,
    lines: Vec<String>,
    kept: usize,
    truncated: bool,
}

impl<'a> Output<'a> {
    /// An empty output; `max_line` is raised to 4 if lower (the longest
    /// character must fit in a line).
    pub fn new(on_line: &'a mut dyn FnMut(&str), max_line: usize, max_output: usize) -> Self {
        Output {
            on_line,
            max_line: max_line.max(4),
            max_output,
            partial: Vec::new(),
            lines: Vec::new(),
            kept: 0,
            truncated: false,
        }
    }

    /// Takes the next bytes of output.
    pub fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.emit();
            } else {
                self.partial.push(b);
                if self.partial.len() >= self.max_line {
                    self.emit();
                }
            }
        }
    }

    fn emit(&mut self) {
        if self.partial.last() == Some(&b'\r') {
            self.partial.pop();
        }
        let whole = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        // Replacement characters make invalid bytes longer: cut again at
        // character boundaries so that no line exceeds the cap.
        let mut rest = whole.as_str();
        loop {
            let mut cut = rest.len().min(self.max_line);
            // Ends at 1 or more: `max_line` >= 4 holds a whole character.
            while cut > 0 && !rest.is_char_boundary(cut) {
                cut -= 1;
            }
            if cut == 0 && !rest.is_empty() {
                cut = rest.chars().next().map_or(rest.len(), char::len_utf8);
            }
            let (line, after) = rest.split_at(cut);
            self.take(line);
            rest = after;
            if rest.is_empty() {
                break;
            }
        }
    }

    fn take(&mut self, line: &str) {
        (self.on_line)(line);
        let grown = self.kept.saturating_add(line.len()).saturating_add(1);
        if !self.truncated && grown <= self.max_output {
            self.kept = grown;
            self.lines.push(line.to_string());
        } else {
            self.truncated = true;
        }
    }

    /// Hands on what is left of a last line without a line end.
    pub fn finish(&mut self) {
        if !self.partial.is_empty() {
            self.emit();
        }
    }

    /// The lines kept so far.
    pub fn lines(&self) -> &[String] {
        &self.lines
    }

    /// Bytes kept: the kept lines' lengths plus one line end each.
    pub fn kept(&self) -> usize {
        self.kept
    }

    /// True if a line was left out of [`Output::lines`].
    pub fn truncated(&self) -> bool {
        self.truncated
    }

    /// The kept lines and whether any was left out.
    pub fn into_lines(self) -> (Vec<String>, bool) {
        (self.lines, self.truncated)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const MAX_LINE: usize = crate::qga::MAX_LINE;
    const MAX_OUTPUT: usize = crate::qga::MAX_OUTPUT;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(o) => o,
            _ => unreachable!("a test object"),
        }
    }

    fn why<T: std::fmt::Debug>(r: Result<T, Refused>) -> Why {
        r.unwrap_err().why
    }

    #[test]
    fn output_is_cut_into_bounded_lines() {
        let mut seen = Vec::new();
        let mut on = |l: &str| seen.push(l.len());
        let mut o = Output::new(&mut on, MAX_LINE, MAX_OUTPUT);
        o.feed(b"a\r\nbb\n");
        o.feed(&vec![b'x'; MAX_LINE + 10]);
        o.feed(b"\nlast");
        o.finish();
        let (lines, truncated) = o.into_lines();
        assert_eq!(seen, vec![1, 2, MAX_LINE, 10, 4]);
        assert_eq!(lines[0], "a");
        assert_eq!(lines[4], "last");
        assert!(!truncated);
    }

    #[test]
    fn kept_output_is_capped() {
        let mut n = 0usize;
        let mut on = |_: &str| n += 1;
        let mut o = Output::new(&mut on, MAX_LINE, MAX_OUTPUT);
        let line = vec![b'y'; 1023];
        for _ in 0..(MAX_OUTPUT / 1024 + 100) {
            o.feed(&line);
            o.feed(b"\n");
        }
        assert!(o.truncated());
        assert!(o.kept() <= MAX_OUTPUT);
        let kept = o.lines().len();
        drop(o);
        assert_eq!(n, MAX_OUTPUT / 1024 + 100);
        assert_eq!(kept, MAX_OUTPUT / 1024);
    }

    #[test]
    fn invalid_utf8_does_not_make_a_line_longer_than_the_cap() {
        // 8 invalid bytes become 8 replacement characters of 3 bytes each.
        let mut seen = Vec::new();
        let mut on = |l: &str| seen.push(l.to_string());
        let mut o = Output::new(&mut on, 8, 1 << 10);
        o.feed(&[0xff; 8]);
        o.finish();
        drop(o);
        assert!(seen.iter().all(|l| l.len() <= 8), "{seen:?}");
        assert_eq!(seen.concat(), "\u{fffd}".repeat(8));
    }

    #[test]
    fn kept_counts_line_ends_and_stays_a_prefix() {
        let mut on = |_: &str| {};
        let mut o = Output::new(&mut on, 64, 10);
        // "abcdefghi\n" is exactly 10 bytes: kept. "x\n" no longer fits,
        // and nothing after it is kept either.
        o.feed(b"abcdefghi\nx\n\n");
        assert_eq!(o.lines(), ["abcdefghi"]);
        assert_eq!(o.kept(), 10);
        assert!(o.truncated());
        let mut on = |_: &str| {};
        let mut o = Output::new(&mut on, 64, 10);
        o.feed(b"abcdefghij\n");
        assert_eq!(o.kept(), 0, "a line of 10 bytes and its line end is 11");
        assert!(o.truncated());
    }

    #[test]
    fn the_envelope_matches_the_id() {
        let id = 77;
        assert_eq!(answer(obj(json!({"return": 1})), id), Answer::Other);
        assert_eq!(
            answer(obj(json!({"id": 76, "return": 1})), id),
            Answer::Other
        );
        assert_eq!(
            answer(obj(json!({"id": "77", "return": 1})), id),
            Answer::Other
        );
        assert_eq!(
            answer(obj(json!({"id": -77, "return": 1})), id),
            Answer::Other
        );
        assert_eq!(
            answer(obj(json!({"id": 77, "return": {"pid": 5}})), id),
            Answer::Return(json!({"pid": 5}))
        );
        assert_eq!(
            answer(
                obj(json!({"id": 77, "return": 1, "error": {"desc": "x"}})),
                id
            ),
            Answer::Return(json!(1))
        );
        assert!(is_sync_answer(&obj(json!({"return": 77})), id));
        assert!(!is_sync_answer(&obj(json!({"return": 77.0})), id));
        assert!(!is_sync_answer(&obj(json!({"return": "77"})), id));
    }

    #[test]
    fn error_replies_of_odd_shapes_are_errors_with_a_clean_description() {
        let none = "an error without a description";
        let err = |v: Value| match answer(obj(v), 1) {
            Answer::Error(e) => e,
            a => panic!("{a:?}"),
        };
        let e = err(json!({"id": 1, "error": {"class": "GenericError", "desc": "no such file"}}));
        assert_eq!(e.class.as_deref(), Some("GenericError"));
        assert_eq!(e.desc, "no such file");
        assert_eq!(err(json!({"id": 1})).desc, none);
        assert_eq!(err(json!({"id": 1, "error": "boom"})).desc, none);
        assert_eq!(err(json!({"id": 1, "error": ["desc"]})).desc, none);
        assert_eq!(err(json!({"id": 1, "error": {"desc": 5}})).desc, none);
        assert_eq!(err(json!({"id": 1, "error": {"class": 5}})).class, None);
        let e = err(json!({"id": 1, "error": {"desc": "a\u{1b}[2Jb\nc"}}));
        assert_eq!(e.desc, "a\\u{1b}[2Jb\\nc");
        let e = err(json!({"id": 1, "error": {"desc": "é".repeat(4 * MAX_DESC)}}));
        assert!(e.desc.len() <= MAX_DESC + 3, "{}", e.desc.len());
        assert!(e.desc.ends_with("..."));
    }

    #[test]
    fn pids_are_positive_pid_t() {
        assert_eq!(exec_pid(&json!({"pid": 1234})), Ok(1234));
        assert_eq!(exec_pid(&json!({"pid": MAX_PID})), Ok(MAX_PID));
        for bad in [
            json!(0),
            json!(-1),
            json!(MAX_PID + 1),
            json!(u64::MAX),
            json!(i64::MIN),
        ] {
            assert!(
                matches!(
                    why(exec_pid(&json!({"pid": bad}))),
                    Why::OutOfRange { field: "pid", .. }
                ),
                "{bad}"
            );
        }
        assert_eq!(why(exec_pid(&json!({"pid": 1.5}))), Why::WrongType("pid"));
        assert_eq!(why(exec_pid(&json!({"pid": "12"}))), Why::WrongType("pid"));
        assert_eq!(why(exec_pid(&json!({}))), Why::Missing("pid"));
        assert_eq!(why(exec_pid(&json!(12))), Why::NotAnObject);
    }

    #[test]
    fn handles_are_positive() {
        assert_eq!(file_handle(&json!(1000)), Ok(1000));
        assert_eq!(file_handle(&json!(i64::MAX)), Ok(i64::MAX));
        for bad in [json!(0), json!(-5), json!(u64::MAX)] {
            let w = why(file_handle(&bad));
            assert!(
                matches!(
                    w,
                    Why::OutOfRange {
                        field: "handle",
                        ..
                    }
                ),
                "{bad}: {w}"
            );
        }
        for bad in [
            json!(2.0),
            json!("1000"),
            json!(null),
            json!({"handle": 1000}),
        ] {
            assert_eq!(why(file_handle(&bad)), Why::WrongType("handle"), "{bad}");
        }
    }

    #[test]
    fn exit_statuses() {
        let st = |v: Value| exec_status(&v);
        assert_eq!(st(json!({"exited": false})), Ok(None));
        assert_eq!(st(json!({"exited": true, "exitcode": 0})), Ok(Some(0)));
        assert_eq!(st(json!({"exited": true, "exitcode": 255})), Ok(Some(255)));
        assert_eq!(st(json!({"exited": true, "signal": 9})), Ok(Some(137)));
        assert_eq!(
            st(json!({"exited": true, "signal": 15, "exitcode": 3})),
            Ok(Some(143))
        );
        assert_eq!(st(json!({"exited": true})), Ok(Some(UNKNOWN_STATUS)));
    }

    #[test]
    fn exit_statuses_out_of_range_are_refused() {
        let st = |v: Value| why(exec_status(&v));
        // 128 + i32::MAX once overflowed; a huge exit code was truncated.
        for bad in [
            json!({"exited": true, "signal": i32::MAX}),
            json!({"exited": true, "signal": i64::MAX}),
            json!({"exited": true, "signal": 0}),
            json!({"exited": true, "signal": -9}),
            json!({"exited": true, "signal": 128}),
            json!({"exited": true, "exitcode": 256}),
            json!({"exited": true, "exitcode": -1}),
            json!({"exited": true, "exitcode": 1u64 << 32}),
            json!({"exited": true, "exitcode": 0, "signal": 1000}),
        ] {
            assert!(matches!(st(bad.clone()), Why::OutOfRange { .. }), "{bad}");
        }
        assert_eq!(st(json!({"exited": "yes"})), Why::WrongType("exited"));
        assert_eq!(st(json!({"exited": 1})), Why::WrongType("exited"));
        assert_eq!(st(json!({"exitcode": 0})), Why::Missing("exited"));
        assert_eq!(
            st(json!({"exited": true, "exitcode": "0"})),
            Why::WrongType("exitcode")
        );
        assert_eq!(
            st(json!({"exited": true, "signal": null})),
            Why::WrongType("signal")
        );
        assert_eq!(st(json!([true])), Why::NotAnObject);
    }

    #[test]
    fn file_reads() {
        let r = file_read(
            &json!({"count": 6, "buf-b64": "aGVsbG8K", "eof": false}),
            1 << 20,
        );
        assert_eq!(
            r,
            Ok(FileRead {
                data: b"hello\n".to_vec(),
                eof: false
            })
        );
        let r = file_read(&json!({"count": 0, "buf-b64": "", "eof": true}), 1 << 20);
        assert_eq!(
            r,
            Ok(FileRead {
                data: Vec::new(),
                eof: true
            })
        );
        // Exactly what was asked for.
        let r = file_read(&json!({"count": 3, "buf-b64": "YWJj", "eof": false}), 3).unwrap();
        assert_eq!(r.data, b"abc");
    }

    #[test]
    fn file_reads_that_do_not_add_up_are_refused() {
        let fr = |v: Value, asked: usize| why(file_read(&v, asked));
        let big = 1 << 20;
        assert_eq!(
            fr(
                json!({"count": 5, "buf-b64": "aGVsbG8K", "eof": false}),
                big
            ),
            Why::CountMismatch {
                count: 5,
                decoded: 6
            }
        );
        assert_eq!(
            fr(json!({"count": big, "buf-b64": "", "eof": false}), big),
            Why::CountMismatch {
                count: big as u64,
                decoded: 0
            }
        );
        assert!(matches!(
            fr(json!({"count": -1, "buf-b64": "", "eof": false}), big),
            Why::OutOfRange { field: "count", .. }
        ));
        // More than asked for: refused before decoding.
        assert_eq!(
            fr(json!({"count": 4, "buf-b64": "YWJjZA==", "eof": false}), 3),
            Why::TooLong { len: 8, asked: 3 }
        );
        let huge = "A".repeat(4 << 20);
        assert!(matches!(
            fr(
                json!({"count": 3 << 20, "buf-b64": huge, "eof": false}),
                big
            ),
            Why::TooLong { .. }
        ));
        // Not base64, unpadded, or with a line break.
        for bad in ["a*Zz", "aGVsbG8", "aGVs\nbG8K", "====", "aGVsbG8K===="] {
            let w = fr(json!({"count": 6, "buf-b64": bad, "eof": false}), big);
            assert!(matches!(w, Why::BadBase64(_)), "{bad}: {w}");
        }
        assert_eq!(
            fr(json!({"buf-b64": "", "eof": true}), big),
            Why::Missing("count")
        );
        assert_eq!(
            fr(json!({"count": 0, "eof": true}), big),
            Why::Missing("buf-b64")
        );
        assert_eq!(
            fr(json!({"count": 0, "buf-b64": ""}), big),
            Why::Missing("eof")
        );
        assert_eq!(
            fr(json!({"count": "0", "buf-b64": "", "eof": true}), big),
            Why::WrongType("count")
        );
        assert_eq!(
            fr(json!({"count": 0, "buf-b64": 0, "eof": true}), big),
            Why::WrongType("buf-b64")
        );
        assert_eq!(
            fr(json!({"count": 0, "buf-b64": "", "eof": 1}), big),
            Why::WrongType("eof")
        );
        assert_eq!(fr(json!("aGVsbG8K"), big), Why::NotAnObject);
    }
}
