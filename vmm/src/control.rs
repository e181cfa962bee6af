//! The control socket: a Unix stream socket speaking one JSON object per
//! line in each direction (see docs/VMM.md, "Control protocol").

use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::vm::Vm;

/// Called for `{"cmd":"snapshot","dir":DIR}`: writes a VM directory (its
/// manifest format belongs to the caller), typically via [`Vm::save`]. The
/// server resumes the VM afterwards if it was running before.
pub type SnapshotFn = Box<dyn FnMut(&mut Vm, &Path) -> std::result::Result<(), String> + Send>;

/// Called for `{"cmd":"migrate","params":P}`: moves the VM elsewhere
/// (live migration; the caller's protocol). It may stream progress objects
/// to the client with [`MigrateIo::progress`] and must check
/// [`MigrateIo::cancelled`] often. `Ok(result)` means the VM now runs
/// elsewhere: the server answers `{"ok":true,"result":result}` and `serve`
/// returns [`Ending::Migrated`] with the VM paused. `Err` means the VM stays
/// here: the callback leaves it as it found it (running or paused).
pub type MigrateFn = Box<
    dyn FnMut(&mut Vm, &Value, &mut MigrateIo<'_>) -> std::result::Result<Value, String> + Send,
>;

/// The requesting client, seen from a [`MigrateFn`].
pub struct MigrateIo<'a> {
    stream: &'a mut UnixStream,
}

impl MigrateIo<'_> {
    /// Sends `{"progress":v}` as one line to the client. False if the
    /// client is gone.
    pub fn progress(&mut self, v: Value) -> bool {
        send(self.stream, &json!({ "progress": v }))
    }

    /// True if the client hung up or sent anything (a cancel request)
    /// while the migration runs.
    pub fn cancelled(&mut self) -> bool {
        let mut fd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, zero timeout.
        let n = unsafe { libc::poll(&mut fd, 1, 0) };
        n > 0 && fd.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
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
}

/// The caller's handlers of the requests that need more than the `Vm`.
pub struct Hooks {
    /// For `snapshot`.
    pub snapshot: SnapshotFn,
    /// For `migrate` (None: the request is refused).
    pub migrate: Option<MigrateFn>,
}

/// Longest request line accepted.
pub const MAX_REQUEST: usize = 16 << 20;
/// Default time limit of `exec` when the request gives none.
pub const DEFAULT_EXEC_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase", deny_unknown_fields)]
enum Request {
    Status,
    Pause,
    Resume,
    Snapshot {
        dir: PathBuf,
    },
    Stop,
    Exec {
        script: String,
        timeout_ms: Option<u64>,
    },
    Migrate {
        #[serde(default)]
        params: Value,
    },
}

struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
}

enum Outcome {
    Reply(Value),
    Stop(Value),
    Migrated(Value, Value),
}

fn fail(e: impl std::fmt::Display) -> Value {
    json!({"ok": false, "error": e.to_string()})
}

fn handle(vm: &mut Vm, hooks: &mut Hooks, stream: &mut UnixStream, line: &[u8]) -> Outcome {
    let req: Request = match serde_json::from_slice(line) {
        Ok(r) => r,
        Err(e) => return Outcome::Reply(fail(format!("bad request: {e}"))),
    };
    let reply = match req {
        Request::Status => {
            let err = vm.exit_error();
            let status = if err.is_some() {
                "crashed"
            } else if vm.is_paused() {
                "paused"
            } else {
                "running"
            };
            let mut v = json!({
                "ok": true,
                "status": status,
                "ready": vm.is_ready(),
                "uptime_ms": vm.uptime().as_millis() as u64,
                "memory_size": vm.memory_size(),
                "vcpus": vm.vcpus(),
                "disks": vm.disk_paths(),
            });
            if let Some(e) = err {
                v["guest_error"] = Value::String(e.to_string());
            }
            v
        }
        Request::Pause => match vm.pause() {
            Ok(()) => json!({"ok": true, "status": "paused"}),
            Err(e) => fail(e),
        },
        Request::Resume => match vm.resume() {
            Ok(()) => json!({"ok": true, "status": "running"}),
            Err(e) => fail(e),
        },
        Request::Exec { script, timeout_ms } => {
            let t = timeout_ms
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_EXEC_TIMEOUT);
            match vm.run_script(&script, &mut |_| {}, t) {
                Ok(o) => json!({"ok": true, "status": o.status, "output": o.lines.join("\n")}),
                Err(e) => fail(e),
            }
        }
        Request::Snapshot { dir } => {
            let was_running = !vm.is_paused();
            let r = std::fs::create_dir_all(&dir)
                .map_err(|e| format!("create {}: {e}", dir.display()))
                .and_then(|()| (hooks.snapshot)(vm, &dir));
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
        Request::Migrate { params } => {
            let Some(m) = hooks.migrate.as_mut() else {
                return Outcome::Reply(fail(
                    "this VMM cannot migrate (run it with `vmigrate run`)",
                ));
            };
            let was_running = !vm.is_paused();
            let mut io = MigrateIo { stream };
            return match m(vm, &params, &mut io) {
                Ok(result) => {
                    let _ = vm.pause();
                    Outcome::Migrated(json!({"ok": true, "result": result}), result)
                }
                Err(e) => {
                    if was_running && vm.is_paused() {
                        let _ = vm.resume();
                    }
                    Outcome::Reply(fail(e))
                }
            };
        }
        Request::Stop => {
            return match vm.pause() {
                Ok(()) => Outcome::Stop(json!({"ok": true, "status": "stopped"})),
                Err(e) => Outcome::Reply(fail(e)),
            }
        }
    };
    Outcome::Reply(reply)
}

