//! Guest memory served on first touch: an anonymous mapping registered
//! with userfaultfd, whose missing pages a handler thread fills from a
//! [`PageSource`] (the memory file today; an arriving overlay next).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kimberley_formats::apply::early::Early;
use kimberley_formats::chunk::is_zero;
use kimberley_formats::sys::poll;
use kimberley_formats::sys::uffd::{Uffd, PAGE};

use crate::error::{Error, Result};

/// What a page holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// The bytes written into the buffer.
    Data,
    /// Zeros (the buffer is not read): mapped as a zero page.
    Zero,
}

/// Where the pages of lazily restored memory come from.
pub trait PageSource: Send + Sync {
    /// The pages at byte `offset` of guest memory (page-aligned): fills
    /// `buf` (whole pages, at most [`MAX_WINDOW`] bytes) and returns
    /// [`Fill::Data`], or returns [`Fill::Zero`] if they are all zero. May block until the page exists. An error stops
    /// the VM: the server reports it (see [`LazyServer::on_error`]) before
    /// it lets any waiting access go on.
    fn fill(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<Fill>;

    /// How many of the `len` bytes at `offset` can be filled now without
    /// waiting: what the handler reads ahead beyond a faulting page (a
    /// source whose pages are still arriving must not hold every fault
    /// up for pages nobody asked for yet). All of them by default.
    fn ready(&self, offset: u64, len: u64) -> u64 {
        let _ = offset;
        len
    }
}

/// Guest memory of a launch VM whose overlay is still arriving: the memory
/// component (0) of an [`Early`] apply.
pub struct ArrivingSource {
    early: Early,
}

impl ArrivingSource {
    /// Serves component 0 of `early`.
    pub fn new(early: Early) -> ArrivingSource {
        ArrivingSource { early }
    }
}

impl PageSource for ArrivingSource {
    fn fill(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<Fill> {
        self.early.read(0, offset, buf)?;
        Ok(if is_zero(buf) { Fill::Zero } else { Fill::Data })
    }

    fn ready(&self, offset: u64, len: u64) -> u64 {
        self.early.available(0, offset, len) / PAGE as u64 * PAGE as u64
    }
}

/// A memory file (the VMDIR's `memory.raw`), read on demand.
pub struct FileSource {
    file: File,
    size: u64,
}

impl FileSource {
    /// Serves `file`, which holds `size` bytes of guest memory.
    pub fn new(file: File, size: u64) -> FileSource {
        FileSource { file, size }
    }
}

impl PageSource for FileSource {
    fn fill(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<Fill> {
        if offset >= self.size {
            return Ok(Fill::Zero);
        }
        let n = buf.len().min((self.size - offset) as usize);
        self.file.read_exact_at(&mut buf[..n], offset)?;
        buf[n..].fill(0);
        Ok(if is_zero(buf) { Fill::Zero } else { Fill::Data })
    }
}

/// What one fault brings in at least: the aligned block of 16 pages around
/// it (a guest that touches pages far apart maps up to 16 times what it
/// touched; one that reads in order gets a window that doubles up to
/// [`MAX_WINDOW`] and faults once per window).
pub const BLOCK: usize = 16 * PAGE;

/// The most a fault brings in when the guest reads memory in order (its
/// faults land where the last window ended): 4 MiB.
pub const MAX_WINDOW: u64 = 4 << 20;

/// How the faults were served so far.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LazyStats {
    /// Faults resolved (each brings in a block).
    pub faults: u64,
    /// Pages filled with data from the source.
    pub data_pages: u64,
    /// Pages mapped as zero pages.
    pub zero_pages: u64,
    /// Median time from reading a fault to resolving it, in ns (0 before
    /// the first fault).
    pub median_service_ns: u64,
    /// The same, 99th percentile.
    pub p99_service_ns: u64,
}

/// Most first touches a recording server keeps (16 GiB of pages, the
/// working-set file's limit).
pub const MAX_TOUCHED: usize = kimberley_formats::working_set::MAX_WORKING_SET;

/// Most service times kept for the percentiles (4 MiB).
const MAX_SAMPLES: usize = 1 << 20;

/// Called once, with the reason, when a page cannot be served.
pub type OnError = Box<dyn Fn(&str) + Send + Sync>;

struct Shared {
    on_error: Mutex<Option<OnError>>,
    stop: AtomicBool,
    faults: AtomicU64,
    data_pages: AtomicU64,
    zero_pages: AtomicU64,
    samples: Mutex<Vec<u32>>,
    error: Mutex<Option<String>>,
    /// Recording: one page per fault, and the faulting pages in order.
    touched: Option<Mutex<Vec<u64>>>,
}

/// The handler thread of one lazily restored mapping; stopped on drop.
pub struct LazyServer {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for LazyServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LazyServer")
            .field("stats", &self.stats())
            .finish()
    }
}

/// How often the handler looks at its stop flag while no fault comes.
const STOP_POLL: Duration = Duration::from_millis(20);

impl LazyServer {
    /// Registers `[host, host + size)` (a private anonymous mapping that
    /// outlives the server) and starts serving its missing pages from
    /// `source`, page `i` of the mapping being byte `i × 4096` of it.
    pub fn start(host: *mut u8, size: usize, source: Arc<dyn PageSource>) -> Result<LazyServer> {
        Self::start_with(host, size, source, false)
    }

