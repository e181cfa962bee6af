//! Pure interpretation of the QMP return values the backend reads: `query-version`, `query-status` and `query-migrate` (the envelope is [`crate::qga::reply::answer`], shared with the agent).

use serde_json::Value;

use crate::qga::reply::{clean, Refused, Why};

/// Longest run state or migration status accepted.
const MAX_NAME: usize = 64;
/// Longest migration error description handed on.
pub const MAX_DETAIL: usize = 1024;

/// QEMU's version, as `query-version` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Version {
    /// Major.
    pub major: u64,
    /// Minor.
    pub minor: u64,
    /// Micro.
    pub micro: u64,
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.micro)
    }
}

/// `query-version`'s return: `qemu.major`, `qemu.minor`, `qemu.micro`.
pub fn version(ret: &Value) -> Result<Version, Refused> {
    const C: &str = "query-version";
    let n = |k: &'static str| {
        let v = ret.get("qemu").and_then(|q| q.get(k)).ok_or(Refused {
            command: C,
            why: Why::Missing(k),
        })?;
        v.as_u64().ok_or(Refused {
            command: C,
            why: Why::WrongType(k),
        })
    };
    Ok(Version {
        major: n("major")?,
        minor: n("minor")?,
        micro: n("micro")?,
    })
}

/// A short status word: ASCII letters, digits and `-`, at most
/// `MAX_NAME` bytes.
fn name(command: &'static str, field: &'static str, v: Option<&Value>) -> Result<String, Refused> {
    let v = v.ok_or(Refused {
        command,
        why: Why::Missing(field),
    })?;
    match v.as_str() {
        Some(s)
            if s.len() <= MAX_NAME && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') =>
        {
            Ok(s.to_string())
        }
        _ => Err(Refused {
            command,
            why: Why::WrongType(field),
        }),
    }
}

/// `query-status`'s return: the run state (`running`, `paused`...).
pub fn status(ret: &Value) -> Result<String, Refused> {
    name("query-status", "status", ret.get("status"))
}

/// Where a migration is, from `query-migrate`'s return.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Migration {
    /// `completed`.
    Completed,
    /// `failed`, `cancelled` or `cancelling`, with `error-desc` if given
    /// (cut to 1 KiB, control characters escaped).
    Failed {
        /// The status.
        status: String,
        /// QEMU's description.
        detail: Option<String>,
    },
    /// Any other status (`none` when there is none yet).
    Running(String),
}

/// `query-migrate`'s return.
pub fn migration(ret: &Value) -> Result<Migration, Refused> {
    let status = match ret.get("status") {
        None => "none".to_string(),
        s => name("query-migrate", "status", s)?,
    };
    Ok(match status.as_str() {
        "completed" => Migration::Completed,
        "failed" | "cancelled" | "cancelling" => Migration::Failed {
            detail: ret
                .get("error-desc")
                .and_then(Value::as_str)
                .map(|d| clean(d, MAX_DETAIL)),
            status,
        },
        _ => Migration::Running(status),
    })
}

/// A live migration's counters from `query-migrate`'s return (`ram.*`,
/// `cpu-throttle-percentage`); a counter QEMU does not report yet is 0,
/// one that is not an unsigned integer is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Progress {
    /// `ram.transferred`: stream bytes written.
    pub transferred: u64,
    /// `ram.remaining`: dirty bytes left.
    pub remaining: u64,
    /// `ram.dirty-sync-count`.
    pub dirty_syncs: u64,
    /// `ram.dirty-pages-rate` × `ram.page-size`: bytes dirtied per second.
    pub dirty_rate: u64,
    /// `ram.normal` + `ram.duplicate`: pages sent.
    pub pages: u64,
    /// `ram.duplicate`: zero pages sent as a flag.
    pub zero_pages: u64,
    /// `cpu-throttle-percentage` (auto-converge), at most 100.
    pub throttle_pct: u32,
}

