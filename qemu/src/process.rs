//! A QEMU process: started in a private working directory for its sockets,
//! killed with us, its serial console and stderr read into bounded buffers,
//! killed and reaped when dropped.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::sys;

/// Console lines kept for [`QemuProcess::take_console_lines`] (older ones
/// are dropped).
const MAX_PENDING_LINES: usize = 10_000;
/// Longest console line kept (longer ones are cut).
const MAX_LINE: usize = 4096;
/// Console lines kept for error messages.
const TAIL_LINES: usize = 200;
/// QEMU's stderr lines shown in error messages.
const STDERR_LINES: usize = 8;
/// QEMU's stderr kept for error messages.
const MAX_STDERR: usize = 16 << 10;

/// A private directory (0700), removed with its contents when dropped or
/// when SIGINT/SIGTERM interrupts the process
/// (`kimberley_formats::cleanup`).
#[derive(Debug)]
pub struct WorkDir {
    path: PathBuf,
    _reg: kimberley_formats::cleanup::Registered,
}

impl WorkDir {
    /// A new one under the temporary directory.
    pub fn new() -> Result<WorkDir> {
        let prefix = std::env::temp_dir().join("kimberley-qemu-");
        kimberley_formats::cleanup::create_scratch(|| {
            kimberley_formats::sys::tempdir::create(&prefix)
        })
        .map(|(path, _reg)| WorkDir { path, _reg })
        .map_err(|e| {
            Error::io(
                format!("creating a directory under {}", prefix.display()),
                e,
            )
        })
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[derive(Default)]
struct Console {
    pending: VecDeque<String>,
    tail: VecDeque<String>,
    partial: Vec<u8>,
}

impl Console {
    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.line();
            } else if b != b'\r' && self.partial.len() < MAX_LINE {
                self.partial.push(b);
            }
        }
    }

    fn line(&mut self) {
        let l = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        if self.pending.len() == MAX_PENDING_LINES {
            self.pending.pop_front();
        }
        self.pending.push_back(l.clone());
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(l);
    }
}

/// A running `qemu-system-x86_64`.
pub struct QemuProcess {
    child: Child,
    status: Option<ExitStatus>,
    console: Arc<Mutex<Console>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
    // Last: removed after the process is gone.
    work: WorkDir,
}

impl std::fmt::Debug for QemuProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuProcess")
            .field("pid", &self.child.id())
            .field("work", &self.work)
            .finish()
    }
}

/// Reads `out` to its end on a thread of its own, keeping the first
/// [`MAX_STDERR`] bytes in `log`.
fn log_into(mut out: impl Read + Send + 'static, log: Arc<Mutex<Vec<u8>>>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = out.read(&mut buf) {
            let mut e = log.lock().unwrap_or_else(|p| p.into_inner());
            let room = MAX_STDERR.saturating_sub(e.len());
            e.extend_from_slice(&buf[..n.min(room)]);
        }
    })
}