fn send(stream: &mut UnixStream, v: &Value) -> bool {
    let mut line = v.to_string();
    line.push('\n');
    let _ = stream.set_nonblocking(false);
    let _ = stream.set_write_timeout(Some(Duration::from_secs(10)));
    let ok = stream.write_all(line.as_bytes()).is_ok();
    let _ = stream.set_nonblocking(true);
    ok
}

fn bind(socket: &Path) -> Result<UnixListener> {
    if let Ok(m) = std::fs::symlink_metadata(socket) {
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(socket);
        }
    }
    let l = UnixListener::bind(socket)
        .map_err(|e| Error::io(format!("bind {}", socket.display()), e))?;
    l.set_nonblocking(true)
        .map_err(|e| Error::io("set socket non-blocking", e))?;
    Ok(l)
}

/// Serves control requests on `socket` until `stop` is set (e.g. by
/// [`crate::stop_on_signals`]) or a client sends `stop`. Guest output that
/// is not part of a script goes to `console`. Returns the VM, paused, so
/// the caller can save it.
pub fn serve(
    vm: Vm,
    socket: &Path,
    snapshot: SnapshotFn,
    stop: Arc<AtomicBool>,
    console: Box<dyn FnMut(&str) + Send>,
) -> Result<Vm> {
    let hooks = Hooks {
        snapshot,
        migrate: None,
    };
    serve_with(vm, socket, hooks, stop, console).map(|(vm, _)| vm)
}

/// [`serve`] with all hooks: also answers `migrate` when `hooks.migrate` is
/// set, and says why it returned.
pub fn serve_with(
    mut vm: Vm,
    socket: &Path,
    mut hooks: Hooks,
    stop: Arc<AtomicBool>,
    mut console: Box<dyn FnMut(&str) + Send>,
) -> Result<(Vm, Ending)> {
    let listener = bind(socket)?;
    let mut ending = Ending::Stopped;
    let mut clients: Vec<Client> = Vec::new();
    let result = loop {
        if stop.load(Ordering::SeqCst) {
            break vm.pause();
        }
        loop {
            match listener.accept() {
                Ok((s, _)) => {
                    if s.set_nonblocking(true).is_ok() {
                        clients.push(Client {
                            stream: s,
                            buf: Vec::new(),
                        });
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break,
            }
        }
        let mut stopping = false;
        let mut i = 0;
        while i < clients.len() {
            let (alive, stop_now) = serve_client(&mut vm, &mut hooks, &mut clients[i]);
            if let Some(e) = stop_now {
                stopping = true;
                ending = e;
            }
            if alive {
                i += 1;
            } else {
                clients.remove(i);
            }
            if stopping {
                break;
            }
        }
        for l in vm.take_console_lines() {
            console(&l);
        }
        if stopping {
            break Ok(());
        }
        wait_readable(&listener, &clients, 20);
    };
    let _ = std::fs::remove_file(socket);
    result.map(|()| (vm, ending))
}

/// Reads what a client sent and answers complete lines. Returns (keep the
/// client, why to stop if the server should).
fn serve_client(vm: &mut Vm, hooks: &mut Hooks, c: &mut Client) -> (bool, Option<Ending>) {
    let mut tmp = [0u8; 64 * 1024];
    let mut eof = false;
    loop {
        match c.stream.read(&mut tmp) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => {
                c.buf.extend_from_slice(&tmp[..n]);
                if c.buf.len() > MAX_REQUEST && !c.buf.contains(&b'\n') {
                    send(
                        &mut c.stream,
                        &fail(format!("request longer than {MAX_REQUEST} bytes")),
                    );
                    return (false, None);
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return (false, None),
        }
    }
    while let Some(pos) = c.buf.iter().position(|&b| b == b'\n') {
        let line: Vec<u8> = c.buf.drain(..=pos).collect();
        let line = &line[..line.len() - 1];
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        match handle(vm, hooks, &mut c.stream, line) {
            Outcome::Reply(v) => {
                if !send(&mut c.stream, &v) {
                    return (false, None);
                }
            }
            Outcome::Stop(v) => {
                send(&mut c.stream, &v);
                return (false, Some(Ending::Stopped));
            }
            Outcome::Migrated(v, result) => {
                send(&mut c.stream, &v);
                return (false, Some(Ending::Migrated(result)));
            }
        }
    }
    (!eof, None)
}

fn wait_readable(l: &UnixListener, clients: &[Client], ms: i32) {
    let mut fds: Vec<libc::pollfd> = std::iter::once(l.as_raw_fd())
        .chain(clients.iter().map(|c| c.stream.as_raw_fd()))
        .map(|fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: fds is a valid array of pollfd of the given length.
    unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
}
