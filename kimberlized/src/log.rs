//! Structured log lines on stderr: one JSON object per line with its time,
//! level and event name.

use std::io::Write;

use serde_json::{json, Value};

/// Writes `{"ts_ms":...,"level":level,"event":event, ...fields}` as one
/// line on stderr (`fields` is an object; other values go under `"data"`).
pub fn line(level: &str, event: &str, fields: Value) {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut v = json!({"ts_ms": ts, "level": level, "event": event});
    match fields {
        Value::Object(m) => {
            for (k, x) in m {
                v[k] = x;
            }
        }
        Value::Null => {}
        other => v["data"] = other,
    }
    let mut e = std::io::stderr().lock();
    let _ = writeln!(e, "{v}");
}

/// An `info` line.
pub fn info(event: &str, fields: Value) {
    line("info", event, fields)
}

/// A `warn` line.
pub fn warn(event: &str, fields: Value) {
    line("warn", event, fields)
}
