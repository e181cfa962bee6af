//! The control socket: a Unix stream socket speaking one JSON object per
//! line in each direction (see docs/VMM.md, "Control protocol").

mod socket;

use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kimberley_formats::sys::poll;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::Result;
use crate::Machine;

/// The machine a control socket serves.
pub type Vm = Box<dyn Machine>;

pub use socket::ControlSocket;

/// Called for `{"cmd":"snapshot","dir":DIR}` with DIR absolute and not
/// existing (the server checked both and does not create it): writes a VM
/// directory there (its manifest format belongs to the caller), typically
/// via [`Machine::suspend_into`], atomically (built under a temporary name, renamed
/// into place without replacing anything). The server resumes the VM
/// afterwards if it was running before.
pub type SnapshotFn =
    Box<dyn FnMut(&mut dyn Machine, &Path) -> std::result::Result<(), String> + Send>;

/// Called for `{"cmd":"migrate","params":P}`: moves the VM elsewhere
/// (live migration; the caller's protocol). It may stream progress objects
/// to the client with [`MigrateIo::progress`] and must check
/// [`MigrateIo::cancelled`] often. `Ok(result)` means the VM now runs
/// elsewhere: the server answers `{"ok":true,"result":result}` and `serve`
/// returns [`Ending::Migrated`] with the VM paused. `Err(Failed)` means the
/// VM stays here: the callback leaves it as it found it (running or
/// paused). `Err(InDoubt)` means the hand-over may have happened: the VM is
/// left paused, is never resumed, and `serve` returns [`Ending::InDoubt`]
/// so the caller suspends it.
pub type MigrateFn = Box<
    dyn FnMut(
            &mut dyn Machine,
            &Value,
            &mut MigrateIo<'_>,
        ) -> std::result::Result<Value, MigrateError>
        + Send,
>;

/// How a migration that did not complete ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MigrateError {
    /// Nothing was handed over; the VM runs here as before.
    Failed(String),
    /// The other side may run the VM now: this copy must not run again.
    InDoubt(String),
}

/// The requesting client, seen from a [`MigrateFn`].
pub struct MigrateIo<'a> {
    stream: &'a mut UnixStream,
    stop: &'a AtomicBool,
}

impl MigrateIo<'_> {
    /// Sends `{"progress":v}` as one line to the client. False if the
    /// client is gone.
    pub fn progress(&mut self, v: Value) -> bool {
        write_blocking(self.stream, &line_of(&json!({ "progress": v })))
    }

    /// True if the client hung up or sent anything (a cancel request)
    /// while the migration runs, or the process is being stopped (the stop
    /// flag: SIGINT/SIGTERM cancels a migration).
    pub fn cancelled(&mut self) -> bool {
        self.stop.load(Ordering::SeqCst)
            || poll::readable_one(self.stream.as_raw_fd(), Some(Duration::ZERO)).unwrap_or(true)
    }
}

/// Why [`serve_with`] returned.
#[derive(Debug)]
pub enum Ending {
    /// `stop` request or the stop flag: the caller should save the VM.
    Stopped,
    /// The VM was migrated away (the [`MigrateFn`]'s result): the paused
    /// local copy must not run again.
    Migrated(Value),
    /// A migration's hand-over is in doubt (the message says why): the
    /// paused local copy must not run again; the caller suspends it.
    InDoubt(String),
}

/// The caller's handlers of the requests that need more than the `Vm`.
pub struct Hooks {
    /// For `snapshot`.
    pub snapshot: SnapshotFn,
    /// For `migrate` (None: the request is refused).
    pub migrate: Option<MigrateFn>,
}

/// Longest request line accepted, line end included: 1 MiB (a script is
/// lines of at most 1024 bytes; 1 MiB holds about a thousand of them even
/// with JSON escaping). A client that sends more without a line end gets
/// one error line and is disconnected.
pub const MAX_REQUEST: usize = 1 << 20;
/// Most clients connected at once. When another connects, the one idle
/// longest (connected or last answered earliest) gets one error line and
/// is disconnected.
pub const MAX_CLIENTS: usize = 16;
/// Default time limit of `exec` when the request gives none.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(600);
/// How long the server sleeps in poll(2) between looks at the stop flag.
const TICK: Duration = Duration::from_millis(20);
/// Most bytes read from one client before serving the others.
const READ_CHUNK: usize = 64 * 1024;
/// Time given to unsent answers when the server ends.
const FINAL_FLUSH: Duration = Duration::from_secs(1);

