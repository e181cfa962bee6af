//! The daemon's API from the device's side (what `kimberlize offload`
//! uses): a mutually authenticated connection per request, the upload of
//! an overlay with its key, the progress lines, control requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, StreamOwned};
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{self, ErrorBody, Forward, Info, Progress, SessionInfo};
use crate::http::{self, HttpError};

/// Longest JSON answer read.
const MAX_ANSWER: u64 = 16 << 20;
/// Connect timeout per address.
const CONNECT: Duration = Duration::from_secs(10);

/// What went wrong talking to a daemon.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No address could be connected to.
    #[error("connecting to {0}: {1}")]
    Connect(String, #[source] std::io::Error),
    /// The TLS handshake failed: the daemon's certificate is not from our
    /// CA or does not name the server, or the daemon refused ours.
    #[error("TLS handshake with {0} failed: {1}")]
    Handshake(String, String),
    /// The connection failed after the handshake.
    #[error("talking to {0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The answer was not HTTP as the API speaks it.
    #[error("bad answer from {0}: {1}")]
    Http(String, #[source] HttpError),
    /// The daemon answered with an error.
    #[error("the cloudlet refused: {} (HTTP {status}, {})", .body.error, serde_json::to_string(&.body.reason).unwrap_or_default())]
    Refused {
        /// The HTTP status.
        status: u16,
        /// Its error body.
        body: ErrorBody,
    },
    /// An answer that is not the JSON expected.
    #[error("bad JSON from {0}: {1}")]
    Json(String, String),
}

type Tls = StreamOwned<ClientConnection, TcpStream>;

/// A daemon at some addresses, checked against a CA and a server name.
#[derive(Debug, Clone)]
pub struct Client {
    cfg: Arc<ClientConfig>,
    addrs: Vec<SocketAddr>,
    name: ServerName<'static>,
    host: String,
}

/// How a session started: its progress lines with the client's timeline.
#[derive(Debug, Clone)]
pub struct Started {
    /// The session id.
    pub session: String,
    /// Every progress line, in order.
    pub events: Vec<Progress>,
    /// Connection and TLS handshake done (ms since the call).
    pub bind_ms: u64,
    /// The last overlay byte written (ms since the call).
    pub upload_ms: u64,
    /// The guest's first answer received (ms since the call).
    pub ready_ms: u64,
    /// The guest ports forwarded, as the daemon reported them (its
    /// `ready` line).
    pub forwards: Vec<Forward>,
    /// The daemon's address this session was made through.
    pub peer: Option<SocketAddr>,
}

impl Client {
    /// A client of the daemon at `addrs` (tried in order), whose
    /// certificate must chain to `cfg`'s roots and name `server_name`.
    pub fn new(
        cfg: Arc<ClientConfig>,
        addrs: Vec<SocketAddr>,
        server_name: ServerName<'static>,
    ) -> Client {
        let host = addrs.first().map(|a| a.to_string()).unwrap_or_default();
        Client {
            cfg,
            addrs,
            name: server_name,
            host,
        }
    }

    /// The address used for messages (the first).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Connects and completes the handshake (both certificates checked).
    pub fn connect(&self) -> Result<Tls, ClientError> {
        let mut last = None;
        for a in &self.addrs {
            match TcpStream::connect_timeout(a, CONNECT) {
                Ok(tcp) => {
                    let _ = tcp.set_nodelay(true);
                    let _ = tcp.set_read_timeout(Some(Duration::from_secs(600)));
                    let _ = tcp.set_write_timeout(Some(Duration::from_secs(120)));
                    let conn = ClientConnection::new(self.cfg.clone(), self.name.clone())
                        .map_err(|e| ClientError::Handshake(a.to_string(), e.to_string()))?;
                    let mut tls = StreamOwned::new(conn, tcp);
                    while tls.conn.is_handshaking() {
                        tls.conn
                            .complete_io(&mut tls.sock)
                            .map_err(|e| ClientError::Handshake(a.to_string(), e.to_string()))?;
                    }
                    return Ok(tls);
                }
                Err(e) => last = Some((a.to_string(), e)),
            }
        }
        let (a, e) = last.unwrap_or_else(|| {
            (
                "the cloudlet".into(),
                std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
            )
        });
        Err(ClientError::Connect(a, e))
    }

    fn io(&self, e: std::io::Error) -> ClientError {
        ClientError::Io(self.host.clone(), e)
    }

    fn head(&self, r: &mut impl BufRead) -> Result<http::Response, ClientError> {
        let h = http::read_head(r)
            .map_err(|e| ClientError::Http(self.host.clone(), e))?
            .ok_or_else(|| ClientError::Http(self.host.clone(), HttpError::Closed))?;
        http::parse_response(&h).map_err(|e| ClientError::Http(self.host.clone(), e))
    }

    fn body(&self, r: &mut impl BufRead, resp: &http::Response) -> Result<Vec<u8>, ClientError> {
        let n = resp
            .content_length()
            .map_err(|e| ClientError::Http(self.host.clone(), e))?
            .unwrap_or(MAX_ANSWER)
            .min(MAX_ANSWER);
        let mut b = Vec::new();
        r.take(n).read_to_end(&mut b).map_err(|e| self.io(e))?;
        Ok(b)
    }

    fn refused(&self, status: u16, body: &[u8]) -> ClientError {
        match serde_json::from_slice::<ErrorBody>(body) {
            Ok(body) => ClientError::Refused { status, body },
            Err(_) => ClientError::Json(
                self.host.clone(),
                format!("HTTP {status} without an error body"),
            ),
        }
    }

    /// One request with an optional JSON body; the answer as `T`.
    pub fn call<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<T, ClientError> {
        let mut tls = self.connect()?;
        let b = body.map(|v| v.to_string().into_bytes());
        let mut out = http::request_head(
            method,
            path,
            &self.host,
            &[("Content-Type", api::JSON)],
            b.as_ref().map(|b| b.len() as u64),
        );
        if let Some(b) = &b {
            out.extend_from_slice(b);
        }
        tls.write_all(&out)
            .and_then(|()| tls.flush())
            .map_err(|e| self.io(e))?;
        let mut r = BufReader::new(tls);
        let resp = self.head(&mut r)?;
        let body = self.body(&mut r, &resp)?;
        if resp.status != 200 {
            return Err(self.refused(resp.status, &body));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Json(self.host.clone(), e.to_string()))
    }

    /// `GET /v1/info`.
    pub fn info(&self) -> Result<Info, ClientError> {
        self.call("GET", "/v1/info", None)
    }

    /// `GET /v1/sessions/ID`.
    pub fn session(&self, id: &str) -> Result<SessionInfo, ClientError> {
        self.call("GET", &format!("/v1/sessions/{id}"), None)
    }

    /// `POST /v1/sessions/ID/OP` (`status`, `pause`, `resume`, `exec`)
    /// with `body`: the VM's answer.
    pub fn control(&self, id: &str, op: &str, body: Option<&Value>) -> Result<Value, ClientError> {
        self.call("POST", &format!("/v1/sessions/{id}/{op}"), body)
    }

    /// `DELETE /v1/sessions/ID`: discards the session, or with `keep`
    /// suspends its VM into the daemon's state directory.
    pub fn delete(&self, id: &str, keep: bool) -> Result<Value, ClientError> {
        let body = serde_json::json!({ "keep": keep });
        self.call("DELETE", &format!("/v1/sessions/{id}"), Some(&body))
    }

    /// `POST /v1/sessions`: uploads `len` bytes of overlay from `overlay`
    /// with `key`, asking for the guest `ports` to be forwarded (none:
    /// `&[]`), then follows the progress until the guest answers
    /// (`on_event` sees each line as it comes).
    pub fn start(
        &self,
        key: &[u8; 32],
        overlay: &mut dyn Read,
        len: u64,
        ports: &[u16],
        on_event: impl FnMut(&Progress),
    ) -> Result<Started, ClientError> {
        self.begin(key, Ok((overlay, len)), ports, on_event)
    }

    /// `POST /v1/sessions` for the chain `reference` names, which the
    /// daemon applies from its cloudlet cache; as [`Client::start`].
    pub fn start_from(
        &self,
        key: &[u8; 32],
        reference: &str,
        ports: &[u16],
        on_event: impl FnMut(&Progress),
    ) -> Result<Started, ClientError> {
        self.begin(key, Err(reference), ports, on_event)
    }

    fn begin(
        &self,
        key: &[u8; 32],
        source: Result<(&mut dyn Read, u64), &str>,
        ports: &[u16],
        mut on_event: impl FnMut(&Progress),
    ) -> Result<Started, ClientError> {
        let t0 = Instant::now();
        let ms = || t0.elapsed().as_millis() as u64;
        let mut tls = self.connect()?;
        let bind_ms = ms();
        let peer = tls.sock.peer_addr().ok();
        let key_hex = kimberley_formats::digest::hex(key);
        let ports_value = api::ports_header(ports);
        let mut headers = vec![(api::KEY_HEADER, key_hex.as_str())];
        if !ports.is_empty() {
            headers.push((api::PORTS_HEADER, ports_value.as_str()));
        }
        let len = match &source {
            Ok((_, len)) => {
                headers.push(("Content-Type", api::OVERLAY));
                Some(*len)
            }
            Err(r) => {
                headers.push((api::FROM_HEADER, r));
                None
            }
        };
        let head = http::request_head("POST", "/v1/sessions", &self.host, &headers, len);
        tls.write_all(&head).map_err(|e| self.io(e))?;
        // What the daemon says while the overlay is still going up: a VM
        // that starts early answers before the last byte.
        let mut said = Vec::new();
        let mut ready_at = None;
        if let Ok((overlay, len)) = source {
            let mut src = overlay.take(len);
            let mut buf = vec![0u8; UPLOAD_PIECE];
            let mut sent = 0u64;
            loop {
                let n = src.read(&mut buf).map_err(|e| self.io(e))?;
                if n == 0 {
                    break;
                }
                tls.write_all(&buf[..n]).map_err(|e| self.io(e))?;
                sent += n as u64;
                if ready_at.is_none() {
                    read_available(&mut tls, &mut said).map_err(|e| self.io(e))?;
                    if says_ready(&said) {
                        ready_at = Some(ms());
                    }
                }
            }
            if sent != len {
                return Err(self.io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the overlay ended after {sent} of {len} bytes"),
                )));
            }
        }
        tls.flush().map_err(|e| self.io(e))?;
        let upload_ms = ms();
        let mut r = BufReader::new(std::io::Cursor::new(said).chain(tls));
        let resp = self.head(&mut r)?;
        if resp.status != 200 {
            let body = self.body(&mut r, &resp)?;
            return Err(self.refused(resp.status, &body));
        }
        let mut events = Vec::new();
        let mut session = None;
        loop {
            let mut line = String::new();
            let n = (&mut r)
                .take(MAX_ANSWER)
                .read_line(&mut line)
                .map_err(|e| self.io(e))?;
            if n == 0 {
                return Err(ClientError::Json(
                    self.host.clone(),
                    "the progress stream ended before the guest answered".into(),
                ));
            }
            let ev: Progress = serde_json::from_str(&line)
                .map_err(|e| ClientError::Json(self.host.clone(), format!("{e}: {line:?}")))?;
            on_event(&ev);
            events.push(ev.clone());
            match ev {
                Progress::Accepted { session: s, .. } => session = Some(s),
                Progress::Failed { error, reason, .. } => {
                    return Err(ClientError::Refused {
                        status: reason.status(),
                        body: ErrorBody { error, reason },
                    })
                }
                Progress::Ready { forwards, .. } => {
                    let session = session.ok_or_else(|| {
                        ClientError::Json(self.host.clone(), "ready before accepted".into())
                    })?;
                    return Ok(Started {
                        session,
                        events,
                        bind_ms,
                        upload_ms,
                        ready_ms: ready_at.unwrap_or_else(ms),
                        forwards,
                        peer,
                    });
                }
                _ => {}
            }
        }
    }
}

