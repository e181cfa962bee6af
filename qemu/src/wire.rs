//! One JSON object per line over a Unix stream socket (QMP and the guest
//! agent), read with deadlines, an interrupt flag and a line-length cap.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::io::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kimberley_formats::sys::poll;

/// Longest line accepted (a guest-file-read of 1 MiB in base64 is 1.4 MB).
pub(crate) const MAX_LINE: usize = 8 << 20;
/// How often a wait looks at the interrupt flag.
const TICK: Duration = Duration::from_millis(50);

/// Why reading or writing failed.
#[derive(Debug)]
pub(crate) enum WireError {
    /// The deadline passed.
    Timeout,
    /// The interrupt flag was set.
    Interrupted,
    /// The peer closed the connection.
    Closed,
    /// A line longer than [`MAX_LINE`].
    TooLong,
    /// The socket failed.
    Io(std::io::Error),
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WireError::Timeout => write!(f, "timed out"),
            WireError::Interrupted => write!(f, "interrupted"),
            WireError::Closed => write!(f, "connection closed"),
            WireError::TooLong => write!(f, "a message longer than {MAX_LINE} bytes"),
            WireError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl WireError {
    /// As an I/O error (for the error variants that carry one).
    pub(crate) fn into_io(self) -> std::io::Error {
        match self {
            WireError::Io(e) => e,
            WireError::Timeout => std::io::Error::new(ErrorKind::TimedOut, "timed out"),
            WireError::Closed => std::io::Error::new(ErrorKind::UnexpectedEof, "connection closed"),
            other => std::io::Error::other(other.to_string()),
        }
    }
}

/// A connected socket and what was read but not yet consumed.
pub(crate) struct Wire {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Wire {
    /// Connects to `path`.
    pub(crate) fn connect(path: &Path) -> std::io::Result<Wire> {
        let stream = UnixStream::connect(path)?;
        stream.set_nonblocking(true)?;
        Ok(Wire {
            stream,
            buf: Vec::new(),
        })
    }

    /// Writes all of `bytes` (the socket buffer takes them; QEMU reads
    /// continuously).
    pub(crate) fn send(&mut self, bytes: &[u8], deadline: Instant) -> Result<(), WireError> {
        let mut rest = bytes;
        while !rest.is_empty() {
            match self.stream.write(rest) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => rest = &rest[n..],
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(WireError::Timeout);
                    }
                    let fd = self.stream.as_raw_fd();
                    poll::ready(&[(fd, poll::Want::Write)], Some(left.min(TICK)))
                        .map_err(WireError::Io)?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::BrokenPipe => return Err(WireError::Closed),
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(())
    }

    /// Sends `v` as one line, with the descriptor `fd` attached to its
    /// first byte if given (SCM_RIGHTS).
    pub(crate) fn send_json(
        &mut self,
        v: &serde_json::Value,
        fd: Option<std::os::unix::io::RawFd>,
        deadline: Instant,
    ) -> Result<(), WireError> {
        let mut b = serde_json::to_vec(v).map_err(|e| WireError::Io(e.into()))?;
        b.push(b'\n');
        let mut sent = 0;
        if let Some(fd) = fd {
            loop {
                match crate::sys::send_with_fd(self.stream.as_raw_fd(), &b, fd) {
                    Ok(n) => {
                        sent = n;
                        break;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        if Instant::now() >= deadline {
                            return Err(WireError::Timeout);
                        }
                        let fds = [(self.stream.as_raw_fd(), poll::Want::Write)];
                        poll::ready(&fds, Some(TICK)).map_err(WireError::Io)?;
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::BrokenPipe => return Err(WireError::Closed),
                    Err(e) => return Err(WireError::Io(e)),
                }
            }
        }
        self.send(&b[sent..], deadline)
    }

    /// Reads what is there, waiting up to `deadline` for something.
    fn fill(&mut self, deadline: Instant, interrupt: Option<&AtomicBool>) -> Result<(), WireError> {
        let mut chunk = [0u8; 65536];
        loop {
            if interrupt.is_some_and(|f| f.load(Ordering::SeqCst)) {
                return Err(WireError::Interrupted);
            }
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(WireError::Closed),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(());
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(WireError::Timeout);
                    }
                    poll::readable_one(self.stream.as_raw_fd(), Some(left.min(TICK)))
                        .map_err(WireError::Io)?;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
    }

    /// Discards everything up to and including the next `byte`.
    pub(crate) fn skip_past(
        &mut self,
        byte: u8,
        deadline: Instant,
        interrupt: Option<&AtomicBool>,
    ) -> Result<(), WireError> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == byte) {
                self.buf.drain(..=i);
                return Ok(());
            }
            self.buf.clear();
            self.fill(deadline, interrupt)?;
        }
    }

    /// The next line, without its line end.
    pub(crate) fn line(
        &mut self,
        deadline: Instant,
        interrupt: Option<&AtomicBool>,
    ) -> Result<Vec<u8>, WireError> {
        let mut scanned = 0;
        loop {
            if let Some(i) = self.buf[scanned..].iter().position(|&b| b == b'\n') {
                let mut l: Vec<u8> = self.buf.drain(..=scanned + i).collect();
                l.pop();
                if l.last() == Some(&b'\r') {
                    l.pop();
                }
                return Ok(l);
            }
            scanned = self.buf.len();
            if scanned > MAX_LINE {
                return Err(WireError::TooLong);
            }
            self.fill(deadline, interrupt)?;
        }
    }

    /// The next line that is a JSON object (other lines, e.g. 0xFF bytes
    /// left over, are skipped).
    pub(crate) fn object(
        &mut self,
        deadline: Instant,
        interrupt: Option<&AtomicBool>,
    ) -> Result<serde_json::Map<String, serde_json::Value>, WireError> {
        loop {
            let l = self.line(deadline, interrupt)?;
            let start = l.iter().position(|&b| b == b'{').unwrap_or(l.len());
            if let Ok(serde_json::Value::Object(o)) = serde_json::from_slice(&l[start..]) {
                return Ok(o);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_objects_and_resync() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut w = Wire {
            stream: a,
            buf: Vec::new(),
        };
        let t = || Instant::now() + Duration::from_secs(2);
        b.write_all(b"junk\xff{\"x\":1}\r\nnot json\n{\"y\":2}\n")
            .unwrap();
        w.skip_past(0xff, t(), None).unwrap();
        assert_eq!(w.object(t(), None).unwrap()["x"], 1);
        assert_eq!(w.object(t(), None).unwrap()["y"], 2);
        let e = w
            .line(Instant::now() + Duration::from_millis(50), None)
            .unwrap_err();
        assert!(matches!(e, WireError::Timeout));
        let flag = AtomicBool::new(true);
        assert!(matches!(
            w.line(t(), Some(&flag)).unwrap_err(),
            WireError::Interrupted
        ));
        drop(b);
        assert!(matches!(w.line(t(), None).unwrap_err(), WireError::Closed));
    }

    #[test]
    fn an_endless_line_is_refused() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut w = Wire {
            stream: a,
            buf: Vec::new(),
        };
        let h = std::thread::spawn(move || {
            let chunk = vec![b'a'; 1 << 20];
            for _ in 0..12 {
                if b.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let e = w
            .line(Instant::now() + Duration::from_secs(10), None)
            .unwrap_err();
        assert!(matches!(e, WireError::TooLong), "{e}");
        drop(w);
        h.join().unwrap();
    }
}
