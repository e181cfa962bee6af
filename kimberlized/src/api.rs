//! The API's JSON bodies and header names (docs/CLOUDLET.md, "The
//! daemon's API"): shared by the daemon and its client.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Request header carrying the overlay key (64 hex digits) with
/// `POST /v1/sessions`; it only ever travels inside the mutually
/// authenticated TLS session.
pub const KEY_HEADER: &str = "Kimberley-Key";
/// Request header naming an overlay chain (`HOST[:PORT]/REPO[:TAG]` or
/// `...@sha256:HEX`) for `POST /v1/sessions` without a body: the daemon
/// applies it from its cloudlet cache (fetching what the cache lacks from
/// the registry, which must be one it allows).
pub const FROM_HEADER: &str = "Kimberley-From";
/// Request header naming the guest TCP ports a `POST /v1/sessions` asks
/// to reach (decimal, comma-separated, e.g. `22, 8080`; see
/// [`parse_ports`]): the daemon forwards a host port of its choice to
/// each (Linux guests under QEMU only).
pub const PORTS_HEADER: &str = "Kimberley-Ports";
/// Most guest ports one session may ask for.
pub const MAX_PORTS: usize = 16;
/// JSON bodies.
pub const JSON: &str = "application/json";
/// A body of JSON lines (the progress of `POST /v1/sessions`).
pub const JSON_LINES: &str = "application/x-ndjson";
/// Overlay bytes.
pub const OVERLAY: &str = "application/vnd.kimberley.overlay";

/// `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// [`crate::API_VERSION`].
    pub api: u32,
    /// The daemon's name (its DNS-SD instance name).
    pub name: String,
    /// The build (`kimberlized --version`).
    pub version: String,
    /// The base VMs it holds.
    pub bases: Vec<BaseInfo>,
    /// Its limits.
    pub limits: Limits,
    /// Sessions that hold a VM now (running or being made).
    pub active_sessions: usize,
}

/// One base VM a daemon holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseInfo {
    /// Its identity (64 hex digits: the VM directory's manifest identity,
    /// what an overlay's header commits to).
    pub identity: String,
    /// Its manifest name.
    pub name: String,
    /// Guest memory in bytes.
    pub memory: u64,
}

/// A daemon's resource limits (what `--max-*` set).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    /// Sessions holding a running (or starting) VM at once.
    pub max_sessions: usize,
    /// Guest memory of those VMs together, in bytes.
    pub max_memory: u64,
    /// Launch VM sizes (memory and disks) of every session kept in the
    /// state directory together, suspended ones included, in bytes.
    pub max_disk: u64,
}

/// Every error body: a sentence and a stable machine-readable reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// What went wrong, for programs (see [`Reason`]).
    pub reason: Reason,
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A malformed request (head, header, JSON body).
    BadRequest,
    /// No such path or method.
    NotFound,
    /// The session belongs to another client certificate.
    Forbidden,
    /// `--max-sessions` sessions are active.
    LimitSessions,
    /// The VM's memory would pass `--max-memory`.
    LimitMemory,
    /// The launch VM would pass `--max-disk`.
    LimitDisk,
    /// The overlay was made from a base this daemon does not hold.
    NoBase,
    /// Wrong key, tampered or unencrypted overlay.
    Auth,
    /// The overlay is corrupt, truncated or not an overlay.
    Corrupt,
    /// The upload ended before its Content-Length.
    UploadCut,
    /// The reference cannot be served: a registry the daemon does not
    /// allow, or neither the cache nor the registry has the chain.
    Reference,
    /// Guest ports were asked of a VM that cannot forward them (a
    /// microVM, or a Linux VM without a network card).
    Ports,
    /// The VM failed to resume or answer, or a control request failed.
    Vm,
    /// The session is not in a state that allows the request.
    State,
    /// Anything else on the daemon's side (disk, I/O).
    Internal,
}

