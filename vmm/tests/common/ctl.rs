//! A control-socket client for tests, shared by the vmm, dekimberlize and
//! vmigrate suites (included with `#[path]`; the one home of these
//! helpers): requests, the check of every request through a serving
//! process's real socket, and a connection attempt from another uid.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// One connection to a control socket.
pub struct Client {
    pub w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    /// Connects, waiting up to 60 s for the socket to appear.
    pub fn connect(p: &Path) -> Client {
        let t = Instant::now();
        loop {
            match UnixStream::connect(p) {
                Ok(s) => return Client::from(s),
                Err(e) => assert!(
                    t.elapsed() < Duration::from_secs(60),
                    "cannot connect to {}: {e}",
                    p.display()
                ),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Connects to a socket that must be there already.
    pub fn open(p: &Path) -> Client {
        Client::from(UnixStream::connect(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
    }

    pub fn from(s: UnixStream) -> Client {
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        Client {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    /// Sends one request line, returns the answer.
    pub fn call(&mut self, req: &str) -> Value {
        self.w.write_all(req.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        self.answer()
    }

    /// Reads one answer line.
    pub fn answer(&mut self) -> Value {
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("bad answer {line:?}: {e}"))
    }

    pub fn call_json(&mut self, v: Value) -> Value {
        self.call(&v.to_string())
    }

    /// Runs a script that must succeed; returns its output lines.
    pub fn exec_ok(&mut self, script: &str) -> Vec<String> {
        self.exec_timeout(script, Some(60000))
    }

    /// [`Client::exec_ok`] with another timeout (`None`: the server's).
    pub fn exec_timeout(&mut self, script: &str, timeout_ms: Option<u64>) -> Vec<String> {
        let mut req = json!({"cmd": "exec", "script": script});
        if let Some(ms) = timeout_ms {
            req["timeout_ms"] = ms.into();
        }
        let v = self.call_json(req);
        assert_eq!(v["ok"], true, "{v}");
        assert_eq!(v["status"], 0, "{v}");
        v["output"]
            .as_str()
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }
}

/// The value printed after `what` (e.g. "checksum app").
pub fn value(lines: &[String], what: &str) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix(what).map(|v| v.trim().to_string()))
        .unwrap_or_else(|| panic!("no {what:?} in {lines:?}"))
}

/// Sends `cmd` (pause, resume), which answers with `status` and makes it
/// the status.
fn switch(c: &mut Client, cmd: &str, status: &str) {
    let r = c.call_json(json!({ "cmd": cmd }));
    assert_eq!(r, json!({"ok": true, "status": status}));
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], status);
}

fn refused(r: &Value, what: &str) {
    assert_eq!(r["ok"], false, "{what}: {r}");
    assert!(r["error"].is_string(), "{what}: {r}");
}

/// Checks every control request through a serving process's socket:
/// status, exec, pause, resume, snapshot into `snap` (which must not exist
/// and whose parent must), and migrate (refused unless `can_migrate`; with
/// a hook, bad parameters are refused). Leaves the VM running; the caller
/// sends `stop` and checks `snap`.
pub fn check_every_request(sock: &Path, snap: &Path, can_migrate: bool) {
    let mut c = Client::connect(sock);
    let st = c.call(r#"{"cmd":"status"}"#);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["status"], "running", "{st}");
    assert_eq!(st["ready"], true, "{st}");
    assert!(st["memory_size"].as_u64().unwrap() >= 16 << 20, "{st}");
    assert!(st["vcpus"].as_u64().unwrap() >= 1, "{st}");
    assert!(st["disks"].is_array(), "{st}");
    assert!(st["uptime_ms"].is_u64(), "{st}");

    assert_eq!(c.exec_ok("print one\nprint two"), ["one", "two"]);
    let r = c.call_json(json!({"cmd": "exec", "script": "nonsense"}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["status"], 1, "{r}");

    switch(&mut c, "pause", "paused");
    let r = c.call_json(json!({"cmd": "exec", "script": "print x"}));
    refused(&r, "exec while paused");
    switch(&mut c, "resume", "running");

    // Snapshots: absolute paths that do not exist only.
    let r = c.call_json(json!({"cmd": "snapshot", "dir": "relative/snap"}));
    refused(&r, "relative snapshot dir");
    assert!(r["error"].as_str().unwrap().contains("absolute"), "{r}");
    let parent = snap.parent().unwrap();
    let r = c.call_json(json!({"cmd": "snapshot", "dir": parent}));
    refused(&r, "existing snapshot dir");
    assert!(!snap.exists());
    let r = c.call_json(json!({"cmd": "snapshot", "dir": snap}));
    assert_eq!(r, json!({"ok": true, "dir": snap}), "snapshot");
    assert!(snap.join("manifest.json").exists());
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "running");
    let r = c.call_json(json!({"cmd": "snapshot", "dir": snap}));
    refused(&r, "snapshot over an existing snapshot");

    // Snapshot of a paused VM leaves it paused.
    c.call(r#"{"cmd":"pause"}"#);
    let snap2 = PathBuf::from(format!("{}-paused", snap.display()));
    let r = c.call_json(json!({"cmd": "snapshot", "dir": snap2}));
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "paused");
    c.call(r#"{"cmd":"resume"}"#);

    let r = c.call_json(json!({"cmd": "migrate", "params": {}}));
    refused(&r, "migrate");
    if !can_migrate {
        assert!(
            r["error"].as_str().unwrap().contains("cannot migrate"),
            "{r}"
        );
    }
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "running");
    check_strict_parsing(&mut c);
    assert_eq!(c.exec_ok("print still here"), ["still here"]);
}

/// Requests with unknown fields, unknown commands or wrong types are
/// refused, and the connection stays usable.
pub fn check_strict_parsing(c: &mut Client) {
    for bad in [
        r#"{"cmd":"status","x":1}"#,
        r#"{"cmd":"pause","x":1}"#,
        r#"{"cmd":"resume","x":1}"#,
        r#"{"cmd":"stop","x":1}"#,
        r#"{"cmd":"stop","force":true}"#,
        r#"{"cmd":"exec","script":"print a","x":1}"#,
        r#"{"cmd":"exec","script":"print a","timeout":5}"#,
        r#"{"cmd":"snapshot","dir":"/nonexistent/kimberley-snap","x":1}"#,
        r#"{"cmd":"migrate","params":{},"x":1}"#,
        r#"{"cmd":"fly"}"#,
        r#"{"cmd":"Status"}"#,
        r#"{"cmd":5}"#,
        r#"{"cmd":null}"#,
        r#"{"x":1}"#,
        r#"{}"#,
        r#"{"cmd":"exec","script":5}"#,
        r#"{"cmd":"exec"}"#,
        r#"{"cmd":"exec","script":"print a","timeout_ms":"5"}"#,
        r#"{"cmd":"exec","script":"print a","timeout_ms":-1}"#,
        r#"{"cmd":"snapshot","dir":7}"#,
        r#"{"cmd":"snapshot"}"#,
        r#"{"cmd":"status","cmd":"stop"}"#,
        r#"{"cmd":"exec","script":"print a","script":"print b"}"#,
        r#"["status"]"#,
        r#""status""#,
        r#"{"cmd":"status"} {"cmd":"stop"}"#,
        "not json",
    ] {
        let r = c.call(bad);
        refused(&r, bad);
        let st = c.call(r#"{"cmd":"status"}"#);
        assert_eq!(st["ok"], true, "after {bad}: {st}");
        assert_ne!(st["status"], "paused", "after {bad}: {st}");
    }
}

/// What a connection attempt from another uid got.
#[derive(Debug, PartialEq, Eq)]
pub enum Foreign {
    /// connect(2) failed with this errno.
    ConnectFailed(i32),
    /// Connected, but the server closed the connection without answering.
    Closed,
    /// The server answered (the attack worked).
    Answered(String),
}

/// From a forked child running as `uid`/`gid` with no supplementary
/// groups: connects to `sock`, sends `{"cmd":"status"}` and reads the
/// answer (5 s at most).
pub fn status_as(sock: &Path, uid: u32, gid: u32) -> Foreign {
    use std::os::unix::ffi::OsStrExt;
    let path = sock.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path fits (checked).
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    assert!(path.len() < addr.sun_path.len(), "socket path too long");
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(path) {
        *d = *s as libc::c_char;
    }
    let mut pipe = [0 as libc::c_int; 2];
    // SAFETY: pipe writes two descriptors into the array.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let req = b"{\"cmd\":\"status\"}\n";
    // SAFETY: the child only makes async-signal-safe system calls on
    // memory prepared before the fork, then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        // SAFETY: raw system calls on valid buffers; no allocation.
        unsafe {
            libc::close(pipe[0]);
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(gid) != 0
                || libc::setuid(uid) != 0
            {
                libc::_exit(20);
            }
            let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0);
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            if libc::connect(fd, &addr as *const _ as *const libc::sockaddr, len) != 0 {
                let e = *libc::__errno_location();
                let code = e as u8;
                libc::write(pipe[1], &code as *const u8 as *const libc::c_void, 1);
                libc::_exit(10);
            }
            libc::write(fd, req.as_ptr() as *const libc::c_void, req.len());
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            if libc::poll(&mut p, 1, 5000) <= 0 {
                libc::_exit(13);
            }
            let mut buf = [0u8; 512];
            let n = libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
            if n <= 0 {
                libc::_exit(12);
            }
            libc::write(pipe[1], buf.as_ptr() as *const libc::c_void, n as usize);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end; reading into a valid buffer.
    unsafe { libc::close(pipe[1]) };
    let mut out = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        // SAFETY: valid buffer of the given length.
        let n = unsafe { libc::read(pipe[0], buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
        if n <= 0 {
            break;
        }
        out.extend_from_slice(&buf[..n as usize]);
    }
    let mut status = 0;
    // SAFETY: waiting for our own child; closing our read end.
    unsafe {
        libc::close(pipe[0]);
        libc::waitpid(pid, &mut status, 0);
    }
    assert!(libc::WIFEXITED(status), "child died: {status}");
    match libc::WEXITSTATUS(status) {
        0 => Foreign::Answered(String::from_utf8_lossy(&out).into_owned()),
        10 => Foreign::ConnectFailed(out.first().copied().unwrap_or(0) as i32),
        12 => Foreign::Closed,
        13 => panic!("no answer and no close within 5 s"),
        c => panic!("child failed with {c}"),
    }
}
