//! `userfaultfd(2)` in missing mode: register a mapping, read its page
//! faults, resolve each with a copied or a zero page.
//!
//! A small wrapper over the system call and five ioctls, with the kernel's
//! structures from `linux-raw-sys`, rather than the `userfaultfd` crate: its
//! bindings crate runs bindgen (libclang) at build time, which CI machines
//! would have to install, for the few calls used here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use linux_raw_sys::general::{
    uffd_msg, uffdio_api, uffdio_copy, uffdio_range, uffdio_register, uffdio_zeropage,
    UFFDIO_REGISTER_MODE_MISSING, UFFD_API, UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WRITE,
};
use linux_raw_sys::ioctl::{UFFDIO_API, UFFDIO_COPY, UFFDIO_REGISTER, UFFDIO_ZEROPAGE};

/// The page size faults are resolved in.
pub const PAGE: usize = 4096;

/// How often a copy or zero-fill that the kernel cut short (EAGAIN) is
/// taken up again.
const MAX_RETRIES: u32 = 64;

/// A page fault on a registered range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Faulting address, rounded down to its page.
    pub addr: u64,
    /// True for a write access.
    pub write: bool,
}

/// A userfaultfd, non-blocking (wait for it with `sys::poll`).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
}

fn ioctl<T>(fd: RawFd, req: u32, arg: &mut T) -> io::Result<()> {
    // SAFETY: `req` is one of the userfaultfd ioctls whose argument is a
    // `T` the kernel reads and writes back; `arg` is a valid, exclusive
    // reference to one for the duration of the call.
    let r = unsafe { libc::ioctl(fd, req as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl Uffd {
    /// Opens a userfaultfd (close-on-exec, non-blocking) and agrees on the
    /// API with the kernel. Needs root or vm.unprivileged_userfaultfd=1.
    pub fn new() -> io::Result<Uffd> {
        // SAFETY: the system call takes flags only and returns a new
        // descriptor or -1.
        let r = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `r` is a descriptor the kernel just gave us and nothing
        // else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(r as RawFd) };
        let mut api = uffdio_api {
            api: UFFD_API as u64,
            features: 0,
            ioctls: 0,
        };
        ioctl(fd.as_raw_fd(), UFFDIO_API, &mut api)?;
        Ok(Uffd { fd })
    }

    /// Registers `[start, start + len)` (page-aligned, an existing private
    /// anonymous mapping) in missing mode: a first touch of any page
    /// waits until this descriptor resolves it.
    pub fn register_missing(&self, start: u64, len: u64) -> io::Result<()> {
        let mut reg = uffdio_register {
            range: uffdio_range { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING as u64,
            ioctls: 0,
        };
        ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER, &mut reg)
    }

    /// The next page fault, if one is queued (None when none is: wait for
    /// readability). Events other than page faults are skipped.
    pub fn read_fault(&self) -> io::Result<Option<Fault>> {
        let size = std::mem::size_of::<uffd_msg>();
        loop {
            let mut buf = [0u8; 64];
            // SAFETY: reads at most `size` (32) bytes into a 64-byte buffer
            // we own.
            let n = unsafe {
                libc::read(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast::<libc::c_void>(),
                    size,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                return match e.kind() {
                    io::ErrorKind::WouldBlock => Ok(None),
                    io::ErrorKind::Interrupted => continue,
                    _ => Err(e),
                };
            }
            if (n as usize) < size {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("userfaultfd message of {n} bytes"),
                ));
            }
            // SAFETY: `uffd_msg` is plain old data of `size` bytes, all of
            // which the kernel wrote; read_unaligned copes with the buffer's
            // alignment.
            let msg: uffd_msg = unsafe { std::ptr::read_unaligned(buf.as_ptr().cast()) };
            if u32::from(msg.event) != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            // SAFETY: for a page-fault event the kernel fills the
            // `pagefault` member of the union.
            let pf = unsafe { msg.arg.pagefault };
            let (flags, address) = (pf.flags, pf.address);
            return Ok(Some(Fault {
                addr: address & !(PAGE as u64 - 1),
                write: flags & u64::from(UFFD_PAGEFAULT_FLAG_WRITE) != 0,
            }));
        }
    }

    /// Fills the pages of `[dst, dst + src.len())` (page-aligned,
    /// registered) that are still missing with the matching bytes of
    /// `src`, waking the threads that wait on them; pages already present
    /// are left as they are. Returns how many pages it filled.
    pub fn copy(&self, dst: u64, src: &[u8]) -> io::Result<u64> {
        let (mut done, mut filled) = (0usize, 0u64);
        let mut retries = MAX_RETRIES;
        while done < src.len() {
            let mut c = uffdio_copy {
                dst: dst + done as u64,
                src: src[done..].as_ptr() as u64,
                len: (src.len() - done) as u64,
                mode: 0,
                copy: 0,
            };
            match ioctl(self.fd.as_raw_fd(), UFFDIO_COPY, &mut c) {
                Ok(()) => return Ok(filled + ((src.len() - done) / PAGE) as u64),
                // Stopped at a page already present: what came before it
                // was copied (`copy` bytes); skip that page, go on.
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    let copied = usize::try_from(c.copy).unwrap_or(0).min(src.len() - done);
                    filled += (copied / PAGE) as u64;
                    done += copied / PAGE * PAGE + PAGE;
                }
                // Copied part of the range (`copy` bytes), or nothing while
                // the address space was changing: go on from there.
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && retries > 0 => {
                    retries -= 1;
                    let copied = usize::try_from(c.copy).unwrap_or(0).min(src.len() - done);
                    filled += (copied / PAGE) as u64;
                    done += copied / PAGE * PAGE;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(filled)
    }

    /// Maps zero pages on the pages of `[dst, dst + len)` that are still
    /// missing, waking the threads that wait; pages already present are
    /// left as they are. Returns how many pages it mapped.
    pub fn zero(&self, dst: u64, len: u64) -> io::Result<u64> {
        let (mut done, mut mapped) = (0u64, 0u64);
        let mut retries = MAX_RETRIES;
        while done < len {
            let mut z = uffdio_zeropage {
                range: uffdio_range {
                    start: dst + done,
                    len: len - done,
                },
                mode: 0,
                zeropage: 0,
            };
            match ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE, &mut z) {
                Ok(()) => return Ok(mapped + (len - done) / PAGE as u64),
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    let zeroed = u64::try_from(z.zeropage).unwrap_or(0).min(len - done);
                    mapped += zeroed / PAGE as u64;
                    done += zeroed / PAGE as u64 * PAGE as u64 + PAGE as u64;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && retries > 0 => {
                    retries -= 1;
                    let zeroed = u64::try_from(z.zeropage).unwrap_or(0).min(len - done);
                    mapped += zeroed / PAGE as u64;
                    done += zeroed / PAGE as u64 * PAGE as u64;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(mapped)
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A private anonymous mapping, unmapped on drop.
    struct Map(*mut u8, usize);

    impl Map {
        fn new(len: usize) -> Map {
            // SAFETY: a fresh anonymous mapping; the result is checked.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                )
            };
            assert_ne!(p, libc::MAP_FAILED);
            Map(p.cast(), len)
        }
    }

    impl Drop for Map {
        fn drop(&mut self) {
            // SAFETY: unmaps exactly the mapping `new` made.
            unsafe { libc::munmap(self.0.cast(), self.1) };
        }
    }

    #[test]
    fn faults_are_resolved_with_copies_and_zero_pages() {
        let Ok(u) = Uffd::new() else {
            // Needs root or vm.unprivileged_userfaultfd; the KVM tests,
            // which run as root, use it for real.
            eprintln!("userfaultfd unavailable here");
            return;
        };
        let map = Map::new(4 * PAGE);
        let base = map.0 as u64;
        u.register_missing(base, 4 * PAGE as u64).unwrap();
        let addr = base as usize;
        let toucher = std::thread::spawn(move || {
            let p = addr as *const u8;
            // SAFETY: reads inside the 4-page mapping, which outlives the
            // thread (joined below); each read waits for its resolution.
            unsafe {
                [
                    std::ptr::read_volatile(p.add(10)),
                    std::ptr::read_volatile(p.add(PAGE + 1)),
                    std::ptr::read_volatile(p.add(3 * PAGE + 7)),
                ]
            }
        });
        let mut served = Vec::new();
        while served.len() < 3 {
            crate::sys::poll::readable(&[u.as_raw_fd()], Some(Duration::from_secs(10))).unwrap();
            while let Some(f) = u.read_fault().unwrap() {
                assert_eq!(f.addr % PAGE as u64, 0);
                assert!(!f.write);
                let page = (f.addr - base) / PAGE as u64;
                let n = if page == 1 {
                    u.zero(f.addr, PAGE as u64).unwrap()
                } else {
                    u.copy(f.addr, &[page as u8 + 0x40; PAGE]).unwrap()
                };
                assert_eq!(n, 1);
                served.push(page);
            }
        }
        assert_eq!(toucher.join().unwrap(), [0x40, 0, 0x43]);
        served.sort();
        assert_eq!(served, [0, 1, 3]);
        // Pages already present are kept; the missing one between them is
        // filled.
        let block = [[7u8; PAGE], [8; PAGE], [9; PAGE]].concat();
        assert_eq!(u.copy(base, &block).unwrap(), 1);
        // SAFETY: reads inside the mapping; every page of it is present.
        let got =
            unsafe { [0, PAGE, 2 * PAGE, 3 * PAGE].map(|o| std::ptr::read_volatile(map.0.add(o))) };
        assert_eq!(got, [0x40, 0, 9, 0x43]);
    }
}
