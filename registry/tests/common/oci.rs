//! Test fixtures for OCI registry tests (shared by the registry, cache,
//! kimberlize and dekimberlize suites): Debian's `docker-registry` on a
//! free loopback port with its storage in a tempdir, and a TCP proxy that
//! counts, cuts and rate-limits what the registry sends.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The registry binary Debian's `docker-registry` package installs.
pub const REGISTRY_BIN: &str = "/usr/bin/docker-registry";

/// A running registry, stopped (and its storage removed) on drop.
pub struct Registry {
    child: Child,
    pub port: u16,
    pub storage: PathBuf,
    _dir: tempfile::TempDir,
}

/// True if registry tests can run; panics if they must
/// (KIMBERLEY_REQUIRE_REGISTRY=1) and the binary is missing.
pub fn registry_available() -> bool {
    if Path::new(REGISTRY_BIN).exists() {
        return true;
    }
    if std::env::var_os("KIMBERLEY_REQUIRE_REGISTRY").is_some_and(|v| v == "1") {
        panic!("{REGISTRY_BIN} is missing and KIMBERLEY_REQUIRE_REGISTRY=1: apt-get install docker-registry");
    }
    eprintln!("skipped: {REGISTRY_BIN} is missing (apt-get install docker-registry)");
    false
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plain HTTP/1.0 GET: the status code, if anything answered.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

impl Registry {
    /// Starts a registry (None if the binary is missing and not required).
    pub fn start() -> Option<Registry> {
        if !registry_available() {
            return None;
        }
        for _ in 0..5 {
            let dir = tempfile::tempdir().unwrap();
            let storage = dir.path().join("storage");
            let port = free_port();
            let config = dir.path().join("config.yml");
            std::fs::write(
                &config,
                format!(
                    "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n\
                     storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
                     http:\n  addr: 127.0.0.1:{port}\n",
                    storage.display()
                ),
            )
            .unwrap();
            let mut child = Command::new(REGISTRY_BIN)
                .arg("serve")
                .arg(&config)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting docker-registry");
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if http_status(port, "/v2/") == Some(200) {
                    return Some(Registry {
                        child,
                        port,
                        storage,
                        _dir: dir,
                    });
                }
                if child.try_wait().unwrap().is_some() {
                    break; // the port was taken meanwhile: try another
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("docker-registry did not start");
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Where the registry keeps blob `hex`'s bytes.
    pub fn blob_data(&self, hex: &str) -> PathBuf {
        self.storage
            .join("docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the proxy does to the registry's answers.
#[derive(Default)]
struct Shared {
    /// Bytes sent from the registry to the clients.
    down: AtomicU64,
    /// Bytes sent from the clients to the registry.
    up: AtomicU64,
    /// Cut every connection once `down` reaches this (0: never).
    cut_at: AtomicU64,
    /// Cut the connection once `up` reaches this, once (0: never).
    cut_up_at: AtomicU64,
    /// Bytes per second towards the clients (0: unlimited).
    rate: AtomicU64,
    stop: AtomicBool,
    /// The rate limiter's clock: when the bytes sent so far may have left.
    next: Mutex<Option<Instant>>,
}

/// A TCP proxy in front of a registry.
pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

impl Proxy {
    /// Forwards 127.0.0.1:PORT to `upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let shared = Arc::new(Shared::default());
        let sh = shared.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                if sh.stop.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = c else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let sh1 = sh.clone();
                std::thread::spawn(move || pump(client, server, &sh1, false));
                let sh2 = sh.clone();
                std::thread::spawn(move || pump(s2, c2, &sh2, true));
            }
        });
        Proxy { port, shared }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes the registry sent through the proxy so far.
    pub fn down(&self) -> u64 {
        self.shared.down.load(Ordering::SeqCst)
    }

    /// Bytes the clients sent through the proxy so far.
    pub fn up(&self) -> u64 {
        self.shared.up.load(Ordering::SeqCst)
    }

    /// Zeroes the counters.
    pub fn reset(&self) {
        self.shared.down.store(0, Ordering::SeqCst);
        self.shared.up.store(0, Ordering::SeqCst);
    }

    /// Cuts connections once the registry sent `n` bytes in all (0: never).
    pub fn cut_after(&self, n: u64) {
        self.shared.cut_at.store(n, Ordering::SeqCst);
    }

    /// Cuts the connection that carries the clients' `n`th byte to the
    /// registry, once (an upload cut in the middle).
    pub fn cut_upload_once_after(&self, n: u64) {
        self.shared.cut_up_at.store(n, Ordering::SeqCst);
    }

    /// Limits what the registry sends to `bytes_per_sec` (0: unlimited).
    pub fn limit(&self, bytes_per_sec: u64) {
        self.shared.rate.store(bytes_per_sec, Ordering::SeqCst);
        *self.shared.next.lock().unwrap() = None;
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, sh: &Shared, down: bool) {
    let mut buf = [0u8; 16 << 10];
    loop {
        let mut n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if down {
            let cut = sh.cut_at.load(Ordering::SeqCst);
            let before = sh.down.load(Ordering::SeqCst);
            if cut > 0 && before + n as u64 >= cut {
                n = cut.saturating_sub(before) as usize;
                let _ = to.write_all(&buf[..n]);
                sh.down.fetch_add(n as u64, Ordering::SeqCst);
                break;
            }
            let rate = sh.rate.load(Ordering::SeqCst);
            if rate > 0 {
                // Each chunk leaves when the bytes before it would have.
                let wait = {
                    let mut next = sh.next.lock().unwrap();
                    let now = Instant::now();
                    // Sleeps overshoot: keep to the ideal schedule (catch
                    // up), unless the link was idle (then start afresh).
                    let at = match *next {
                        Some(t) if t + Duration::from_millis(50) > now => t,
                        _ => now,
                    };
                    *next = Some(at + Duration::from_secs_f64(n as f64 / rate as f64));
                    at.saturating_duration_since(now)
                };
                std::thread::sleep(wait);
            }
            sh.down.fetch_add(n as u64, Ordering::SeqCst);
        } else {
            let cut = sh.cut_up_at.load(Ordering::SeqCst);
            let before = sh.up.fetch_add(n as u64, Ordering::SeqCst);
            if cut > 0 && before + n as u64 >= cut {
                sh.cut_up_at.store(0, Ordering::SeqCst);
                let k = cut.saturating_sub(before) as usize;
                let _ = to.write_all(&buf[..k]);
                break;
            }
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}
