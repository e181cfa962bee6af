//! The sender's writer thread: puts sealed frames on the wire in order,
//! paced by the `--max-bandwidth` token bucket, while the caller compresses
//! and seals the next window.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

use crate::channel::Frame;

enum Item {
    Frames(Vec<Frame>),
    Flush(SyncSender<()>),
}

/// Most unused link capacity that carries over (burst).
const BURST: Duration = Duration::from_millis(20);

/// A thread writing frames to a clone of the session's socket.
pub struct Writer {
    tx: Option<SyncSender<Item>>,
    thread: Option<JoinHandle<()>>,
    bytes: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    cancel: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the thread on `out`, at most `max_bw` bytes per second.
    pub fn start(mut out: TcpStream, max_bw: Option<u64>) -> Writer {
        let (tx, rx): (SyncSender<Item>, Receiver<Item>) = sync_channel(4);
        let bytes = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let cancel = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (b, e, c, d) = (bytes.clone(), error.clone(), cancel.clone(), dropped.clone());
        let thread = std::thread::spawn(move || {
            // Token bucket: `next` is when the link is free again.
            let mut next = Instant::now();
            for item in rx {
                match item {
                    Item::Frames(fs) => {
                        for f in fs {
                            if c.load(Ordering::SeqCst) {
                                d.fetch_add(1, Ordering::SeqCst);
                                continue;
                            }
                            if let Err(err) = out.write_all(&f) {
                                *e.lock().unwrap_or_else(|p| p.into_inner()) =
                                    Some(format!("the connection failed: {err}"));
                                return;
                            }
                            b.fetch_add(f.len() as u64, Ordering::SeqCst);
                            if let Some(bw) = max_bw {
                                let now = Instant::now();
                                let floor = now.checked_sub(BURST).unwrap_or(now);
                                next = next.max(floor)
                                    + Duration::from_secs_f64(f.len() as f64 / bw as f64);
                                if next > now {
                                    std::thread::sleep(next - now);
                                }
                            }
                        }
                    }
                    Item::Flush(ack) => {
                        let _ = ack.send(());
                    }
                }
            }
        });
        Writer {
            tx: Some(tx),
            thread: Some(thread),
            bytes,
            error,
            cancel,
            dropped,
        }
    }

    /// Fails if the thread hit an error.
    pub fn check(&self) -> Result<()> {
        if let Some(e) = self.error.lock().unwrap_or_else(|p| p.into_inner()).clone() {
            bail!("sending to the receiver failed: {e}");
        }
        Ok(())
    }

    /// Queues frames (blocks while 4 batches are queued).
    pub fn push(&self, frames: Vec<Frame>) -> Result<()> {
        self.check()?;
        let tx = self.tx.as_ref().expect("writer open");
        if tx.send(Item::Frames(frames)).is_err() {
            self.check()?;
            bail!("sending to the receiver failed");
        }
        Ok(())
    }

    /// Waits until everything queued is written.
    pub fn flush(&self) -> Result<()> {
        let (a, r) = sync_channel(1);
        let tx = self.tx.as_ref().expect("writer open");
        if tx.send(Item::Flush(a)).is_err() || r.recv().is_err() {
            self.check()?;
            bail!("sending to the receiver failed");
        }
        self.check()
    }

    /// Drops whatever is queued instead of writing it (a cancel must not
    /// wait for a slow link to drain). True if nothing was dropped, so the
    /// stream is still whole and more may be sent.
    pub fn cancel(&self) -> bool {
        self.cancel.store(true, Ordering::SeqCst);
        let _ = self.flush();
        self.cancel.store(false, Ordering::SeqCst);
        self.dropped.load(Ordering::SeqCst) == 0
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.tx = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
