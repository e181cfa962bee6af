//! The HTTPS+JSON API: a TLS 1.3 listener that requires client
//! certificates, one thread and one request per connection, and the
//! routes of docs/CLOUDLET.md ("The daemon's API").

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::sys::poll;
use rustls::{ServerConfig, ServerConnection, StreamOwned};
use serde::Serialize;
use serde_json::{json, Value};

use crate::api::{self, ErrorBody, Progress, Reason};
use crate::http::{self, Request};
use crate::log;
use crate::session::{self, Manager, NewSession, Refusal, Source, Upload};

/// Longest JSON request body (control requests, `DELETE`'s body).
const MAX_JSON: u64 = 1 << 20;
/// Upload pieces handed to the synthesis.
const CHUNK: usize = 256 << 10;
/// Pieces in flight between the connection and the synthesis.
const IN_FLIGHT: usize = 16;
/// A peer silent for this long (head, upload) is cut.
const IDLE: Duration = Duration::from_secs(60);
/// The handshake's time limit per read: an unauthenticated peer holds a
/// connection thread no longer.
const HANDSHAKE: Duration = Duration::from_secs(10);
/// Connections served at once; more are closed at once (logged).
const MAX_CONNECTIONS: usize = 256;
/// How often the accept loop looks at the stop flag.
const TICK: Duration = Duration::from_millis(100);

type Tls = StreamOwned<ServerConnection, TcpStream>;

/// Serves `listener` until `stop` is set; each connection on its own
/// thread.
pub fn serve(
    listener: TcpListener,
    tls: Arc<ServerConfig>,
    mgr: Arc<Manager>,
    stop: Arc<AtomicBool>,
) {
    let _ = listener.set_nonblocking(true);
    let open = Arc::new(AtomicUsize::new(0));
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((tcp, peer)) => {
                if open.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
                    open.fetch_sub(1, Ordering::SeqCst);
                    log::warn(
                        "connection.refused",
                        json!({"peer": peer, "why": "too many connections"}),
                    );
                    continue;
                }
                let (tls, mgr, open) = (tls.clone(), mgr.clone(), open.clone());
                std::thread::spawn(move || {
                    connection(tcp, peer, tls, mgr);
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                let _ = poll::readable_one(listener.as_raw_fd(), Some(TICK));
            }
            Err(e) => {
                log::warn("accept.failed", json!({"error": e.to_string()}));
                std::thread::sleep(TICK);
            }
        }
    }
}

fn connection(tcp: TcpStream, peer: SocketAddr, cfg: Arc<ServerConfig>, mgr: Arc<Manager>) {
    let _ = tcp.set_nonblocking(false);
    let _ = tcp.set_read_timeout(Some(HANDSHAKE));
    let _ = tcp.set_write_timeout(Some(IDLE));
    let _ = tcp.set_nodelay(true);
    let conn = match ServerConnection::new(cfg) {
        Ok(c) => c,
        Err(e) => return log::warn("tls.failed", json!({"peer": peer, "error": e.to_string()})),
    };
    let mut tls = StreamOwned::new(conn, tcp);
    // The handshake, client certificate check included, before anything
    // is read as a request.
    while tls.conn.is_handshaking() {
        if let Err(e) = tls.conn.complete_io(&mut tls.sock) {
            return log::warn("tls.refused", json!({"peer": peer, "error": e.to_string()}));
        }
    }
    let Some(owner) = tls
        .conn
        .peer_certificates()
        .and_then(|c| c.first())
        .map(crate::tls::fingerprint)
    else {
        return log::warn(
            "tls.refused",
            json!({"peer": peer, "error": "no client certificate"}),
        );
    };
    let _ = tls.sock.set_read_timeout(Some(IDLE));
    let mut r = BufReader::new(tls);
    let req = match http::read_head(&mut r) {
        Ok(Some(h)) => http::parse_request(&h),
        Ok(None) => return,
        Err(e) => Err(e),
    };
    let req = match req {
        Ok(q) => q,
        Err(e) => {
            let _ = respond_err(r.get_mut(), (Reason::BadRequest, e.to_string()));
            return finish(r.into_inner());
        }
    };
    log::info(
        "request",
        json!({"peer": peer, "client": owner, "method": req.method, "path": req.path}),
    );
    let result = route(&mgr, &owner, &req, &mut r);
    if let Err(e) = result {
        let _ = respond_err(r.get_mut(), e);
    }
    finish(r.into_inner());
}

/// Ends the TLS session cleanly (close_notify) and the connection.
fn finish(mut tls: Tls) {
    tls.conn.send_close_notify();
    let _ = tls.conn.complete_io(&mut tls.sock);
    let _ = tls.sock.shutdown(std::net::Shutdown::Both);
}

fn respond(w: &mut Tls, status: u16, body: &impl Serialize) -> std::io::Result<()> {
    let mut b = serde_json::to_vec(body).unwrap_or_default();
    b.push(b'\n');
    w.write_all(&http::response_head(
        status,
        api::JSON,
        Some(b.len() as u64),
    ))?;
    w.write_all(&b)?;
    w.flush()
}

