//! The backend's error type: variants name the failing operation, with the
//! guest's serial console tail where it explains the failure.

use std::time::Duration;

use crate::BACKEND;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a QEMU operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `qemu-system-x86_64` (or `qemu-img`) could not be started.
    #[error("cannot start {program}: {source} (is QEMU installed? apt-get install qemu-system-x86 qemu-utils)")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A configuration QEMU cannot run (missing kernel, bad size...).
    #[error("{0}")]
    Config(String),
    /// QEMU exited while we waited for it.
    #[error("QEMU exited ({status}) while {during}{}", tail(.log))]
    Exited {
        /// What we were doing.
        during: String,
        /// Its exit status.
        status: String,
        /// Its stderr and the serial console's last lines.
        log: String,
    },
    /// The guest did not boot (or resume) far enough for its agent to
    /// answer.
    #[error("the guest agent did not answer within {timeout:?}{}", tail(.log))]
    Boot {
        /// The boot timeout.
        timeout: Duration,
        /// The serial console's last lines.
        log: String,
    },
    /// A QMP command failed (QEMU's own error message).
    #[error("QMP command {command}: {message}")]
    Qmp {
        /// The command.
        command: String,
        /// QEMU's description.
        message: String,
    },
    /// The QMP connection failed.
    #[error("QMP {during}: {source}")]
    QmpIo {
        /// What was being done.
        during: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A guest-agent command failed (the agent's own error message).
    #[error("guest agent command {command}: {message}")]
    Agent {
        /// The command.
        command: String,
        /// The agent's description.
        message: String,
    },
    /// The guest-agent connection failed.
    #[error("guest agent {during}: {source}")]
    AgentIo {
        /// What was being done.
        during: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A protocol answer that does not make sense.
    #[error("{during}: unexpected answer: {what}")]
    Protocol {
        /// What was being done.
        during: String,
        /// What came.
        what: String,
    },
    /// An incoming or outgoing migration (the device state) failed.
    #[error("{during}: migration {status}{}", .detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Migration {
        /// Suspending or restoring.
        during: String,
        /// QEMU's migration status.
        status: String,
        /// QEMU's error description.
        detail: Option<String>,
    },
    /// Something did not happen in time.
    #[error("{during}: timed out after {timeout:?}")]
    Timeout {
        /// What was being waited for.
        during: String,
        /// How long.
        timeout: Duration,
    },
    /// A script ran past its timeout (it was killed in the guest).
    #[error("the script ran past its timeout of {0:?} and was killed")]
    ScriptTimeout(Duration),
    /// A wait ended because the interrupt flag was set.
    #[error("interrupted")]
    Interrupted,
    /// The guest stopped on its own (shutdown, panic with panic=-1 and
    /// -no-reboot, internal error).
    #[error("the guest stopped: {0}")]
    GuestStopped(String),
    /// A VM directory cannot be run by this backend (another backend,
    /// machine type or accelerator, no state).
    #[error("{0}")]
    Unsupported(String),
    /// A VM directory problem.
    #[error(transparent)]
    VmDir(#[from] kimberley_formats::Error),
    /// A local file operation.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
}

/// Lines of QEMU's output shown in an error.
const TAIL_LINES: usize = 12;

/// The end of QEMU's output for an error: a kernel panic's first line (if
/// any) and the last [`TAIL_LINES`] lines.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.trim_end().lines().collect();
    if lines.iter().all(|l| l.trim().is_empty()) {
        return String::new();
    }
    let last = &lines[lines.len().saturating_sub(TAIL_LINES)..];
    let panic = lines
        .iter()
        .find(|l| l.contains("Kernel panic"))
        .filter(|p| !last.contains(p));
    let mut s = String::from("; last output:");
    if let Some(p) = panic {
        s.push_str(&format!("\n{p}\n..."));
    }
    for l in last {
        s.push('\n');
        s.push_str(l);
    }
    s
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(what: impl Into<String>, e: std::io::Error) -> Self {
        Error::Io(what.into(), e)
    }
}

impl From<crate::qga::reply::Refused> for Error {
    fn from(r: crate::qga::reply::Refused) -> Self {
        Error::Protocol {
            during: r.command.to_string(),
            what: r.why.to_string(),
        }
    }
}

impl From<Error> for kimberley_machine::Error {
    fn from(e: Error) -> Self {
        use kimberley_machine::Error as M;
        match e {
            Error::VmDir(f) => M::VmDir(f),
            Error::Interrupted => M::Interrupted,
            Error::ScriptTimeout(t)
            | Error::Timeout { timeout: t, .. }
            | Error::Boot { timeout: t, .. } => M::Timeout(t),
            Error::GuestStopped(why) => M::GuestStopped(why),
            e @ Error::Exited { .. } => M::GuestStopped(e.to_string()),
            Error::Unsupported(s) => M::Unsupported(s),
            other => M::Backend {
                backend: BACKEND,
                message: other.to_string(),
            },
        }
    }
}
