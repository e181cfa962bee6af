//! `poll(2)` on a few file descriptors for readability.

use std::io;
use std::os::unix::io::RawFd;
use std::time::Duration;

/// Waits until at least one of `fds` is readable (or hung up, or in error)
/// or `timeout` passes (`None`: forever). Returns, per descriptor, whether
/// it is ready. An interrupted wait (EINTR) returns all `false`.
pub fn readable(fds: &[RawFd], timeout: Option<Duration>) -> io::Result<Vec<bool>> {
    let mut p: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
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
        .map(|p| p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0)
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
}
