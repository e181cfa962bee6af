//! The API's JSON bodies and header names (docs/CLOUDLET.md, "The
//! daemon's API"): shared by the daemon and its client.

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
            Reason::Reference => 422,
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
    /// The VM runs again where it was suspended.
    Resumed { ms: u64 },
    /// The guest answered its agent: the session is usable.
    Ready { ms: u64 },
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
