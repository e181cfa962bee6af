//! The migration wire protocol (docs/MIGRATION.md): a plaintext hello in
//! each direction, key confirmation, then ChaCha20-Poly1305 frames sealed
//! with per-direction session keys and a message counter in the nonce.

use std::io::{Read, Write};
use std::net::TcpStream;

use anyhow::{bail, Context, Result};
use hkdf::Hkdf;
use kimberley_formats::crypto::stream::{Sealer, AEAD_TAG};
use sha2::Sha256;

/// First bytes of a hello.
pub const MAGIC: [u8; 8] = *b"KIMBMIG\0";
/// Protocol version this build speaks.
pub const VERSION: u16 = 1;
/// Length of a hello.
pub const HELLO_LEN: usize = 48;
/// Length of a key-confirmation tag.
pub const CONFIRM_LEN: usize = 32;
/// Frame header length.
pub const FRAME_HEADER: usize = 8;
/// Largest plaintext message body.
pub const MAX_BODY: usize = 16 << 20;
/// Largest sealed message.
pub const MAX_SEALED: usize = MAX_BODY + AEAD_TAG;

/// Role byte of the sending side's hello.
pub const ROLE_SENDER: u8 = 1;
/// Role byte of the receiving side's hello.
pub const ROLE_RECEIVER: u8 = 2;

/// Message types. 0 is invalid.
pub mod msg {
    /// Sender → receiver: VM geometry (memory size, vCPUs, disks, name).
    pub const START: u8 = 1;
    /// Sender → receiver: a batch of memory pages or disk blocks.
    pub const CHUNKS: u8 = 2;
    /// Sender → receiver: end of a round.
    pub const ROUND_END: u8 = 3;
    /// Sender → receiver: the vCPU and device state blob.
    pub const STATE: u8 = 4;
    /// Sender → receiver: everything was sent; start the guest.
    pub const COMMIT: u8 = 5;
    /// Sender → receiver (last): the source has stopped for good; keep the guest.
    pub const DONE: u8 = 6;
    /// Sender → receiver (last): the migration is cancelled; discard everything.
    pub const ABORT: u8 = 7;
    /// Receiver → sender (last): the guest runs here.
    pub const RUNNING: u8 = 16;
    /// Receiver → sender (last): the receiver failed (UTF-8 reason).
    pub const ERROR: u8 = 17;
    /// Receiver → sender: a round was received and written.
    pub const ROUND_ACK: u8 = 18;

    /// Name for messages.
    pub fn name(t: u8) -> &'static str {
        match t {
            START => "START",
            CHUNKS => "CHUNKS",
            ROUND_END => "ROUND_END",
            STATE => "STATE",
            COMMIT => "COMMIT",
            DONE => "DONE",
            ABORT => "ABORT",
            RUNNING => "RUNNING",
            ERROR => "ERROR",
            ROUND_ACK => "ROUND_ACK",
            _ => "invalid",
        }
    }
}

/// Refusal by the peer's key confirmation: wrong key or tampering.
#[derive(Debug)]
pub struct AuthError(pub String);

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for AuthError {}

fn hello(role: u8, nonce: &[u8; 32]) -> [u8; HELLO_LEN] {
    let mut h = [0u8; HELLO_LEN];
    h[..8].copy_from_slice(&MAGIC);
    h[8..10].copy_from_slice(&VERSION.to_le_bytes());
    h[10] = role;
    h[16..48].copy_from_slice(nonce);
    h
}

fn parse_hello(h: &[u8; HELLO_LEN], role: u8) -> Result<[u8; 32]> {
    if h[..8] != MAGIC {
        bail!("the peer does not speak the vmigrate protocol");
    }
    let v = u16::from_le_bytes([h[8], h[9]]);
    if v != VERSION {
        bail!("the peer speaks vmigrate protocol version {v}, this build speaks {VERSION}");
    }
    if h[10] != role {
        bail!("the peer has role {} where {role} was expected", h[10]);
    }
    if h[11..16].iter().any(|&b| b != 0) {
        bail!("reserved bytes of the peer's hello are not zero");
    }
    Ok(h[16..48].try_into().expect("32 bytes"))
}

struct Keys {
    s2r: [u8; 32],
    r2s: [u8; 32],
    confirm_s: [u8; 32],
    confirm_r: [u8; 32],
}