// Every variant is a struct variant: `deny_unknown_fields` does not apply
// to the unit variants of an internally tagged enum (`{"cmd":"stop","x":1}`
// would be accepted).
#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Status {},
    Pause {},
    Resume {},
    Snapshot {
        dir: PathBuf,
    },
    Stop {},
    Exec {
        script: String,
        timeout_ms: Option<u64>,
    },
    Migrate {
        #[serde(default)]
        params: Value,
    },
}

/// One connected client: what it sent that is not answered yet, and what
/// we owe it that it has not read yet.
struct Client {
    stream: UnixStream,
    inbuf: Vec<u8>,
    /// Bytes at the start of `inbuf` known to hold no line end.
    scanned: usize,
    out: Vec<u8>,
    /// Connected or last answered.
    since: Instant,
    /// No more requests from it: close once `out` is sent.
    closing: bool,
    gone: bool,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        Client {
            stream,
            inbuf: Vec::new(),
            scanned: 0,
            out: Vec::new(),
            since: Instant::now(),
            closing: false,
            gone: false,
        }
    }

    fn queue(&mut self, v: &Value) {
        self.out.extend_from_slice(line_of(v).as_bytes());
    }

    /// Writes what it can of `out` without blocking.
    fn flush(&mut self) {
        while !self.out.is_empty() {
            match self.stream.write(&self.out) {
                Ok(0) => {
                    self.gone = true;
                    return;
                }
                Ok(n) => {
                    self.out.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.gone = true;
                    return;
                }
            }
        }
        if self.out.capacity() > READ_CHUNK {
            self.out = Vec::new();
        }
        if self.closing {
            self.gone = true;
        }
    }

    /// True if the peer closed the connection (what it sent last is
    /// dropped: it could not read the answers).
    fn hung_up(&self) -> bool {
        poll::hung_up(self.stream.as_raw_fd()).unwrap_or(true)
    }

    /// The next complete request line, without its line end.
    fn next_line(&mut self) -> Option<Vec<u8>> {
        let pos = self.scanned
            + self.inbuf[self.scanned..]
                .iter()
                .position(|&b| b == b'\n')?;
        let mut line: Vec<u8> = self.inbuf.drain(..=pos).collect();
        line.pop();
        self.scanned = 0;
        if self.inbuf.is_empty() && self.inbuf.capacity() > READ_CHUNK {
            self.inbuf = Vec::new();
        }
        Some(line)
    }
}

fn fail(e: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": e.to_string()})
}

fn line_of(v: &Value) -> String {
    let mut line = v.to_string();
    line.push('\n');
    line
}

/// Writes `line` to the (non-blocking) stream, waiting up to 10 s: for
/// migration progress, which the requesting client reads as it comes.
fn write_blocking(stream: &mut UnixStream, line: &str) -> bool {
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let ok = stream.write_all(line.as_bytes()).is_ok();
    let _ = stream.set_nonblocking(true);
    ok
}

fn status(vm: &dyn Machine) -> Value {
    let info = vm.info();
    let status = if info.exited.is_some() {
        "crashed"
    } else if vm.is_paused() {
        "paused"
    } else {
        "running"
    };
    let mut v = json!({
        "ok": true,
        "status": status,
        "backend": info.backend,
        "ready": info.ready,
        "uptime_ms": info.uptime.as_millis() as u64,
        "memory_size": info.memory_size,
        "vcpus": info.vcpus,
        "disks": info.disks,
    });
    if let Some(e) = info.exited {
        v["guest_error"] = Value::String(e);
    }
    v
}

fn snapshot(vm: &mut dyn Machine, hooks: &mut Hooks, dir: &Path) -> Value {
    if !dir.is_absolute() {
        return fail(format!(
            "snapshot directory {} must be an absolute path",
            dir.display()
        ));
    }
    if std::fs::symlink_metadata(dir).is_ok() {
        return fail(format!("{} already exists", dir.display()));
    }
    let was_running = !vm.is_paused();
    let r = (hooks.snapshot)(vm, dir);
    let resumed = if was_running {
        vm.resume().map_err(|e| e.to_string())
    } else {
        Ok(())
    };
    match r.and(resumed) {
        Ok(()) => json!({"ok": true, "dir": dir}),
        Err(e) => fail(e),
    }
}

