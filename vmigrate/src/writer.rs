//! The sender's writer thread: puts sealed frames on the wire in order,
//! paced by the `--max-bandwidth` token bucket, while the caller compresses
//! and seals the next window. Its queue holds 4 batches, or more while
//! their bytes are within a depth the caller sets (a reserve for the link
//! while the caller is busy producing little).

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{channel, sync_channel, Receiver, Sender, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
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

/// Batches always allowed in the queue, whatever their size.
const BATCHES: usize = 4;

/// What is queued: batches and their bytes, guarded, with the condition
/// the writer signals when it took one off.
#[derive(Default)]
struct Queued {
    n: Mutex<(usize, u64)>,
    taken: Condvar,
}

impl Queued {
    fn lock(&self) -> MutexGuard<'_, (usize, u64)> {
        self.n.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self, bytes: u64) {
        let mut q = self.lock();
        q.0 = q.0.saturating_sub(1);
        q.1 = q.1.saturating_sub(bytes);
        self.taken.notify_all();
    }
}

/// A thread writing frames to a clone of the session's socket.
pub struct Writer {
    tx: Option<Sender<Item>>,
    queued: Arc<Queued>,
    /// Bytes the queue may hold beyond [`BATCHES`] batches.
    depth: AtomicU64,
    thread: Option<JoinHandle<()>>,
    bytes: Arc<AtomicU64>,
    error: Arc<Mutex<Option<String>>>,
    cancel: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
}

impl Writer {
    /// Starts the thread on `out`, at most `max_bw` bytes per second.
    pub fn start(mut out: TcpStream, max_bw: Option<u64>) -> Writer {
        let (tx, rx): (Sender<Item>, Receiver<Item>) = channel();
        let queued = Arc::new(Queued::default());
        let q = queued.clone();
        let bytes = Arc::new(AtomicU64::new(0));
        let error = Arc::new(Mutex::new(None));
        let cancel = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (b, e, c, d) = (
            bytes.clone(),
            error.clone(),
            cancel.clone(),
            dropped.clone(),
        );
        let thread = std::thread::spawn(move || {
            // Token bucket: `next` is when the link is free again.
            let mut next = Instant::now();
            for item in rx {
                match item {
                    Item::Frames(fs) => {
                        let n: u64 = fs.iter().map(|f| f.len() as u64).sum();
                        let _taken = Taken(&q, n);
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
            queued,
            depth: AtomicU64::new(0),
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

    /// Lets the queue hold up to `bytes` beyond its 4 batches (0: just
    /// the 4 batches).
    pub fn set_depth(&self, bytes: u64) {
        if self.depth.swap(bytes, Ordering::SeqCst) < bytes {
            self.queued.taken.notify_all();
        }
    }

    /// Queues frames; blocks while 4 batches are queued and their bytes
    /// with these would exceed the depth.
    pub fn push(&self, frames: Vec<Frame>) -> Result<()> {
        self.check()?;
        let n: u64 = frames.iter().map(|f| f.len() as u64).sum();
        {
            let mut q = self.queued.lock();
            while q.0 >= BATCHES && q.1 + n > self.depth.load(Ordering::SeqCst) {
                // A thread that ended (an error) takes nothing off: the
                // send below fails instead. Checked every 50 ms.
                if self.thread.as_ref().is_none_or(|t| t.is_finished()) {
                    break;
                }
                q = self
                    .queued
                    .taken
                    .wait_timeout(q, Duration::from_millis(50))
                    .unwrap_or_else(|p| p.into_inner())
                    .0;
            }
            q.0 += 1;
            q.1 += n;
        }
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

/// Takes a batch off the queue's count when the writer is done with it.
struct Taken<'a>(&'a Queued, u64);

impl Drop for Taken<'_> {
    fn drop(&mut self) {
        self.0.take(self.1);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::atomic::AtomicUsize;

    const FRAME: usize = 64 << 10;

    /// Waits until `n` stops changing for 300 ms; returns its value.
    fn settled(n: &AtomicUsize) -> usize {
        let mut last = n.load(Ordering::SeqCst);
        let mut since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(20));
            let now = n.load(Ordering::SeqCst);
            if now != last {
                (last, since) = (now, Instant::now());
            } else if since.elapsed() > Duration::from_millis(300) {
                return now;
            }
        }
    }

    #[test]
    fn the_queue_holds_four_batches_or_the_depth_in_bytes() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        socket2::SockRef::from(&out)
            .set_send_buffer_size(16 << 10)
            .unwrap();
        let (mut peer, _) = l.accept().unwrap();
        socket2::SockRef::from(&peer)
            .set_recv_buffer_size(16 << 10)
            .unwrap();
        let w = Writer::start(out, None);
        let pushed = AtomicUsize::new(0);
        let total = 64;
        std::thread::scope(|sc| {
            sc.spawn(|| {
                for i in 0..total {
                    w.push(vec![vec![i as u8; FRAME]]).unwrap();
                    pushed.fetch_add(1, Ordering::SeqCst);
                }
            });
            // The peer reads nothing: the writer's thread blocks in a write
            // and the pushes stop at the queue's bound.
            let before = settled(&pushed);
            assert!(before < total, "the peer's buffers took everything");
            w.set_depth(16 * FRAME as u64);
            // 16 batches fit the depth where 4 did: 12 more are queued.
            assert_eq!(settled(&pushed), before + 12);
            // Less depth queues nothing more.
            w.set_depth(0);
            assert_eq!(settled(&pushed), before + 12);
            // Everything arrives, in order, once the peer reads.
            let mut got = vec![0u8; FRAME];
            for i in 0..total {
                peer.read_exact(&mut got).unwrap();
                assert!(got.iter().all(|&b| b == i as u8), "frame {i} out of order");
            }
        });
        assert_eq!(pushed.load(Ordering::SeqCst), total);
        w.flush().unwrap();
        assert_eq!(w.bytes(), (total * FRAME) as u64);
    }
}
