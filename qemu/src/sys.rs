//! The raw syscalls of this crate: a QEMU child's process group, parent-death
//! signal and inherited descriptors; a descriptor sent over a socket.

use std::io;

/// In a child between fork and exec: SIGKILL this process when the thread
/// that forked it (our process, in practice) dies, so a QEMU never outlives
/// us even if we are killed without running any destructor.
pub(crate) fn die_with_parent() -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG) takes a signal number and touches no
    // memory of ours; it is async-signal-safe, as pre_exec requires.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // The parent may have died before the prctl: then we were reparented.
    // SAFETY: getppid has no arguments and cannot fail.
    if unsafe { libc::getppid() } == 1 {
        return Err(io::Error::other(
            "the parent died while QEMU was being started",
        ));
    }
    Ok(())
}

/// In a child between fork and exec: its own process group, so a Ctrl-C
/// at the terminal reaches us (who suspend the VM) and not QEMU.
pub(crate) fn own_process_group() -> io::Result<()> {
    // SAFETY: setpgid(0, 0) only changes this process's group; it is
    // async-signal-safe.
    if unsafe { libc::setpgid(0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sends `bytes` on the Unix socket `sock` with the descriptor `fd`
/// attached (SCM_RIGHTS), in one sendmsg; returns the bytes sent.
pub(crate) fn send_with_fd(
    sock: std::os::unix::io::RawFd,
    bytes: &[u8],
    fd: std::os::unix::io::RawFd,
) -> io::Result<usize> {
    // SAFETY: CMSG_SPACE is a pure computation on a constant size.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) } as usize;
    let mut cbuf = vec![0u8; space];
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    // SAFETY: msghdr is plain data; all-zero is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: msg_control points at `space` zeroed bytes, room for one
    // cmsghdr with one int (CMSG_SPACE above), so CMSG_FIRSTHDR is non-null
    // and CMSG_DATA points inside `cbuf`; `iov` and `cbuf` outlive the call.
    let n = unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>(), fd);
        libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL)
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// In a child between fork and exec: `fd` stays open across the exec
/// (its close-on-exec flag cleared; the parent's flag is its own).
pub(crate) fn keep_across_exec(fd: std::os::unix::io::RawFd) -> io::Result<()> {
    // SAFETY: F_SETFD on a descriptor of ours; fcntl is async-signal-safe.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