/// Overlay bytes written between two looks at what the daemon said.
const UPLOAD_PIECE: usize = 256 << 10;

/// Appends to `into` the response bytes that have arrived on `tls`,
/// without waiting for more.
fn read_available(tls: &mut Tls, into: &mut Vec<u8>) -> std::io::Result<()> {
    tls.sock.set_nonblocking(true)?;
    let r = (|| loop {
        match tls.conn.read_tls(&mut tls.sock) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                tls.conn
                    .process_new_packets()
                    .map_err(std::io::Error::other)?;
                let mut b = [0u8; 16 << 10];
                loop {
                    match tls.conn.reader().read(&mut b) {
                        Ok(0) => break,
                        Ok(k) => into.extend_from_slice(&b[..k]),
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(e),
                    }
                }
                if into.len() as u64 > MAX_ANSWER {
                    return Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(()),
            Err(e) => return Err(e),
        }
    })();
    tls.sock.set_nonblocking(false)?;
    r
}

/// True when `said` (a response so far) is a 200 whose progress lines
/// include `ready`.
fn says_ready(said: &[u8]) -> bool {
    let Some(end) = said.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    if !said.starts_with(b"HTTP/1.1 200") {
        return false;
    }
    said[end + 4..]
        .split(|&b| b == b'\n')
        .filter_map(|l| serde_json::from_slice::<Progress>(l).ok())
        .any(|p| matches!(p, Progress::Ready { .. }))
}