fn respond_err(w: &mut Tls, (reason, error): Refusal) -> std::io::Result<()> {
    respond(w, reason.status(), &ErrorBody { error, reason })
}

fn bad(msg: impl Into<String>) -> Refusal {
    (Reason::BadRequest, msg.into())
}

/// A small JSON body (none: `null`).
fn json_body(req: &Request, r: &mut BufReader<Tls>) -> Result<Value, Refusal> {
    let n = req
        .content_length()
        .map_err(|e| bad(e.to_string()))?
        .unwrap_or(0);
    if n > MAX_JSON {
        return Err(bad(format!("request body longer than {MAX_JSON} bytes")));
    }
    if n == 0 {
        return Ok(Value::Null);
    }
    let mut b = Vec::new();
    r.take(n)
        .read_to_end(&mut b)
        .map_err(|e| bad(format!("reading the body: {e}")))?;
    serde_json::from_slice(&b).map_err(|e| bad(format!("the body is not JSON: {e}")))
}

fn ok(r: &mut BufReader<Tls>, v: &impl Serialize) -> Result<(), Refusal> {
    respond(r.get_mut(), 200, v).map_err(|e| (Reason::Internal, e.to_string()))
}

fn route(
    mgr: &Arc<Manager>,
    owner: &str,
    req: &Request,
    r: &mut BufReader<Tls>,
) -> Result<(), Refusal> {
    let path = req.path.split('?').next().unwrap_or("");
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match (req.method.as_str(), parts.as_slice()) {
        ("GET", ["v1", "info"]) => ok(r, &mgr.info()),
        ("GET", ["v1", "sessions"]) => ok(r, &mgr.list(owner)),
        ("POST", ["v1", "sessions"]) => create(mgr, owner, req, r),
        ("GET", ["v1", "sessions", id]) => ok(r, &mgr.get(id, owner)?.info()),
        ("DELETE", ["v1", "sessions", id]) => {
            let s = mgr.get(id, owner)?;
            let d: api::Delete = match json_body(req, r)? {
                Value::Null => api::Delete::default(),
                v => serde_json::from_value(v).map_err(|e| bad(e.to_string()))?,
            };
            session::stop(mgr, &s, d.keep)?;
            log::info("session.deleted", json!({"session": s.id, "keep": d.keep}));
            ok(r, &json!({"ok": true, "id": s.id, "kept": d.keep}))
        }
        ("POST", ["v1", "sessions", id, "stop"]) => {
            let s = mgr.get(id, owner)?;
            json_body(req, r)?;
            session::stop(mgr, &s, true)?;
            ok(r, &s.info())
        }
        ("POST", ["v1", "sessions", id, "resume"])
            if mgr.get(id, owner)?.state() == api::State::Suspended =>
        {
            let s = mgr.get(id, owner)?;
            json_body(req, r)?;
            session::revive(mgr, &s)?;
            ok(r, &s.info())
        }
        ("POST", ["v1", "sessions", id, op @ ("status" | "pause" | "resume" | "exec")]) => {
            let s = mgr.get(id, owner)?;
            let body = json_body(req, r)?;
            let (cmd, timeout) = if *op == "exec" {
                let e: api::Exec =
                    serde_json::from_value(body).map_err(|e| bad(format!("exec: {e}")))?;
                let t = e.timeout_ms.map_or(
                    kimberley_machine::control::DEFAULT_EXEC_TIMEOUT,
                    Duration::from_millis,
                );
                let mut v = json!({"cmd": "exec", "script": e.script});
                if let Some(ms) = e.timeout_ms {
                    v["timeout_ms"] = ms.into();
                }
                (v, t + Duration::from_secs(30))
            } else {
                (json!({"cmd": op}), Duration::from_secs(60))
            };
            let answer = session::control(&s, &cmd, timeout)?;
            ok(r, &answer)
        }
        (_, ["v1", ..]) => Err((
            Reason::NotFound,
            format!("no route {} {}", req.method, req.path),
        )),
        _ => Err((
            Reason::NotFound,
            format!("no route {} {}", req.method, req.path),
        )),
    }
}