    /// [`LazyServer::start`] that records the guest's first touches: each
    /// fault brings in only its page (no read-ahead, which would hide the
    /// next touches), and [`LazyServer::touched`] lists the pages in the
    /// order they were first touched (at most [`MAX_TOUCHED`]).
    pub fn start_recording(
        host: *mut u8,
        size: usize,
        source: Arc<dyn PageSource>,
    ) -> Result<LazyServer> {
        Self::start_with(host, size, source, true)
    }

    fn start_with(
        host: *mut u8,
        size: usize,
        source: Arc<dyn PageSource>,
        record: bool,
    ) -> Result<LazyServer> {
        let uffd = Uffd::new().map_err(|e| Error::io("opening a userfaultfd".to_string(), e))?;
        let start = host as u64;
        uffd.register_missing(start, size as u64)
            .map_err(|e| Error::io("registering guest memory with userfaultfd".to_string(), e))?;
        let shared = Arc::new(Shared {
            on_error: Mutex::new(None),
            stop: AtomicBool::new(false),
            faults: AtomicU64::new(0),
            data_pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            samples: Mutex::new(Vec::new()),
            error: Mutex::new(None),
            touched: record.then(|| Mutex::new(Vec::new())),
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name("uffd".into())
            .spawn(move || serve(uffd, start, size as u64, source, &s))
            .map_err(|e| Error::io("spawning the userfaultfd thread".to_string(), e))?;
        Ok(LazyServer {
            shared,
            thread: Some(thread),
        })
    }

    /// Faults served so far.
    pub fn stats(&self) -> LazyStats {
        let mut samples = lock(&self.shared.samples).clone();
        samples.sort_unstable();
        let pct = |p: usize| {
            samples
                .get((samples.len() * p / 100).min(samples.len().saturating_sub(1)))
                .map_or(0, |&v| u64::from(v))
        };
        LazyStats {
            faults: self.shared.faults.load(Ordering::Relaxed),
            data_pages: self.shared.data_pages.load(Ordering::Relaxed),
            zero_pages: self.shared.zero_pages.load(Ordering::Relaxed),
            median_service_ns: pct(50),
            p99_service_ns: pct(99),
        }
    }

    /// The pages first touched so far, in order, as page indices (None
    /// unless started with [`LazyServer::start_recording`]).
    pub fn touched(&self) -> Option<Vec<u64>> {
        self.shared.touched.as_ref().map(|t| lock(t).clone())
    }

    /// Sets what stops the VM when a page cannot be served. It runs before
    /// the access that waits is let go on; from then on every first touch
    /// gets a zero page (a thread left waiting in the kernel could not be
    /// stopped), so it must make sure the guest runs no further.
    pub fn on_error(&self, f: OnError) {
        *lock(&self.shared.on_error) = Some(f);
    }

    /// Why serving stopped, if a page could not be had.
    pub fn error(&self) -> Option<String> {
        lock(&self.shared.error).clone()
    }
}

impl Drop for LazyServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn serve(uffd: Uffd, start: u64, size: u64, source: Arc<dyn PageSource>, s: &Shared) {
    let Err(why) = serve_faults(&uffd, start, size, &*source, s) else {
        return;
    };
    *lock(&s.error) = Some(why.clone());
    if let Some(f) = lock(&s.on_error).as_ref() {
        f(&why);
    }
    // The VM is stopping. Threads waiting on a page (the vCPU, in the
    // kernel, cannot even take a signal while it waits) are let go with
    // zero pages; nothing the guest computes from them is kept.
    while !s.stop.load(Ordering::Relaxed) {
        match poll::readable(&[uffd.as_raw_fd()], Some(STOP_POLL)) {
            Ok(r) if r.first() == Some(&true) => {}
            Ok(_) => continue,
            // Not a reason to spin: wait as if nothing came.
            Err(_) => {
                std::thread::sleep(STOP_POLL);
                continue;
            }
        }
        while let Ok(Some(f)) = uffd.read_fault() {
            let _ = uffd.zero(f.addr, PAGE as u64);
        }
    }
}

fn serve_faults(
    uffd: &Uffd,
    start: u64,
    size: u64,
    source: &dyn PageSource,
    s: &Shared,
) -> std::result::Result<(), String> {
    let mut buf = vec![0u8; MAX_WINDOW as usize];
    // Sequential read-ahead: a fault where the last window ended doubles
    // the window (up to MAX_WINDOW); any other starts again at one block.
    let (mut next, mut window) = (u64::MAX, BLOCK as u64);
    let mut samples = Vec::new();
    let flush = |samples: &mut Vec<u32>| {
        let mut all = lock(&s.samples);
        let room = MAX_SAMPLES.saturating_sub(all.len());
        all.extend(samples.drain(..).take(room));
    };
    while !s.stop.load(Ordering::Relaxed) {
        match poll::readable(&[uffd.as_raw_fd()], Some(STOP_POLL)) {
            Ok(r) if r.first() == Some(&true) => {}
            Ok(_) => {
                flush(&mut samples);
                continue;
            }
            Err(e) => return Err(format!("waiting for page faults: {e}")),
        }
        loop {
            let f = match uffd.read_fault() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => return Err(format!("reading a page fault: {e}")),
            };
            let t0 = Instant::now();
            let offset = f.addr.wrapping_sub(start);
            if offset >= size {
                return Err(format!("a fault at {:#x}, outside guest memory", f.addr));
            }
            // The faulting page first (the vCPU waits on it), then the
            // rest of its block (prefetched while the guest runs on).
            let page = offset / PAGE as u64 * PAGE as u64;
            serve_range(uffd, source, s, start, page, PAGE as u64, &mut buf)?;
            samples.push(t0.elapsed().as_nanos().min(u32::MAX as u128) as u32);
            s.faults.fetch_add(1, Ordering::Relaxed);
            if let Some(t) = &s.touched {
                let mut t = lock(t);
                if t.len() < MAX_TOUCHED {
                    t.push(page / PAGE as u64);
                }
                continue;
            }
            let block = offset / BLOCK as u64 * BLOCK as u64;
            window = if block == next {
                (window * 2).min(MAX_WINDOW)
            } else {
                BLOCK as u64
            };
            let len = source.ready(block, (size - block).min(window));
            for piece in (0..len).step_by(MAX_WINDOW as usize) {
                let n = (len - piece).min(MAX_WINDOW);
                serve_range(uffd, source, s, start, block + piece, n, &mut buf)?;
            }
            next = block + len;
        }
        flush(&mut samples);
    }
    Ok(())
}

/// Fills the missing pages of `[offset, offset + len)` of guest memory
/// (mapped at `start`) from `source`, counting what it maps.
fn serve_range(
    uffd: &Uffd,
    source: &dyn PageSource,
    s: &Shared,
    start: u64,
    offset: u64,
    len: u64,
    buf: &mut [u8],
) -> std::result::Result<(), String> {
    let buf = &mut buf[..len as usize];
    let (done, counter) = match source.fill(offset, buf) {
        Ok(Fill::Data) => (uffd.copy(start + offset, buf), &s.data_pages),
        Ok(Fill::Zero) => (uffd.zero(start + offset, len), &s.zero_pages),
        Err(e) => return Err(format!("reading guest memory at {offset:#x}: {e}")),
    };
    let n = done.map_err(|e| format!("resolving the fault at {offset:#x}: {e}"))?;
    counter.fetch_add(n, Ordering::Relaxed);
    Ok(())
}
