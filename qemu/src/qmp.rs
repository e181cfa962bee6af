//! A QMP client: the greeting and capabilities negotiation, commands with a
//! timeout (errors name the command), events kept aside, and the commands
//! suspend and restore need.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};
use crate::qga::reply::{answer, Answer};
use crate::wire::{Wire, WireError};

pub mod reply;

use reply::Migration;
pub use reply::Version;

/// How long an ordinary command may take.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Events kept (older ones are dropped).
const MAX_EVENTS: usize = 256;

/// A QMP connection in command mode.
pub struct Qmp {
    wire: Wire,
    next_id: u64,
    events: VecDeque<Map<String, Value>>,
}

fn io_err(during: &str, e: WireError) -> Error {
    Error::QmpIo {
        during: during.to_string(),
        source: e.into_io(),
    }
}

impl Qmp {
    /// Connects to QEMU's QMP socket, reads the greeting and enters
    /// command mode.
    pub fn connect(path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let mut wire = Wire::connect(path).map_err(|source| Error::QmpIo {
            during: format!("connecting to {}", path.display()),
            source,
        })?;
        let greeting = wire
            .object(deadline, None)
            .map_err(|e| io_err("reading the greeting", e))?;
        if !greeting.contains_key("QMP") {
            return Err(Error::Protocol {
                during: "QMP greeting".into(),
                what: Value::Object(greeting).to_string(),
            });
        }
        let mut q = Qmp {
            wire,
            next_id: 1,
            events: VecDeque::new(),
        };
        q.execute("qmp_capabilities", None, timeout)?;
        Ok(q)
    }

    /// Runs `command` with `args` and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        args: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        self.execute_fd(command, args, None, timeout)
    }

    /// Hands QEMU the descriptor of `file` under `name` (`getfd`), for a
    /// migration URI `fd:NAME`; QEMU closes its copy when done with it.
    pub fn pass_fd(&mut self, name: &str, file: &std::fs::File) -> Result<()> {
        use std::os::unix::io::AsRawFd;
        self.execute_fd(
            "getfd",
            Some(json!({ "fdname": name })),
            Some(file.as_raw_fd()),
            COMMAND_TIMEOUT,
        )
        .map(drop)
    }

    fn execute_fd(
        &mut self,
        command: &str,
        args: Option<Value>,
        fd: Option<std::os::unix::io::RawFd>,
        timeout: Duration,
    ) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        let id = self.next_id;
        self.next_id += 1;
        let mut req = json!({ "execute": command, "id": id });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        self.wire
            .send_json(&req, fd, deadline)
            .map_err(|e| io_err(&format!("sending {command}"), e))?;
        loop {
            let o = self.wire.object(deadline, None).map_err(|e| match e {
                WireError::Timeout => Error::Timeout {
                    during: format!("QMP command {command}"),
                    timeout,
                },
                e => io_err(&format!("waiting for the answer to {command}"), e),
            })?;
            if o.contains_key("event") {
                if self.events.len() == MAX_EVENTS {
                    self.events.pop_front();
                }
                self.events.push_back(o);
                continue;
            }
            match answer(o, id) {
                Answer::Other => continue,
                Answer::Return(r) => return Ok(r),
                Answer::Error(e) => {
                    return Err(Error::Qmp {
                        command: command.to_string(),
                        message: e.desc,
                    })
                }
            }
        }
    }

    /// The events received so far (drained).
    pub fn take_events(&mut self) -> Vec<Map<String, Value>> {
        self.events.drain(..).collect()
    }

    /// `query-version`.
    pub fn version(&mut self) -> Result<Version> {
        let v = self.execute("query-version", None, COMMAND_TIMEOUT)?;
        Ok(reply::version(&v)?)
    }

    /// `query-status`: the run state (`running`, `paused`, `postmigrate`,
    /// `inmigrate`, `shutdown`, `internal-error`, `guest-panicked`...).
    pub fn status(&mut self) -> Result<String> {
        let v = self.execute("query-status", None, COMMAND_TIMEOUT)?;
        Ok(reply::status(&v)?)
    }

    /// `stop`: the vCPUs stop (in-flight I/O completed).
    pub fn stop(&mut self) -> Result<()> {
        self.execute("stop", None, COMMAND_TIMEOUT).map(drop)
    }

    /// `cont`.
    pub fn cont(&mut self) -> Result<()> {
        self.execute("cont", None, COMMAND_TIMEOUT).map(drop)
    }

    /// Migration of device state only: RAM in shared memory backends is
    /// left where it is (`x-ignore-shared`).
    pub fn ignore_shared(&mut self) -> Result<()> {
        self.execute(
            "migrate-set-capabilities",
            Some(json!({"capabilities": [{"capability": "x-ignore-shared", "state": true}]})),
            COMMAND_TIMEOUT,
        )
        .map(drop)
    }

    /// `migrate` to `uri`.
    pub fn migrate(&mut self, uri: &str) -> Result<()> {
        self.execute("migrate", Some(json!({ "uri": uri })), COMMAND_TIMEOUT)
            .map(drop)
    }

    /// `migrate-incoming` from `uri` (QEMU started with `-incoming defer`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<()> {
        self.execute(
            "migrate-incoming",
            Some(json!({ "uri": uri })),
            COMMAND_TIMEOUT,
        )
        .map(drop)
    }

    /// Polls `query-migrate` until the migration completed (Ok), failed or
    /// was cancelled (Err), or `timeout` passed.
    pub fn wait_migration(&mut self, during: &str, timeout: Duration) -> Result<()> {
        let end = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            let v = self.execute("query-migrate", None, COMMAND_TIMEOUT)?;
            let status = match reply::migration(&v)? {
                Migration::Completed => return Ok(()),
                Migration::Failed { status, detail } => {
                    return Err(Error::Migration {
                        during: during.to_string(),
                        status,
                        detail,
                    })
                }
                Migration::Running(status) => status,
            };
            if Instant::now() >= end {
                return Err(Error::Timeout {
                    during: format!("{during} (migration {status})"),
                    timeout,
                });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// `quit` (QEMU exits; the connection closing is not an error).
    pub fn quit(&mut self) -> Result<()> {
        match self.execute("quit", None, COMMAND_TIMEOUT) {
            Ok(_) => Ok(()),
            Err(Error::QmpIo { source, .. })
                if source.kind() == std::io::ErrorKind::UnexpectedEof =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }
}