impl Reason {
    /// The HTTP status this reason is answered with.
    pub fn status(self) -> u16 {
        match self {
            Reason::BadRequest => 400,
            Reason::NotFound => 404,
            Reason::Forbidden => 403,
            Reason::LimitSessions | Reason::LimitMemory => 503,
            Reason::LimitDisk => 507,
            Reason::NoBase | Reason::Auth | Reason::Corrupt => 422,
            Reason::UploadCut => 400,
            Reason::Reference | Reason::Ports => 422,
            Reason::Vm => 502,
            Reason::State => 409,
            Reason::Internal => 500,
        }
    }
}

/// One line of `POST /v1/sessions`' progress stream. Times are
/// milliseconds since the daemon accepted the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Progress {
    /// The overlay's header authenticated, its base is held and the limits
    /// allow it: the session exists.
    Accepted {
        session: String,
        base: String,
        memory: u64,
        disk: u64,
        ms: u64,
    },
    /// The last byte of the upload arrived.
    Received { bytes: u64, ms: u64 },
    /// The launch VM is complete and checked in the state directory.
    Synthesised { launch_bytes: u64, ms: u64 },
    /// The VM runs again where it was suspended; `forwards` are its
    /// forwarded ports (one per port asked for).
    Resumed {
        ms: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        forwards: Vec<Forward>,
    },
    /// The guest answered its agent: the session is usable (with the same
    /// `forwards` as `Resumed`).
    Ready {
        ms: u64,
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        forwards: Vec<Forward>,
    },
    /// The session failed and was discarded (nothing kept).
    Failed {
        error: String,
        reason: Reason,
        ms: u64,
    },
}

/// A session's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Receiving and applying the overlay.
    Synthesising,
    /// Synthesised; the VM is being resumed.
    Resuming,
    /// The VM runs (or is paused) and answers control requests.
    Running,
    /// The VM is suspended into the state directory.
    Suspended,
}

/// `GET /v1/sessions/ID` (and the items of `GET /v1/sessions`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Its id (16 hex digits).
    pub id: String,
    /// Where it is.
    pub state: State,
    /// The base identity it was synthesised on.
    pub base: String,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Launch VM size in bytes.
    pub disk: u64,
    /// The guest ports the session asked for (none: absent).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<u16>,
    /// Where they are reached while the VM runs (state `running`; absent
    /// otherwise): one per port, in the order asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub forwards: Vec<Forward>,
}

/// A guest TCP port reachable on the cloudlet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Forward {
    /// The guest's port.
    pub guest: u16,
    /// The host address and port that lead to it. An unspecified address
    /// (`0.0.0.0`, `::`) stands for the address the client reached the
    /// daemon at.
    pub host: SocketAddr,
}

/// Why a `Kimberley-Ports` value is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PortsError {
    /// An element that is not a decimal number of at most 5 digits.
    #[error("parsing {PORTS_HEADER}: {0:?} is not a port number (decimal digits)")]
    NotANumber(String),
    /// 0 or above 65535.
    #[error("parsing {PORTS_HEADER}: port {0} is not in 1..65535")]
    OutOfRange(u32),
    /// A port given twice.
    #[error("parsing {PORTS_HEADER}: port {0} is given twice")]
    Duplicate(u16),
    /// More than [`MAX_PORTS`].
    #[error("parsing {PORTS_HEADER}: {0} ports asked for, at most {MAX_PORTS} are forwarded")]
    TooMany(usize),
    /// No port at all.
    #[error("parsing {PORTS_HEADER}: no port given")]
    Empty,
}

/// Checks a list of guest ports: 1 to [`MAX_PORTS`] of them, each in
/// 1..65535, none twice.
pub fn check_ports(ports: &[u16]) -> Result<(), PortsError> {
    if ports.is_empty() {
        return Err(PortsError::Empty);
    }
    if ports.len() > MAX_PORTS {
        return Err(PortsError::TooMany(ports.len()));
    }
    for (i, &p) in ports.iter().enumerate() {
        if p == 0 {
            return Err(PortsError::OutOfRange(0));
        }
        if ports[..i].contains(&p) {
            return Err(PortsError::Duplicate(p));
        }
    }
    Ok(())
}

