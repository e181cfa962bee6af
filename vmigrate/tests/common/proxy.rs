//! A proxy between the hosts of a migration that reads the cleartext
//! frame headers and strikes (cuts, kills) just before a chosen one: the
//! fault matrices' instrument.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// When the fault strikes: just before the proxy forwards this.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum At {
    /// The sender's hello.
    Handshake,
    /// A frame of type `ty` (its `nth` occurrence, from 1) from the sender
    /// (`to_receiver`) or from the receiver.
    Frame {
        /// From the sender.
        to_receiver: bool,
        /// Message type.
        ty: u8,
        /// Its occurrence, from 1.
        nth: usize,
    },
}

/// Parses one direction of the stream (handshake bytes, then frames) and
/// forwards it; calls `strike` before forwarding the event `at` and stops
/// forwarding if it returns false.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    to_receiver: bool,
    at: At,
    strike: Arc<dyn Fn() -> bool + Send + Sync>,
    struck: Arc<Mutex<bool>>,
) {
    let mut counts = [0usize; 256];
    // Handshake: the sender sends its 48-byte hello, then (after the
    // receiver's hello and confirmation, 80 bytes) its 32-byte
    // confirmation.
    let parts: &[usize] = if to_receiver { &[48, 32] } else { &[80] };
    for (i, &n) in parts.iter().enumerate() {
        let mut b = vec![0u8; n];
        if from.read_exact(&mut b).is_err() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        if to_receiver && i == 0 && at == At::Handshake {
            *struck.lock().unwrap() = true;
            if !strike() {
                let _ = from.shutdown(Shutdown::Both);
                let _ = to.shutdown(Shutdown::Both);
                return;
            }
        }
        if to.write_all(&b).is_err() {
            return;
        }
    }
    loop {
        let mut h = [0u8; 8];
        if from.read_exact(&mut h).is_err() {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
        counts[h[0] as usize] += 1;
        if let At::Frame {
            to_receiver: d,
            ty,
            nth,
        } = at
        {
            if d == to_receiver && h[0] == ty && counts[ty as usize] == nth {
                *struck.lock().unwrap() = true;
                if !strike() {
                    let _ = from.shutdown(Shutdown::Both);
                    let _ = to.shutdown(Shutdown::Both);
                    return;
                }
            }
        }
        let n = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
        let mut body = vec![0u8; n];
        if from.read_exact(&mut body).is_err()
            || to.write_all(&h).is_err()
            || to.write_all(&body).is_err()
        {
            let _ = to.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// A proxy to `to`: the first connection (the migration) gets the fault;
/// later ones (a sender in doubt asking how the hand-over ended) pass.
pub fn proxy(
    to: String,
    at: At,
    strike: Arc<dyn Fn() -> bool + Send + Sync>,
) -> (String, Arc<Mutex<bool>>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let struck = Arc::new(Mutex::new(false));
    let s2 = struck.clone();
    std::thread::spawn(move || {
        let mut first = true;
        for c in l.incoming() {
            let Ok(a) = c else { return };
            let Ok(b) = TcpStream::connect(&to) else {
                // The receiver is gone: from now on this address refuses
                // connections too, as the receiver's own would.
                return;
            };
            let (at, strike) = if first {
                (at, strike.clone())
            } else {
                (
                    At::Frame {
                        to_receiver: true,
                        ty: 0,
                        nth: 0,
                    },
                    Arc::new(|| true) as Arc<dyn Fn() -> bool + Send + Sync>,
                )
            };
            first = false;
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (s1, s2a, s2b) = (strike.clone(), s2.clone(), s2.clone());
            std::thread::spawn(move || pump(a, b, true, at, s1, s2a));
            std::thread::spawn(move || pump(b2, a2, false, at, strike, s2b));
        }
    });
    (addr, struck)
}