/// Answers one request line; `Some` when the server should end.
fn handle(
    vm: &mut dyn Machine,
    hooks: &mut Hooks,
    stop: &AtomicBool,
    stream: &mut UnixStream,
    line: &[u8],
) -> (Value, Option<Ending>) {
    // serde would also take `["status"]` (the tag, then the fields).
    if line.trim_ascii_start().first() != Some(&b'{') {
        return (fail("bad request: not a JSON object"), None);
    }
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return (fail(format!("bad request: {e}")), None),
    };
    let reply = match req {
        Request::Status {} => status(vm),
        Request::Pause {} => match vm.pause() {
            Ok(()) => json!({"ok": true, "status": "paused"}),
            Err(e) => fail(e),
        },
        Request::Resume {} => match vm.resume() {
            Ok(()) => json!({"ok": true, "status": "running"}),
            Err(e) => fail(e),
        },
        Request::Exec { script, timeout_ms } => {
            let t = timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_EXEC_TIMEOUT);
            match vm.agent().run_script(&script, &mut |_| {}, t) {
                Ok(o) => json!({"ok": true, "status": o.status, "output": o.lines.join("\n")}),
                Err(e) => fail(e),
            }
        }
        Request::Snapshot { dir } => snapshot(vm, hooks, &dir),
        Request::Migrate { params } => {
            let Some(m) = hooks.migrate.as_mut() else {
                return (
                    fail("this VMM cannot migrate (run it with `vmigrate run`)"),
                    None,
                );
            };
            let was_running = !vm.is_paused();
            let mut io = MigrateIo { stream, stop };
            return match m(vm, &params, &mut io) {
                Ok(result) => {
                    let _ = vm.pause();
                    (
                        json!({"ok": true, "result": result}),
                        Some(Ending::Migrated(result)),
                    )
                }
                Err(MigrateError::Failed(e)) => {
                    if was_running && vm.is_paused() {
                        let _ = vm.resume();
                    }
                    (fail(e), None)
                }
                Err(MigrateError::InDoubt(e)) => {
                    let _ = vm.pause();
                    let mut r = fail(&e);
                    r["in_doubt"] = Value::Bool(true);
                    (r, Some(Ending::InDoubt(e)))
                }
            };
        }
        Request::Stop {} => {
            return match vm.pause() {
                Ok(()) => (
                    json!({"ok": true, "status": "stopped"}),
                    Some(Ending::Stopped),
                ),
                Err(e) => (fail(e), None),
            }
        }
    };
    (reply, None)
}

/// Serves control requests on `sock` until `stop` is set (e.g. by
/// [`crate::stop_on_signals`]) or a client sends `stop`. Guest output that
/// is not part of a script goes to `console`. Returns the VM, paused, so
/// the caller can save it. The socket file is removed when this returns.
pub fn serve(
    vm: Vm,
    sock: ControlSocket,
    snapshot: SnapshotFn,
    stop: Arc<AtomicBool>,
    console: Box<dyn FnMut(&str) + Send>,
) -> Result<Vm> {
    let hooks = Hooks {
        snapshot,
        migrate: None,
    };
    serve_with(vm, sock, hooks, stop, console).map(|(vm, _)| vm)
}

/// [`serve`] with all hooks: also answers `migrate` when `hooks.migrate` is
/// set, and says why it returned. `stop` also interrupts a running `exec`
/// (the VM's waits watch it, see [`Machine::set_interrupt`]) and cancels a
/// migration.
pub fn serve_with(
    mut vm: Vm,
    sock: ControlSocket,
    mut hooks: Hooks,
    stop: Arc<AtomicBool>,
    mut console: Box<dyn FnMut(&str) + Send>,
) -> Result<(Vm, Ending)> {
    vm.set_interrupt(stop.clone());
    let mut clients: Vec<Client> = Vec::new();
    let mut ending = None;
    while !stop.load(Ordering::SeqCst) {
        for c in clients.iter_mut() {
            ending = serve_client(vm.as_mut(), &mut hooks, &stop, c);
            if ending.is_some() {
                break;
            }
        }
        // Clients that hung up are gone before new ones are admitted.
        clients.retain(|c| !c.gone);
        for l in vm.take_console_lines() {
            console(&l);
        }
        if ending.is_some() {
            break;
        }
        while let Some(s) = sock.accept() {
            admit(&mut clients, s);
        }
        wait(&sock, &clients);
    }
    let paused = match ending {
        Some(_) => Ok(()),
        None => vm.pause(),
    };
    flush_all(&mut clients);
    drop(sock);
    paused.map(|()| (vm, ending.unwrap_or(Ending::Stopped)))
}

