//! The migration channel over one TCP connection: the handshake (hellos,
//! key confirmation, per-direction session keys) and sealed frames carrying
//! [`Message`]s, each with its direction's message counter in the nonce.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hkdf::Hkdf;
use kimberley_formats::crypto::stream::Sealer;
use sha2::Sha256;

use crate::protocol::{
    FrameHeader, Hello, Message, Role, Type, CONFIRM_LEN, FRAME_HEADER, HELLO_LEN, SESSION_ID_LEN,
};

/// The whole handshake must finish within this time, or the connection is
/// dropped (a peer that connects and stays silent cannot hold a receiver).
pub const HANDSHAKE_DEADLINE: Duration = Duration::from_secs(5);

/// Refusal by the peer's key confirmation: wrong key or tampering.
#[derive(Debug)]
pub struct AuthError(pub String);

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AuthError {}

struct Keys {
    s2r: [u8; 32],
    r2s: [u8; 32],
    confirm_s: [u8; 32],
    confirm_r: [u8; 32],
}

fn derive(key: &[u8; 32], hs: &Hello, hr: &Hello) -> Keys {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&hs.nonce);
    salt[32..].copy_from_slice(&hr.nonce);
    let hk = Hkdf::<Sha256>::new(Some(&salt), key);
    let k = |info: &[u8]| {
        let mut o = [0u8; 32];
        hk.expand(info, &mut o).expect("32 bytes is a valid length");
        o
    };
    Keys {
        s2r: k(b"kimberley migrate v2 sender to receiver"),
        r2s: k(b"kimberley migrate v2 receiver to sender"),
        confirm_s: k(b"kimberley migrate v2 confirm sender"),
        confirm_r: k(b"kimberley migrate v2 confirm receiver"),
    }
}

fn confirm(k: &[u8; 32], hs: &Hello, hr: &Hello) -> [u8; CONFIRM_LEN] {
    let mut h = blake3::Hasher::new_keyed(k);
    h.update(&hs.encode());
    h.update(&hr.encode());
    *h.finalize().as_bytes()
}

/// Constant-time comparison of confirmation tags.
fn tags_equal(a: &[u8; CONFIRM_LEN], b: &[u8; CONFIRM_LEN]) -> bool {
    blake3::Hash::from(*a) == blake3::Hash::from(*b)
}

fn random32() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(|e| anyhow::anyhow!("no random numbers: {e}"))?;
    Ok(n)
}

