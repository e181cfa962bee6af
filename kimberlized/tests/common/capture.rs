//! A packet capture on one interface for tests (an `AF_PACKET` socket;
//! needs root): every frame that crossed it while the capture ran. The
//! suite's raw socket calls live here.

use std::ffi::CString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A running capture.
pub struct Capture {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Vec<u8>>>,
}

fn check(r: libc::c_int, what: &str) {
    assert!(r >= 0, "{what}: {}", std::io::Error::last_os_error());
}

impl Capture {
    /// Starts capturing every frame on interface `ifname`.
    pub fn start(ifname: &str) -> Capture {
        let name = CString::new(ifname).unwrap();
        // SAFETY: a NUL-terminated name.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        let all = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, all as libc::c_int) };
        check(fd, "socket(AF_PACKET)");
        // SAFETY: fd is a new descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        let buf: libc::c_int = 32 << 20;
        // SAFETY: setsockopt(2) with a pointer to an int and its size.
        check(
            unsafe {
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    &buf as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::c_int>() as u32,
                )
            },
            "SO_RCVBUFFORCE",
        );
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: setsockopt(2) with a pointer to a timeval and its size.
        check(
            unsafe {
                libc::setsockopt(
                    raw,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    &tv as *const _ as *const libc::c_void,
                    std::mem::size_of::<libc::timeval>() as u32,
                )
            },
            "SO_RCVTIMEO",
        );
        // SAFETY: an all-zero sockaddr_ll is valid; the fields follow.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = all;
        sll.sll_ifindex = index as i32;
        // SAFETY: bind(2) with a sockaddr_ll and its size.
        check(
            unsafe {
                libc::bind(
                    raw,
                    &sll as *const _ as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            },
            "bind(AF_PACKET)",
        );
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let mut f = File::from(fd);
        let thread = std::thread::spawn(move || {
            let mut out = Vec::new();
            let mut frame = vec![0u8; 1 << 16];
            // Ends on the first read that times out after the stop (what
            // was queued before it is read), or 2 s after it on a busy
            // interface.
            let mut stopped: Option<std::time::Instant> = None;
            loop {
                if stopped.is_none() && s.load(Ordering::SeqCst) {
                    stopped = Some(std::time::Instant::now());
                }
                if stopped.is_some_and(|t| t.elapsed() > std::time::Duration::from_secs(2)) {
                    break;
                }
                match f.read(&mut frame) {
                    Ok(n) => out.extend_from_slice(&frame[..n]),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) =>
                    {
                        if stopped.is_some() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => panic!("capture: {e}"),
                }
            }
            out
        });
        Capture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops; every byte captured (frames concatenated).
    pub fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// True if `needle` occurs in `hay`.
pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}
