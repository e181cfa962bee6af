//! A qemu-guest-agent client: resynchronised after every connection
//! (0xFF and `guest-sync-delimited`), `guest-ping`, and shell scripts run
//! with `guest-exec` whose output streams back while they run.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64ct::{Base64, Encoding};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::wire::{Wire, WireError};

pub mod reply;

use reply::{Answer, Output};

/// How long one agent command may take once the agent answers.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How often a running script's output and status are polled: soon at
/// first (short scripts end quickly), then every 150 ms.
const POLL: Duration = Duration::from_millis(150);
/// The first poll interval (doubled up to [`POLL`]).
const FIRST_POLL: Duration = Duration::from_millis(10);
/// Longest script passed as an argument (longer ones go through a file).
const INLINE_SCRIPT: usize = 64 << 10;
/// Bytes asked for per `guest-file-read`.
const READ_CHUNK: usize = 1 << 20;
/// How long the output of a script killed at its timeout is still read.
const DRAIN_AFTER_KILL: Duration = Duration::from_secs(1);
/// Longest output line handed on (longer ones are split).
pub const MAX_LINE: usize = 64 << 10;
/// Output kept in [`ExecOutcome::lines`] (later lines are still streamed).
pub const MAX_OUTPUT: usize = 16 << 20;
/// How long the agent gets to answer one resynchronisation.
const SYNC_ROUND: Duration = Duration::from_millis(700);

/// A finished script.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutcome {
    /// Its exit status (128 + N for a script killed by signal N).
    pub status: i32,
    /// Its output lines (stdout and stderr interleaved), up to
    /// [`MAX_OUTPUT`] bytes.
    pub lines: Vec<String>,
    /// True if lines were left out of `lines` (not of the stream).
    pub truncated: bool,
}

/// A connection to the guest agent.
pub struct Qga {
    path: std::path::PathBuf,
    wire: Option<Wire>,
    interrupt: Option<Arc<AtomicBool>>,
}

fn random_id() -> u64 {
    // Ids fit in a JSON integer everywhere (below 2^53).
    let r = getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    });
    r & ((1 << 53) - 1)
}

fn io_err(during: &str, e: WireError) -> Error {
    match e {
        WireError::Interrupted => Error::Interrupted,
        e => Error::AgentIo {
            during: during.to_string(),
            source: e.into_io(),
        },
    }
}

impl Qga {
    /// The agent behind QEMU's socket `path` (connected on first use).
    pub fn new(path: &Path) -> Qga {
        Qga {
            path: path.to_path_buf(),
            wire: None,
            interrupt: None,
        }
    }

    /// Makes every wait end with [`Error::Interrupted`] once `flag` is set.
    pub fn set_interrupt(&mut self, flag: Arc<AtomicBool>) {
        self.interrupt = Some(flag);
    }

    fn flag(&self) -> Option<&AtomicBool> {
        self.interrupt.as_deref()
    }