/// Reads exactly `buf.len()` bytes before `deadline` (a peer that trickles
/// bytes does not extend it: every read waits only for what is left).
fn read_by(s: &mut TcpStream, mut buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
    while !buf.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the handshake did not finish in time",
            ));
        }
        s.set_read_timeout(Some(left))?;
        match s.read(buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => buf = &mut buf[n..],
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// The sender's side of the handshake on a connected stream.
pub fn handshake_sender(stream: TcpStream, key: &[u8; 32]) -> Result<(Tx, Rx)> {
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    let mut s = stream;
    s.set_write_timeout(Some(HANDSHAKE_DEADLINE)).ok();
    let hs = Hello {
        role: Role::Sender,
        nonce: random32()?,
    };
    s.write_all(&hs.encode()).context("sending the hello")?;
    let mut b = [0u8; HELLO_LEN];
    read_by(&mut s, &mut b, deadline)
        .context("reading the receiver's hello (is a `vmigrate recv` listening there?)")?;
    let hr = Hello::decode(&b, Role::Receiver)?;
    let keys = derive(key, &hs, &hr);
    let mut tag = [0u8; CONFIRM_LEN];
    read_by(&mut s, &mut tag, deadline).context("reading the receiver's key confirmation")?;
    if !tags_equal(&confirm(&keys.confirm_r, &hs, &hr), &tag) {
        return Err(AuthError(
            "authentication failed: the receiver does not hold the same key (or the connection was tampered with)".into(),
        )
        .into());
    }
    s.write_all(&confirm(&keys.confirm_s, &hs, &hr))
        .context("sending the key confirmation")?;
    split(s, &keys.s2r, &keys.r2s, Role::Sender, session_id(&hs, &hr))
}

/// A session's id: both hellos' nonces (fresh on each side, so no two
/// sessions share one).
fn session_id(hs: &Hello, hr: &Hello) -> [u8; SESSION_ID_LEN] {
    let mut id = [0u8; SESSION_ID_LEN];
    id[..32].copy_from_slice(&hs.nonce);
    id[32..].copy_from_slice(&hr.nonce);
    id
}

/// The receiver's side of the handshake on an accepted stream; fails if it
/// is not complete within [`HANDSHAKE_DEADLINE`].
pub fn handshake_receiver(stream: TcpStream, key: &[u8; 32]) -> Result<(Tx, Rx)> {
    let deadline = Instant::now() + HANDSHAKE_DEADLINE;
    let mut s = stream;
    s.set_write_timeout(Some(HANDSHAKE_DEADLINE)).ok();
    let mut b = [0u8; HELLO_LEN];
    read_by(&mut s, &mut b, deadline).context("reading the sender's hello")?;
    let hs = Hello::decode(&b, Role::Sender)?;
    let hr = Hello {
        role: Role::Receiver,
        nonce: random32()?,
    };
    let keys = derive(key, &hs, &hr);
    let mut out = hr.encode().to_vec();
    out.extend_from_slice(&confirm(&keys.confirm_r, &hs, &hr));
    s.write_all(&out).context("sending the hello")?;
    let mut tag = [0u8; CONFIRM_LEN];
    read_by(&mut s, &mut tag, deadline).map_err(|_| {
        AuthError("the sender hung up during the handshake (does it hold the same key?)".into())
    })?;
    if !tags_equal(&confirm(&keys.confirm_s, &hs, &hr), &tag) {
        return Err(AuthError(
            "authentication failed: the sender does not hold the same key (or the connection was tampered with)".into(),
        )
        .into());
    }
    split(
        s,
        &keys.r2s,
        &keys.s2r,
        Role::Receiver,
        session_id(&hs, &hr),
    )
}

fn split(
    s: TcpStream,
    tx: &[u8; 32],
    rx: &[u8; 32],
    me: Role,
    id: [u8; SESSION_ID_LEN],
) -> Result<(Tx, Rx)> {
    let _ = s.set_nodelay(true);
    s.set_read_timeout(None).ok();
    let r = s.try_clone().context("duplicating the socket")?;
    Ok((
        Tx {
            stream: s,
            sealer: Sealer::aead(tx),
            counter: 0,
            closed: false,
            id,
        },
        Rx {
            stream: r,
            sealer: Sealer::aead(rx),
            counter: 0,
            done: false,
            me,
        },
    ))
}

/// A sealed frame ready to write.
pub type Frame = Vec<u8>;

/// Seals message `m` with counter `counter` (for parallel sealing with
/// counters from [`Tx::reserve`]).
pub fn seal_at(sealer: &Sealer, counter: u64, m: Message) -> Frame {
    let ty = m.ty();
    let mut body = m.encode();
    let h = FrameHeader::for_body(ty, body.len()).encode();
    sealer.seal(counter, ty.is_last(), &h, &mut body);
    let mut f = Vec::with_capacity(FRAME_HEADER + body.len());
    f.extend_from_slice(&h);
    f.extend_from_slice(&body);
    f
}

/// The sending half of a session.
pub struct Tx {
    stream: TcpStream,
    sealer: Sealer,
    counter: u64,
    closed: bool,
    id: [u8; SESSION_ID_LEN],
}

impl Tx {
    /// The session's id (for QUERY).
    pub fn session_id(&self) -> [u8; SESSION_ID_LEN] {
        self.id
    }

    /// Reserves `n` consecutive counters; returns the first.
    pub fn reserve(&mut self, n: u64) -> u64 {
        let c = self.counter;
        self.counter += n;
        c
    }

    /// The sealer (for [`seal_at`]).
    pub fn sealer(&self) -> &Sealer {
        &self.sealer
    }

    /// Seals `m` with the next counter without writing it.
    pub fn seal(&mut self, m: Message) -> Result<Frame> {
        if self.closed {
            bail!("message {} after the last message", m.ty().name());
        }
        if m.ty().is_last() {
            self.closed = true;
        }
        let c = self.reserve(1);
        Ok(seal_at(&self.sealer, c, m))
    }

    /// Seals and writes one message.
    pub fn send(&mut self, m: Message) -> Result<usize> {
        let f = self.seal(m)?;
        self.stream
            .write_all(&f)
            .context("the connection to the peer failed")?;
        Ok(f.len())
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// The receiving half of a session.
pub struct Rx {
    stream: TcpStream,
    sealer: Sealer,
    counter: u64,
    done: bool,
    me: Role,
}

impl Rx {
    /// Reads, authenticates, opens and parses the next message.
    pub fn recv(&mut self) -> Result<Message> {
        if self.done {
            bail!("the peer already sent its last message");
        }
        let mut h = [0u8; FRAME_HEADER];
        self.stream
            .read_exact(&mut h)
            .context("the connection to the peer was lost")?;
        let fh = FrameHeader::decode(&h, self.me).context("protocol error")?;
        let mut body = vec![0u8; fh.sealed_len as usize];
        self.stream
            .read_exact(&mut body)
            .context("the connection to the peer was lost")?;
        let last = fh.ty.is_last();
        self.sealer
            .open(self.counter, last, &h, &mut body)
            .map_err(|_| {
                AuthError(format!(
                    "authentication failed: message {} ({}) was forged, replayed or damaged",
                    self.counter,
                    fh.ty.name()
                ))
            })?;
        self.counter += 1;
        self.done = last;
        Message::decode(fh.ty, body).context("protocol error")
    }

    /// Like [`Rx::recv`], for a message that must be of type `want`.
    pub fn expect(&mut self, want: Type) -> Result<Message> {
        let m = self.recv()?;
        if m.ty() != want {
            bail!(
                "protocol error: {} where {} was expected",
                m.ty().name(),
                want.name()
            );
        }
        Ok(m)
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// Ends the session after this side's last message without a reset:
    /// says it sends no more, then reads and drops whatever the peer still
    /// sends until it closes too (or `limit` passes). A socket closed with
    /// unread bytes in its receive queue resets the connection, and a reset
    /// discards what this side had queued but not yet sent, which may be
    /// its last message (DONE).
    pub fn linger(&mut self, limit: Duration) {
        use std::os::unix::io::AsRawFd;
        let _ = self.stream.shutdown(std::net::Shutdown::Write);
        let end = Instant::now() + limit;
        let mut sink = [0u8; 4096];
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match kimberley_formats::sys::poll::readable_one(self.stream.as_raw_fd(), Some(left)) {
                Ok(true) => match self.stream.read(&mut sink) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                _ => return,
            }
        }
    }
}

/// Reads a key file (either form of docs/FORMAT.md "Key files"; a
/// malformed one is a usage error).
pub fn read_key(path: &std::path::Path) -> Result<[u8; 32]> {
    kimberley_cli::keys::read_key_file(path)
}