impl QemuProcess {
    /// Starts `program` with `args` in `work` (stdin from /dev/null), in
    /// its own process group, killed when the thread that started it
    /// dies. `console` is the read end of the pipe QEMU writes the serial
    /// console to; its stdout and stderr (what QEMU itself prints, such
    /// as its block migration's progress) are kept for error messages.
    /// The descriptors `keep` stay open in QEMU, at the same numbers.
    pub fn spawn(
        program: &Path,
        args: &[OsString],
        keep: &[std::os::unix::io::RawFd],
        console: std::io::PipeReader,
        work: WorkDir,
    ) -> Result<QemuProcess> {
        let mut cmd = Command::new(program);
        cmd.args(args)
            .current_dir(work.path())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let keep = keep.to_vec();
        // SAFETY: the closure only makes async-signal-safe syscalls
        // (setpgid, prctl, getppid, fcntl) and allocates nothing.
        unsafe {
            cmd.pre_exec(move || {
                sys::own_process_group()?;
                for &fd in &keep {
                    sys::keep_across_exec(fd)?;
                }
                sys::die_with_parent()
            });
        }
        let mut child = cmd.spawn().map_err(|source| Error::Spawn {
            program: program.display().to_string(),
            source,
        })?;
        let console_lines = Arc::new(Mutex::new(Console::default()));
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        {
            let c = console_lines.clone();
            let mut pipe = console;
            readers.push(std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n @ 1..) = pipe.read(&mut buf) {
                    c.lock().unwrap_or_else(|p| p.into_inner()).feed(&buf[..n]);
                }
            }));
        }
        if let Some(out) = child.stdout.take() {
            readers.push(log_into(out, stderr.clone()));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(log_into(err, stderr.clone()));
        }
        Ok(QemuProcess {
            child,
            status: None,
            console: console_lines,
            stderr,
            readers,
            work,
        })
    }

    /// Its working directory (sockets).
    pub fn work_dir(&self) -> &Path {
        self.work.path()
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its exit status, if it has exited (reaped).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            if let Ok(Some(s)) = self.child.try_wait() {
                self.status = Some(s);
            }
        }
        self.status
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited() {
                return Some(s);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Kills and reaps it.
    pub fn kill(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            if let Ok(s) = self.child.wait() {
                self.status = Some(s);
            }
        }
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }

    /// The serial console lines printed since the last call.
    pub fn take_console_lines(&self) -> Vec<String> {
        let mut c = self.console.lock().unwrap_or_else(|p| p.into_inner());
        c.pending.drain(..).collect()
    }

    /// QEMU's stderr (its first lines) and the console's last lines, for
    /// error messages.
    pub fn log_tail(&self) -> String {
        let mut s = String::new();
        let err = String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|p| p.into_inner()))
            .into_owned();
        let n = err.lines().count();
        for l in err.lines().take(STDERR_LINES) {
            s.push_str(l);
            s.push('\n');
        }
        if n > STDERR_LINES {
            s.push_str(&format!("({} more lines from QEMU)\n", n - STDERR_LINES));
        }
        let c = self.console.lock().unwrap_or_else(|p| p.into_inner());
        for l in c.tail.iter() {
            s.push_str(l);
            s.push('\n');
        }
        if !c.partial.is_empty() {
            s.push_str(&String::from_utf8_lossy(&c.partial));
            s.push('\n');
        }
        s
    }

    /// The error for "QEMU exited while `during`", if it has.
    pub fn exit_error(&mut self, during: &str) -> Option<Error> {
        let st = self.exited()?;
        // Let the readers collect the last words.
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        Some(Error::Exited {
            during: during.to_string(),
            status: st.to_string(),
            log: self.log_tail(),
        })
    }
}

impl Drop for QemuProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_lines_are_bounded() {
        let mut c = Console::default();
        c.feed(b"one\r\ntwo\n");
        c.feed(&vec![b'x'; MAX_LINE * 2]);
        c.feed(b"\n");
        let lines: Vec<String> = c.pending.drain(..).collect();
        assert_eq!(lines[..2], ["one".to_string(), "two".to_string()]);
        assert_eq!(lines[2].len(), MAX_LINE);
        for i in 0..MAX_PENDING_LINES + 5 {
            c.feed(format!("{i}\n").as_bytes());
        }
        assert_eq!(c.pending.len(), MAX_PENDING_LINES);
        assert_eq!(c.pending.front().unwrap(), "5");
        assert_eq!(c.tail.len(), TAIL_LINES);
    }

    #[test]
    fn a_missing_program_is_a_clear_error() {
        let e = QemuProcess::spawn(
            Path::new("/nonexistent/qemu-system-x86_64"),
            &[],
            &[],
            std::io::pipe().unwrap().0,
            WorkDir::new().unwrap(),
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("cannot start /nonexistent/qemu-system-x86_64"),
            "{s}"
        );
        assert!(s.contains("apt-get install qemu-system-x86"), "{s}");
    }

    #[test]
    fn the_process_is_killed_and_reaped_on_drop() {
        let p = QemuProcess::spawn(
            Path::new("/bin/sh"),
            &["-c".into(), "echo up; exec sleep 60".into()],
            &[],
            std::io::pipe().unwrap().0,
            WorkDir::new().unwrap(),
        )
        .unwrap();
        let pid = p.pid() as i32;
        let work = p.work_dir().to_path_buf();
        assert!(work.is_dir());
        drop(p);
        // SAFETY: kill with signal 0 only checks for existence.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "pid {pid} survived");
        assert!(!work.exists());
    }
}
