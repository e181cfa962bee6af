//! Process and peer credentials: our effective uid, and the uid of the
//! process at the other end of a Unix socket (`SO_PEERCRED`).

use std::io;
use std::os::unix::io::RawFd;

/// The effective user id of this process.
pub fn euid() -> u32 {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Credentials of the peer of a connected Unix socket, as the kernel
/// recorded them at connect(2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer {
    /// Process id of the peer.
    pub pid: i32,
    /// Its effective user id.
    pub uid: u32,
    /// Its effective group id.
    pub gid: u32,
}

/// `SO_PEERCRED` of the connected Unix socket `fd`.
pub fn peer(fd: RawFd) -> io::Result<Peer> {
    let mut c = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: `c` is a writable ucred and `len` holds its exact size; the
    // kernel writes at most `len` bytes and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut c as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if len as usize != std::mem::size_of::<libc::ucred>() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "SO_PEERCRED returned a short answer",
        ));
    }
    Ok(Peer {
        pid: c.pid,
        uid: c.uid,
        gid: c.gid,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::io::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn peer_of_a_socket_pair_is_us() {
        let (a, _b) = UnixStream::pair().unwrap();
        let p = peer(a.as_raw_fd()).unwrap();
        assert_eq!(p.uid, euid());
        assert_eq!(p.pid, std::process::id() as i32);
        assert!(peer(-1).is_err());
    }
}
