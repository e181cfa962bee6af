//! `poll(2)` on a few file descriptors for readability or writability.

use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

/// What to wait for on a descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// Readable (POLLIN).
    Read,
    /// Writable (POLLOUT).
    Write,
}

/// Waits until at least one of `fds` is readable (or hung up, or in error)
/// or `timeout` passes (`None`: forever). Returns, per descriptor, whether
/// it is ready. An interrupted wait (EINTR) returns all `false`.
pub fn readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let fds: Vec<(RawFd, Want)> = fds.iter().map(|&fd| (fd, Want::Read)).collect();
    ready(&fds, timeout)
}

/// Like [`readable`], each descriptor waited on for what it names.
pub fn ready(fds: &[(RawFd, Want)], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let fds: Vec<(RawFd, libc::c_short)> = fds
        .iter()
        .map(|&(fd, want)| {
            let events = match want {
                Want::Read => libc::POLLIN,
                Want::Write => libc::POLLOUT,
            };
            (fd, events)
        })
        .collect();
    poll(&fds, timeout)
}

/// True if `fd` is hung up or in error right now (for a socket: the peer
/// closed it), whether or not unread data is left. Does not wait.
pub fn hung_up(fd: RawFd) -> io::Result<bool> {
    Ok(poll(&[(fd, 0)], Some(Duration::ZERO))?[0])
}

fn poll(fds: &[(RawFd, libc::c_short)], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&(fd, events)| libc::pollfd {
            fd,
            events,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        Some(t) => t.as_millis().min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: `p` is a valid, exclusively borrowed array of `p.len()`
    // pollfd structures for the duration of the call.
    let n = unsafe { libc::poll(p.as_mut_ptr(), p.len() as libc::nfds_t, ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(vec![false; fds.len()]);
        }
        return Err(e);
    }
    Ok(p.iter()
        .map(|p| p.revents & (p.events | libc::POLLHUP | libc::POLLERR) != 0)
        .collect())
}

/// [`readable`] for one descriptor.
pub fn readable_one(fd: RawFd, timeout: Option<Duration>) -> io::Result<bool> {
    Ok(readable(&[fd], timeout)?[0])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn reports_readable_and_timeout() {
        let (mut a, b) = UnixStream::pair().unwrap();
        let t = Some(Duration::from_millis(10));
        assert!(!readable_one(b.as_raw_fd(), t).unwrap());
        a.write_all(b"x").unwrap();
        assert_eq!(
            readable(&[a.as_raw_fd(), b.as_raw_fd()], t).unwrap(),
            vec![false, true]
        );
        drop(a);
        assert!(readable_one(b.as_raw_fd(), t).unwrap());
    }

    #[test]
    fn reports_writable() {
        let (a, _b) = UnixStream::pair().unwrap();
        let t = Some(Duration::from_millis(10));
        assert_eq!(
            ready(
                &[(a.as_raw_fd(), Want::Read), (a.as_raw_fd(), Want::Write)],
                t
            )
            .unwrap(),
            vec![false, true]
        );
    }

    #[test]
    fn reports_hang_up() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut a2 = a.try_clone().unwrap();
        a2.write_all(b"unread").unwrap();
        assert!(!hung_up(b.as_raw_fd()).unwrap());
        drop(a);
        assert!(!hung_up(b.as_raw_fd()).unwrap());
        drop(a2);
        assert!(hung_up(b.as_raw_fd()).unwrap());
    }
}