/// `POST /v1/sessions`: the upload is pumped to the synthesis thread in
/// pieces; its progress goes back as JSON lines once the overlay's header
/// is accepted (a refusal before that is an error status). The body is
/// always read to its end, so the client, which sends it all before it
/// reads, gets the answer.
fn create(
    mgr: &Arc<Manager>,
    owner: &str,
    req: &Request,
    r: &mut BufReader<Tls>,
) -> Result<(), Refusal> {
    let t0 = Instant::now();
    let from = req.header(api::FROM_HEADER).map(str::to_string);
    let len = req.content_length().map_err(|e| bad(e.to_string()))?;
    let len = match (&from, len) {
        (None, Some(n)) => n,
        (Some(_), None | Some(0)) => 0,
        (None, None) => return Err(bad("the overlay must be sent with a Content-Length")),
        (Some(_), Some(_)) => {
            return Err(bad(format!(
                "a request with {} has no body",
                api::FROM_HEADER
            )))
        }
    };
    // The key is checked before anything else happens.
    let key = req
        .header(api::KEY_HEADER)
        .and_then(kimberley_formats::digest::from_hex)
        .ok_or_else(|| {
            bad(format!(
                "a {} header with the overlay key (64 hex digits) is required",
                api::KEY_HEADER
            ))
        });
    let key = match key {
        Ok(k) => k,
        Err(e) => {
            drain(r, len);
            return Err(e);
        }
    };
    let ports = match req.header(api::PORTS_HEADER).map(api::parse_ports) {
        None => Vec::new(),
        Some(Ok(p)) => p,
        Some(Err(e)) => {
            drain(r, len);
            return Err(bad(e.to_string()));
        }
    };
    let reservation = match mgr.reserve() {
        Ok(res) => res,
        Err(e) => {
            drain(r, len);
            return Err(e);
        }
    };
    let (tx, rx) = mpsc::sync_channel::<session::Chunk>(IN_FLIGHT);
    let (etx, erx) = mpsc::sync_channel::<Progress>(16);
    let cut = Arc::new(AtomicBool::new(false));
    let new = NewSession {
        owner: owner.to_string(),
        key: Secret::Key(key),
        reservation,
        source: match from.clone() {
            Some(r) => Source::Reference(r),
            None => Source::Upload(Upload::new(rx)),
        },
        ports,
        cut: cut.clone(),
        t0,
    };
    let m = mgr.clone();
    std::thread::spawn(move || session::run(m, new, etx));

    let mut head_sent = false;
    let mut finished = false;
    let mut tx = Some(tx);
    let mut left = len;
    let mut buf = vec![0u8; CHUNK];
    // Writes the progress lines that arrived; false once the stream is done.
    let relay = |w: &mut Tls, ev: Progress, head_sent: &mut bool| -> bool {
        let end = matches!(ev, Progress::Ready { .. } | Progress::Failed { .. });
        if !*head_sent {
            if let Progress::Failed { error, reason, .. } = ev {
                let _ = respond_err(w, (reason, error));
                *head_sent = true;
                return false;
            }
            let _ = w.write_all(&http::response_head(200, api::JSON_LINES, None));
            *head_sent = true;
        }
        let mut line = serde_json::to_vec(&ev).unwrap_or_default();
        line.push(b'\n');
        let _ = w.write_all(&line).and_then(|()| w.flush());
        !end
    };
    while left > 0 {
        let want = left.min(CHUNK as u64) as usize;
        match r.read(&mut buf[..want]) {
            Ok(0) | Err(_) => {
                cut.store(true, Ordering::SeqCst);
                if let Some(tx) = tx.take() {
                    let _ = tx.send(Err(()));
                }
                log::warn(
                    "upload.cut",
                    json!({"client": owner, "received": len - left, "length": len}),
                );
                break;
            }
            Ok(n) => {
                left -= n as u64;
                if let Some(t) = &tx {
                    if t.send(Ok(buf[..n].to_vec())).is_err() {
                        // The synthesis stopped reading (it failed, or the
                        // overlay ended): the rest is drained.
                        tx = None;
                    }
                }
            }
        }
        while let Ok(ev) = erx.try_recv() {
            if !relay(r.get_mut(), ev, &mut head_sent) {
                finished = true;
            }
        }
    }
    let received = len - left;
    let received_ms = t0.elapsed().as_millis() as u64;
    drop(tx);
    if left == 0 && !finished && from.is_none() {
        // The `received` line comes right after `accepted` (the first
        // line, which sends the head; waited for if it is not there yet),
        // before whatever followed it.
        let mut pending = Vec::new();
        if !head_sent {
            match erx.recv() {
                Ok(ev) => pending.push(ev),
                Err(_) => finished = true,
            }
        }
        while let Ok(ev) = erx.try_recv() {
            pending.push(ev);
        }
        let received = Progress::Received {
            bytes: received,
            ms: received_ms,
        };
        let mut said = false;
        for ev in pending {
            let accepted = matches!(ev, Progress::Accepted { .. });
            if head_sent && !accepted && !said && !finished {
                said = true;
                finished = !relay(r.get_mut(), received.clone(), &mut head_sent);
            }
            if !finished && !relay(r.get_mut(), ev, &mut head_sent) {
                finished = true;
            }
        }
        if head_sent && !said && !finished {
            relay(r.get_mut(), received, &mut head_sent);
        }
    }
    while !finished {
        match erx.recv_timeout(Duration::from_secs(1)) {
            Ok(ev) => {
                if !relay(r.get_mut(), ev, &mut head_sent) {
                    finished = true;
                }
            }
            Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => break,
        }
    }
    Ok(())
}

/// Reads and drops up to `len` body bytes.
fn drain(r: &mut BufReader<Tls>, len: u64) {
    let _ = std::io::copy(&mut r.take(len), &mut std::io::sink());
}