/// Adds a client. If all slots are taken, clients that hung up are let go
/// first, then the one idle longest is told and closed.
fn admit(clients: &mut Vec<Client>, stream: UnixStream) {
    if clients.len() >= MAX_CLIENTS {
        clients.retain(|c| !c.hung_up());
    }
    if clients.len() >= MAX_CLIENTS {
        if let Some(i) = (0..clients.len()).min_by_key(|&i| clients[i].since) {
            let mut old = clients.remove(i);
            old.out.clear();
            old.queue(&fail(format!(
                "too many control clients ({MAX_CLIENTS}): closing the one idle longest"
            )));
            old.flush();
        }
    }
    clients.push(Client::new(stream));
}

/// Sends what is owed to `c`, then answers its complete requests (one at a
/// time: the next only once the answer is sent) and reads at most
/// [`READ_CHUNK`] bytes, never holding more than [`MAX_REQUEST`].
fn serve_client(
    vm: &mut dyn Machine,
    hooks: &mut Hooks,
    stop: &AtomicBool,
    c: &mut Client,
) -> Option<Ending> {
    let mut read = false;
    loop {
        c.flush();
        if c.gone || !c.out.is_empty() || c.closing {
            return None;
        }
        if let Some(line) = c.next_line() {
            if line.iter().all(|b| b.is_ascii_whitespace()) {
                continue;
            }
            let (reply, ending) = handle(vm, hooks, stop, &mut c.stream, &line);
            c.queue(&reply);
            c.since = Instant::now();
            if ending.is_some() {
                c.closing = true;
                c.flush();
                return ending;
            }
            continue;
        }
        c.scanned = c.inbuf.len();
        if c.inbuf.len() >= MAX_REQUEST {
            c.queue(&fail(format!(
                "request longer than {MAX_REQUEST} bytes without a line end"
            )));
            c.closing = true;
            continue;
        }
        if read {
            return None;
        }
        read = true;
        let mut tmp = [0u8; READ_CHUNK];
        let room = (MAX_REQUEST - c.inbuf.len()).min(READ_CHUNK);
        match c.stream.read(&mut tmp[..room]) {
            Ok(0) => {
                c.gone = true;
                return None;
            }
            Ok(n) => c.inbuf.extend_from_slice(&tmp[..n]),
            Err(e) if e.kind() == ErrorKind::Interrupted => read = false,
            Err(e) if e.kind() == ErrorKind::WouldBlock => return None,
            Err(_) => {
                c.gone = true;
                return None;
            }
        }
    }
}

/// Waits (at most [`TICK`]) for a connection, a request, or room to send.
fn wait(sock: &ControlSocket, clients: &[Client]) {
    let fds: Vec<_> = std::iter::once((sock.listener().as_raw_fd(), poll::Want::Read))
        .chain(clients.iter().map(|c| {
            let want = if c.out.is_empty() {
                poll::Want::Read
            } else {
                poll::Want::Write
            };
            (c.stream.as_raw_fd(), want)
        }))
        .collect();
    let _ = poll::ready(&fds, Some(TICK));
}

/// Gives unsent answers (e.g. to `stop`, or an interrupted `exec`) a
/// moment to go out before the connections close.
fn flush_all(clients: &mut [Client]) {
    let deadline = Instant::now() + FINAL_FLUSH;
    for c in clients.iter_mut().filter(|c| !c.out.is_empty() && !c.gone) {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let _ = c.stream.set_nonblocking(false);
        let _ = c.stream.set_write_timeout(Some(left));
        let _ = c.stream.write_all(&c.out);
    }
}