fn derive(key: &[u8; 32], hello_s: &[u8], hello_r: &[u8]) -> Keys {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(&hello_s[16..48]);
    salt[32..].copy_from_slice(&hello_r[16..48]);
    let hk = Hkdf::<Sha256>::new(Some(&salt), key);
    let k = |info: &[u8]| {
        let mut o = [0u8; 32];
        hk.expand(info, &mut o).expect("32 bytes is a valid length");
        o
    };
    Keys {
        s2r: k(b"kimberley migrate v1 sender to receiver"),
        r2s: k(b"kimberley migrate v1 receiver to sender"),
        confirm_s: k(b"kimberley migrate v1 confirm sender"),
        confirm_r: k(b"kimberley migrate v1 confirm receiver"),
    }
}

fn confirm(k: &[u8; 32], hello_s: &[u8], hello_r: &[u8]) -> blake3::Hash {
    let mut h = blake3::Hasher::new_keyed(k);
    h.update(hello_s);
    h.update(hello_r);
    h.finalize()
}

fn random32() -> Result<[u8; 32]> {
    let mut n = [0u8; 32];
    getrandom::fill(&mut n).map_err(|e| anyhow::anyhow!("no random numbers: {e}"))?;
    Ok(n)
}

/// The sending half of a session.
pub struct Tx {
    stream: TcpStream,
    sealer: Sealer,
    counter: u64,
    closed: bool,
}

/// The receiving half of a session.
pub struct Rx {
    stream: TcpStream,
    sealer: Sealer,
    counter: u64,
    done: bool,
    /// Which message types this side may receive.
    allowed: &'static [u8],
}

const TO_RECEIVER: &[u8] = &[
    msg::START,
    msg::CHUNKS,
    msg::ROUND_END,
    msg::STATE,
    msg::COMMIT,
    msg::DONE,
    msg::ABORT,
];
const TO_SENDER: &[u8] = &[msg::RUNNING, msg::ERROR, msg::ROUND_ACK];

fn is_last(t: u8) -> bool {
    matches!(t, msg::DONE | msg::ABORT | msg::RUNNING | msg::ERROR)
}

/// The sender's side of the handshake on a connected stream.
pub fn handshake_sender(stream: TcpStream, key: &[u8; 32]) -> Result<(Tx, Rx)> {
    let mut s = stream;
    let hs = hello(ROLE_SENDER, &random32()?);
    s.write_all(&hs).context("sending the hello")?;
    let mut hr = [0u8; HELLO_LEN];
    s.read_exact(&mut hr)
        .context("reading the receiver's hello (is a `vmigrate recv` listening there?)")?;
    parse_hello(&hr, ROLE_RECEIVER)?;
    let keys = derive(key, &hs, &hr);
    let mut tag = [0u8; CONFIRM_LEN];
    s.read_exact(&mut tag)
        .context("reading the receiver's key confirmation")?;
    if confirm(&keys.confirm_r, &hs, &hr) != blake3::Hash::from(tag) {
        return Err(AuthError(
            "authentication failed: the receiver does not hold the same key (or the connection was tampered with)".into(),
        )
        .into());
    }
    s.write_all(confirm(&keys.confirm_s, &hs, &hr).as_bytes())
        .context("sending the key confirmation")?;
    split(s, &keys.s2r, &keys.r2s, TO_SENDER)
}

/// The receiver's side of the handshake on an accepted stream.
pub fn handshake_receiver(stream: TcpStream, key: &[u8; 32]) -> Result<(Tx, Rx)> {
    let mut s = stream;
    let mut hs = [0u8; HELLO_LEN];
    s.read_exact(&mut hs)
        .context("reading the sender's hello")?;
    parse_hello(&hs, ROLE_SENDER)?;
    let hr = hello(ROLE_RECEIVER, &random32()?);
    let keys = derive(key, &hs, &hr);
    let mut out = hr.to_vec();
    out.extend_from_slice(confirm(&keys.confirm_r, &hs, &hr).as_bytes());
    s.write_all(&out).context("sending the hello")?;
    let mut tag = [0u8; CONFIRM_LEN];
    s.read_exact(&mut tag).map_err(|_| {
        AuthError("the sender hung up during the handshake (does it hold the same key?)".into())
    })?;
    if confirm(&keys.confirm_s, &hs, &hr) != blake3::Hash::from(tag) {
        return Err(AuthError(
            "authentication failed: the sender does not hold the same key (or the connection was tampered with)".into(),
        )
        .into());
    }
    split(s, &keys.r2s, &keys.s2r, TO_RECEIVER)
}