    /// Connects (if needed) and resynchronises: sends 0xFF and
    /// `guest-sync-delimited` with a random id, discards everything up to
    /// the answer with that id; repeats until `deadline` (an agent that is
    /// not running yet reads the requests once it starts).
    fn sync(&mut self, deadline: Instant) -> Result<()> {
        if self.wire.is_some() {
            return Ok(());
        }
        let mut wire = Wire::connect(&self.path).map_err(|source| Error::AgentIo {
            during: format!("connecting to {}", self.path.display()),
            source,
        })?;
        loop {
            let id = random_id();
            let mut req = vec![0xFF];
            req.extend_from_slice(
                json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                    .to_string()
                    .as_bytes(),
            );
            req.push(b'\n');
            let round = (Instant::now() + SYNC_ROUND).min(deadline);
            wire.send(&req, round)
                .map_err(|e| io_err("resynchronising", e))?;
            let answered = loop {
                let got = wire
                    .skip_past(0xFF, round, self.flag())
                    .and_then(|()| wire.object(round, self.flag()));
                match got {
                    Ok(o) if reply::is_sync_answer(&o, id) => break true,
                    Ok(_) => continue,
                    Err(WireError::Timeout) => break false,
                    Err(e) => return Err(io_err("resynchronising", e)),
                }
            };
            if answered {
                self.wire = Some(wire);
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    during: "waiting for the guest agent".into(),
                    timeout: SYNC_ROUND,
                });
            }
        }
    }

    /// Runs `command` and returns its `return` value; a connection that
    /// fails is dropped (the next command resynchronises).
    pub fn execute(&mut self, command: &str, args: Value, timeout: Duration) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        self.sync(deadline).map_err(|e| match e {
            Error::Timeout { during, .. } => Error::Timeout { during, timeout },
            e => e,
        })?;
        let r = self.execute_synced(command, args, deadline, timeout);
        if matches!(r, Err(Error::AgentIo { .. } | Error::Timeout { .. })) {
            self.wire = None;
        }
        r
    }

    fn execute_synced(
        &mut self,
        command: &str,
        args: Value,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value> {
        let id = random_id();
        let req = json!({"execute": command, "arguments": args, "id": id});
        let interrupt = self.interrupt.clone();
        let wire = self.wire.as_mut().expect("synced");
        wire.send_json(&req, None, deadline)
            .map_err(|e| io_err(&format!("sending {command}"), e))?;
        loop {
            let o = wire
                .object(deadline, interrupt.as_deref())
                .map_err(|e| match e {
                    WireError::Timeout => Error::Timeout {
                        during: format!("guest agent command {command}"),
                        timeout,
                    },
                    e => io_err(&format!("waiting for the answer to {command}"), e),
                })?;
            match reply::answer(o, id) {
                Answer::Other => continue,
                Answer::Return(r) => return Ok(r),
                Answer::Error(e) => {
                    return Err(Error::Agent {
                        command: command.to_string(),
                        message: e.desc,
                    })
                }
            }
        }
    }

    /// `guest-ping` (connecting and resynchronising first if needed).
    pub fn ping(&mut self, timeout: Duration) -> Result<()> {
        self.execute("guest-ping", json!({}), timeout).map(drop)
    }

    fn write_file(&mut self, path: &str, data: &[u8]) -> Result<()> {
        let h = self.open(path, "w")?;
        let r = data.chunks(1 << 20).try_for_each(|c| {
            self.execute(
                "guest-file-write",
                json!({"handle": h, "buf-b64": Base64::encode_string(c)}),
                COMMAND_TIMEOUT,
            )
            .map(drop)
        });
        let c = self.close(h);
        r.and(c)
    }

    fn open(&mut self, path: &str, mode: &str) -> Result<i64> {
        let h = self.execute(
            "guest-file-open",
            json!({"path": path, "mode": mode}),
            COMMAND_TIMEOUT,
        )?;
        Ok(reply::file_handle(&h)?)
    }

    fn close(&mut self, handle: i64) -> Result<()> {
        self.execute(
            "guest-file-close",
            json!({"handle": handle}),
            COMMAND_TIMEOUT,
        )
        .map(drop)
    }

    /// Reads what `handle` has now (until a short read).
    /// Reads the script's output file to its current end, or until
    /// `until` passes (or the interrupt flag is set) after a full chunk:
    /// an agent that answers full chunks forever, or a script that writes
    /// faster than the host reads, cannot hold the caller past its
    /// deadline. True when the end was reached.
    fn drain(&mut self, handle: i64, out: &mut Output<'_>, until: Instant) -> Result<bool> {
        loop {
            let r = self.execute(
                "guest-file-read",
                json!({"handle": handle, "count": READ_CHUNK}),
                COMMAND_TIMEOUT,
            )?;
            let read = reply::file_read(&r, READ_CHUNK)?;
            out.feed(&read.data);
            if read.data.len() < READ_CHUNK || read.data.is_empty() {
                return Ok(true);
            }
            if Instant::now() >= until || self.interrupted() {
                return Ok(false);
            }
        }
    }

    fn interrupted(&self) -> bool {
        self.interrupt
            .as_deref()
            .is_some_and(|f| f.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Starts `/bin/sh -c wrapper sh arg` in the guest (`arg` is the
    /// wrapper's `$1`) and returns its pid.
    fn spawn(&mut self, wrapper: &str, arg: &str) -> Result<i64> {
        let r = self.execute(
            "guest-exec",
            json!({"path": "/bin/sh", "arg": ["-c", wrapper, "sh", arg]}),
            COMMAND_TIMEOUT,
        )?;
        Ok(reply::exec_pid(&r)?)
    }

    /// The exit status of `pid`, once it exited.
    fn exit_status(&mut self, pid: i64) -> Result<Option<i32>> {
        let r = self.execute("guest-exec-status", json!({"pid": pid}), COMMAND_TIMEOUT)?;
        Ok(reply::exec_status(&r)?)
    }

    /// Kills `pid` and everything it started (stopped first, so nothing
    /// escapes by forking), with a script run by the agent.
    fn kill_tree(&mut self, pid: i64) -> Result<()> {
        let script = format!(
            "k() {{ local s p c st pp rest; kill -STOP $1 2>/dev/null; for s in /proc/[0-9]*/stat; do \
             read -r p c st pp rest < $s 2>/dev/null || continue; \
             [ \"$pp\" = \"$1\" ] && k $p; done; kill -9 $1 2>/dev/null; }}; k {pid}"
        );
        let k = self.spawn(&script, "")?;
        let end = Instant::now() + COMMAND_TIMEOUT;
        while Instant::now() < end {
            if self.exit_status(k)?.is_some() {
                // Reap the victim's entry in the agent.
                let _ = self.exit_status(pid);
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(Error::Timeout {
            during: "killing a script in the guest".into(),
            timeout: COMMAND_TIMEOUT,
        })
    }

    /// Runs `script` with `/bin/sh` in the guest, its stdout and stderr
    /// going to a file in the guest that is read while it runs: each output
    /// line reaches `on_line` within about 150 ms. Processes the script
    /// leaves in the background keep running. Past `timeout` the script and
    /// its children are killed and [`Error::ScriptTimeout`] returned.
    pub fn exec(
        &mut self,
        script: &str,
        on_line: &mut dyn FnMut(&str),
        timeout: Duration,
    ) -> Result<ExecOutcome> {
        let start = Instant::now();
        let id = format!("{:x}", random_id());
        let out_path = format!("/tmp/.kimberley-{id}.out");
        // A short script travels as an argument (one request); a long one
        // (an argument is at most 128 KiB in Linux) as a file.
        let (run, sh) = if script.len() <= INLINE_SCRIPT {
            ("/bin/sh -c \"$1\"".to_string(), None)
        } else {
            let sh = format!("/tmp/.kimberley-{id}.sh");
            self.write_file(&sh, script.as_bytes())?;
            (format!("/bin/sh {sh}"), Some(sh))
        };
        let remove = match &sh {
            Some(sh) => format!("{sh} {out_path}"),
            None => out_path.clone(),
        };
        // Our read handle is opened before the script runs, so the output
        // file can be unlinked by the wrapper at its end.
        let handle = self.open(&out_path, "w+")?;
        let wrapper =
            format!("exec </dev/null >>{out_path} 2>&1; {run}; s=$?; rm -f {remove}; exit $s");
        let inline = if sh.is_none() { script } else { "" };
        let mut out = Output::new(on_line, MAX_LINE, MAX_OUTPUT);
        let pid = match self.spawn(&wrapper, inline) {
            Ok(p) => p,
            Err(e) => {
                let _ = self.close(handle);
                return Err(e);
            }
        };
        let mut pause = FIRST_POLL;
        let status = loop {
            // The status first: once it has exited, what follows is all of
            // its output.
            let status = self.exit_status(pid)?;
            let all = self.drain(handle, &mut out, start + timeout)?;
            if let (Some(s), true) = (status, all) {
                break s;
            }
            if start.elapsed() >= timeout {
                self.kill_tree(pid)?;
                let _ = self.drain(handle, &mut out, Instant::now() + DRAIN_AFTER_KILL);
                out.finish();
                let _ = self.close(handle);
                let _ = self.execute(
                    "guest-exec",
                    json!({"path": "/bin/sh", "arg": ["-c", format!("rm -f {remove}")]}),
                    COMMAND_TIMEOUT,
                );
                return Err(Error::ScriptTimeout(timeout));
            }
            if self.interrupted() {
                return Err(Error::Interrupted);
            }
            if !all {
                // More output is waiting: read on at once.
                continue;
            }
            std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
            pause = (pause * 2).min(POLL);
        };
        out.finish();
        self.close(handle)?;
        let (lines, truncated) = out.into_lines();
        Ok(ExecOutcome {
            status,
            lines,
            truncated,
        })
    }
}