/// `query-migrate`'s status and counters.
pub fn progress(ret: &Value) -> Result<(Migration, Progress), Refused> {
    const C: &str = "query-migrate";
    let m = migration(ret)?;
    let ram = ret.get("ram");
    let n = |k: &'static str| -> Result<u64, Refused> {
        match ram.and_then(|r| r.get(k)) {
            None => Ok(0),
            Some(v) => v.as_u64().ok_or(Refused {
                command: C,
                why: Why::WrongType(k),
            }),
        }
    };
    let throttle = match ret.get("cpu-throttle-percentage") {
        None => 0,
        Some(v) => v.as_u64().filter(|&t| t <= 100).ok_or(Refused {
            command: C,
            why: Why::WrongType("cpu-throttle-percentage"),
        })? as u32,
    };
    let (normal, zero) = (n("normal")?, n("duplicate")?);
    Ok((
        m,
        Progress {
            transferred: n("transferred")?,
            remaining: n("remaining")?,
            dirty_syncs: n("dirty-sync-count")?,
            dirty_rate: n("dirty-pages-rate")?.saturating_mul(n("page-size")?),
            pages: normal.saturating_add(zero),
            zero_pages: zero,
            throttle_pct: throttle,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn versions() {
        let v = json!({"qemu": {"major": 8, "minor": 2, "micro": 1}, "package": "Debian"});
        assert_eq!(
            version(&v),
            Ok(Version {
                major: 8,
                minor: 2,
                micro: 1
            })
        );
        assert_eq!(version(&v).unwrap().to_string(), "8.2.1");
        let w = |v: Value| version(&v).unwrap_err().why;
        assert_eq!(
            w(json!({"qemu": {"major": 8, "minor": 2}})),
            Why::Missing("micro")
        );
        assert_eq!(
            w(json!({"qemu": {"major": -8, "minor": 2, "micro": 0}})),
            Why::WrongType("major")
        );
        assert_eq!(w(json!({"qemu": 8})), Why::Missing("major"));
        assert_eq!(w(json!([1, 2, 3])), Why::Missing("major"));
    }

    #[test]
    fn live_progress() {
        let v = json!({"status": "active", "cpu-throttle-percentage": 30,
            "ram": {"transferred": 1000, "remaining": 4096, "dirty-sync-count": 3,
                    "dirty-pages-rate": 10, "page-size": 4096, "normal": 5, "duplicate": 7}});
        let (m, p) = progress(&v).unwrap();
        assert_eq!(m, Migration::Running("active".into()));
        assert_eq!(
            p,
            Progress {
                transferred: 1000,
                remaining: 4096,
                dirty_syncs: 3,
                dirty_rate: 40960,
                pages: 12,
                zero_pages: 7,
                throttle_pct: 30
            }
        );
        assert_eq!(
            progress(&json!({"status": "setup"})).unwrap().1,
            Progress::default()
        );
        for bad in [
            json!({"status": "active", "ram": {"transferred": -1}}),
            json!({"status": "active", "ram": {"remaining": "x"}}),
            json!({"status": "active", "cpu-throttle-percentage": 101}),
            json!({"status": "act ive"}),
        ] {
            assert!(progress(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses() {
        assert_eq!(
            status(&json!({"status": "running", "running": true})),
            Ok("running".into())
        );
        assert_eq!(
            status(&json!({"status": "guest-panicked"})),
            Ok("guest-panicked".into())
        );
        for bad in [
            json!({}),
            json!({"status": 1}),
            json!({"status": "a b"}),
            json!({"status": "x".repeat(65)}),
        ] {
            assert!(status(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn migrations() {
        assert_eq!(
            migration(&json!({"status": "completed"})),
            Ok(Migration::Completed)
        );
        assert_eq!(migration(&json!({})), Ok(Migration::Running("none".into())));
        assert_eq!(
            migration(&json!({"status": "active"})),
            Ok(Migration::Running("active".into()))
        );
        assert_eq!(
            migration(&json!({"status": "failed", "error-desc": "bad\nstate"})),
            Ok(Migration::Failed {
                status: "failed".into(),
                detail: Some("bad\\nstate".into())
            })
        );
        assert_eq!(
            migration(&json!({"status": "cancelled", "error-desc": 3})),
            Ok(Migration::Failed {
                status: "cancelled".into(),
                detail: None
            })
        );
        assert!(migration(&json!({"status": ["completed"]})).is_err());
        let long = migration(&json!({"status": "failed", "error-desc": "é".repeat(5000)}));
        let Ok(Migration::Failed {
            detail: Some(d), ..
        }) = long
        else {
            panic!("{long:?}")
        };
        assert!(
            d.len() <= MAX_DETAIL + 3 && d.ends_with("..."),
            "{}",
            d.len()
        );
    }
}