/// Parses a `Kimberley-Ports` value: decimal port numbers separated by
/// commas, spaces and tabs allowed around each; checked as
/// [`check_ports`] says. The order given is kept.
pub fn parse_ports(value: &str) -> Result<Vec<u16>, PortsError> {
    let mut ports = Vec::new();
    for item in value.split(',') {
        let item = item.trim_matches([' ', '\t']);
        if item.is_empty() || item.len() > 5 || !item.bytes().all(|b| b.is_ascii_digit()) {
            return Err(PortsError::NotANumber(item.chars().take(16).collect()));
        }
        let n: u32 = item
            .parse()
            .map_err(|_| PortsError::NotANumber(item.to_string()))?;
        if !(1..=65535).contains(&n) {
            return Err(PortsError::OutOfRange(n));
        }
        ports.push(n as u16);
        if ports.len() > MAX_PORTS {
            return Err(PortsError::TooMany(value.split(',').count()));
        }
    }
    check_ports(&ports)?;
    Ok(ports)
}

/// The `Kimberley-Ports` value for `ports`.
pub fn ports_header(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// `DELETE /v1/sessions/ID`'s optional body.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Delete {
    /// Suspend the VM into the state directory and keep the session
    /// (listed as suspended) rather than discard it.
    #[serde(default)]
    pub keep: bool,
}

/// `POST /v1/sessions/ID/exec`'s body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The script, in the guest's language.
    pub script: String,
    /// Its time limit (default: the control socket's, 600 s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_parse_and_are_checked() {
        assert_eq!(parse_ports("22"), Ok(vec![22]));
        assert_eq!(
            parse_ports("8080, 22 ,\t1,65535"),
            Ok(vec![8080, 22, 1, 65535])
        );
        assert_eq!(parse_ports(&ports_header(&[443, 80])), Ok(vec![443, 80]));
        assert_eq!(parse_ports("0"), Err(PortsError::OutOfRange(0)));
        assert_eq!(parse_ports("65536"), Err(PortsError::OutOfRange(65536)));
        assert_eq!(parse_ports("99999"), Err(PortsError::OutOfRange(99999)));
        assert_eq!(parse_ports("22,80,22"), Err(PortsError::Duplicate(22)));
        assert_eq!(parse_ports("022,22"), Err(PortsError::Duplicate(22)));
        for bad in [
            "", " ", "22,", ",22", "22;80", "+22", "-1", "0x16", "2 2", "123456", "８０",
        ] {
            assert!(
                matches!(parse_ports(bad), Err(PortsError::NotANumber(_))),
                "{bad:?}: {:?}",
                parse_ports(bad)
            );
        }
        let many: Vec<String> = (1..=MAX_PORTS as u16 + 1).map(|p| p.to_string()).collect();
        assert_eq!(
            parse_ports(&many[..MAX_PORTS].join(",")).map(|v| v.len()),
            Ok(MAX_PORTS)
        );
        assert_eq!(
            parse_ports(&many.join(",")),
            Err(PortsError::TooMany(MAX_PORTS + 1))
        );
        assert_eq!(check_ports(&[]), Err(PortsError::Empty));
        assert_eq!(check_ports(&[1, 0]), Err(PortsError::OutOfRange(0)));
    }

    #[test]
    fn forwards_are_shown_as_addresses() {
        let f = Forward {
            guest: 8080,
            host: "127.0.0.1:40000".parse().unwrap(),
        };
        let v = serde_json::to_value(Progress::Ready {
            ms: 5,
            forwards: vec![f],
        })
        .unwrap();
        assert_eq!(
            v,
            serde_json::json!({"event": "ready", "ms": 5, "forwards": [{"guest": 8080, "host": "127.0.0.1:40000"}]})
        );
        // Without ports, the lines are those of before.
        let v = serde_json::to_value(Progress::Ready {
            ms: 5,
            forwards: vec![],
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"event": "ready", "ms": 5}));
    }
}