fn split(s: TcpStream, tx: &[u8; 32], rx: &[u8; 32], allowed: &'static [u8]) -> Result<(Tx, Rx)> {
    let _ = s.set_nodelay(true);
    let r = s.try_clone().context("duplicating the socket")?;
    Ok((
        Tx {
            stream: s,
            sealer: Sealer::aead(tx),
            counter: 0,
            closed: false,
        },
        Rx {
            stream: r,
            sealer: Sealer::aead(rx),
            counter: 0,
            done: false,
            allowed,
        },
    ))
}

/// A sealed frame ready to write.
pub type Frame = Vec<u8>;

/// Seals `body` as message `t` with counter `counter` (for parallel sealing
/// with counters from [`Tx::reserve`]).
pub fn seal_at(sealer: &Sealer, counter: u64, t: u8, mut body: Vec<u8>) -> Frame {
    assert!(body.len() <= MAX_BODY, "message body too large");
    let last = is_last(t);
    let mut h = [0u8; FRAME_HEADER];
    h[0] = t;
    h[1] = u8::from(last);
    h[4..8].copy_from_slice(&((body.len() + AEAD_TAG) as u32).to_le_bytes());
    sealer.seal(counter, last, &h, &mut body);
    let mut f = Vec::with_capacity(FRAME_HEADER + body.len());
    f.extend_from_slice(&h);
    f.extend_from_slice(&body);
    f
}

impl Tx {
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

    /// Seals and writes one message.
    pub fn send(&mut self, t: u8, body: Vec<u8>) -> Result<usize> {
        if self.closed {
            bail!("message {} after the last message", msg::name(t));
        }
        let c = self.reserve(1);
        let f = seal_at(&self.sealer, c, t, body);
        self.write_frame(&f)?;
        if is_last(t) {
            self.closed = true;
        }
        Ok(f.len())
    }

    /// Writes an already sealed frame.
    pub fn write_frame(&mut self, f: &[u8]) -> Result<()> {
        self.stream
            .write_all(f)
            .context("the connection to the peer failed")
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

impl Rx {
    /// Reads, authenticates and opens the next message.
    pub fn recv(&mut self) -> Result<(u8, Vec<u8>)> {
        if self.done {
            bail!("the peer already sent its last message");
        }
        let mut h = [0u8; FRAME_HEADER];
        self.stream
            .read_exact(&mut h)
            .context("the connection to the peer was lost")?;
        let t = h[0];
        let last = h[1] == 1;
        let len = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        if !self.allowed.contains(&t) {
            bail!("protocol error: unexpected message type {t}");
        }
        if h[1] > 1 || h[2] != 0 || h[3] != 0 || last != is_last(t) {
            bail!("protocol error: bad frame header for {}", msg::name(t));
        }
        if !(AEAD_TAG..=MAX_SEALED).contains(&len) {
            bail!("protocol error: {} of {len} bytes", msg::name(t));
        }
        let mut body = vec![0u8; len];
        self.stream
            .read_exact(&mut body)
            .context("the connection to the peer was lost")?;
        self.sealer
            .open(self.counter, last, &h, &mut body)
            .map_err(|_| {
                AuthError(format!(
                    "authentication failed: message {} ({}) was forged, replayed or damaged",
                    self.counter,
                    msg::name(t)
                ))
            })?;
        self.counter += 1;
        self.done = last;
        Ok((t, body))
    }

    /// The underlying stream.
    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }
}

/// Reads a key file (exactly 32 bytes).
pub fn read_key(path: &std::path::Path) -> Result<[u8; 32]> {
    match kimberley_formats::crypto::keys::Secret::from_key_file(path)? {
        kimberley_formats::crypto::keys::Secret::Key(k) => Ok(k),
        kimberley_formats::crypto::keys::Secret::Passphrase(_) => unreachable!("a key file"),
    }
}

/// Little-endian helpers for message bodies.
pub struct Cursor<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    /// Reads `b` (a `what` message body).
    pub fn new(b: &'a [u8], what: &'static str) -> Self {
        Cursor { b, what }
    }

    /// Next `n` bytes.
    pub fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        if self.b.len() < n {
            bail!("protocol error: {} is truncated", self.what);
        }
        let (a, rest) = self.b.split_at(n);
        self.b = rest;
        Ok(a)
    }

    /// u32.
    pub fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }

    /// u64.
    pub fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }

    /// What is left.
    pub fn rest(&self) -> &'a [u8] {
        self.b
    }

    /// Fails unless everything was read.
    pub fn finish(&self) -> Result<()> {
        if !self.b.is_empty() {
            bail!("protocol error: trailing bytes in {}", self.what);
        }
        Ok(())
    }
}
