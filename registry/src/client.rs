//! The HTTP side: one repository of one registry (OCI distribution spec:
//! `/v2/` ping, bearer-token auth, blob HEAD/GET with `Range`, monolithic
//! and chunked uploads, cross-repository mounts, manifest GET/PUT). Every
//! body it buffers is capped; blob bodies stream.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use ureq::http::{Response, StatusCode};
use ureq::{Agent, Body};

use crate::auth::{self, Challenge, Credentials};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::manifest::{MANIFEST_MEDIA_TYPE, MAX_MANIFEST_LEN};
use crate::reference::{is_loopback_host, Reference};

/// The largest token answer read.
pub const MAX_TOKEN_LEN: u64 = 64 << 10;
/// The most of an error answer read (for its message).
pub const MAX_ERROR_LEN: u64 = 16 << 10;
/// Redirects followed for a blob download.
const MAX_REDIRECTS: usize = 5;
/// Tries of one upload chunk (the first and the resumptions).
const CHUNK_TRIES: usize = 3;

/// How to reach the registry.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// Allow plain HTTP to hosts not on loopback.
    pub insecure_http: bool,
    /// The docker-style auth file (None: the default place).
    pub auth_file: Option<PathBuf>,
    /// Uploads larger than this go in chunks of this size (PATCH); smaller
    /// ones in one PUT.
    pub chunk_size: u64,
    /// Give up on a connection that sends or receives nothing this long.
    pub io_timeout: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure_http: false,
            auth_file: None,
            chunk_size: 16 << 20,
            io_timeout: Duration::from_secs(60),
        }
    }
}

/// A blob body being received.
pub struct BlobStream {
    /// The bytes from `start` on.
    pub reader: Box<dyn Read + Send>,
    /// Where the body starts in the blob (the asked offset if the registry
    /// honoured the range, else 0).
    pub start: u64,
}

/// A client for one repository.
pub struct Client {
    agent: Agent,
    /// `http(s)://registry`.
    base: String,
    reference: Reference,
    insecure_http: bool,
    chunk_size: u64,
    creds: Option<Credentials>,
    /// The `Authorization` value to send (a bearer token or Basic).
    authorization: Mutex<Option<String>>,
    /// Actions asked for in token requests (`pull` or `pull,push`).
    actions: &'static str,
}

/// Sends one request with the `Authorization` value given (if any).
type MakeRequest<'a> =
    dyn FnMut(Option<&str>) -> std::result::Result<Response<Body>, ureq::Error> + 'a;

fn status_detail(resp: &mut Response<Body>) -> String {
    let Ok(bytes) = resp
        .body_mut()
        .with_config()
        .limit(MAX_ERROR_LEN)
        .read_to_vec()
    else {
        return String::new();
    };
    // The spec's error body: {"errors":[{"code":..,"message":..}]}.
    let msg = serde_json::from_slice::<serde_json::Value>(&bytes)
        .ok()
        .and_then(|v| {
            let e = v.get("errors")?.get(0)?;
            Some(format!(
                "{} {}",
                e.get("code").and_then(|c| c.as_str()).unwrap_or(""),
                e.get("message").and_then(|c| c.as_str()).unwrap_or("")
            ))
        })
        .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
    let clean: String = msg.chars().filter(|c| !c.is_control()).take(200).collect();
    if clean.trim().is_empty() {
        String::new()
    } else {
        format!(": {}", clean.trim())
    }
}

fn header<'a>(resp: &'a Response<Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

impl Client {
    /// A client for `reference`'s repository. Loads credentials from the
    /// auth file; refuses plain HTTP to a host not on loopback unless
    /// `insecure_http`. `push` asks tokens for pushing too.
    pub fn new(reference: &Reference, opts: &ClientOptions, push: bool) -> Result<Client> {
        let scheme = if reference.is_loopback() || opts.insecure_http {
            "http"
        } else {
            "https"
        };
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_per_read(Some(opts.io_timeout))
            .timeout_per_write(Some(opts.io_timeout))
            .user_agent(concat!("kimberley/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        let creds = match opts.auth_file.clone().or_else(auth::default_auth_file) {
            Some(p) => auth::load_credentials(&p, &reference.registry)?,
            None => None,
        };
        Ok(Client {
            agent,
            base: format!("{scheme}://{}", reference.registry),
            reference: reference.clone(),
            insecure_http: opts.insecure_http,
            chunk_size: opts.chunk_size.max(1),
            creds,
            authorization: Mutex::new(None),
            actions: if push { "pull,push" } else { "pull" },
        })
    }

    /// The repository this client works on.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    fn repo_url(&self, tail: &str) -> String {
        format!("{}/v2/{}/{tail}", self.base, self.reference.repository)
    }

    /// Checks a URL the registry named (a Location, a token realm): https,
    /// or http to loopback or with `insecure_http`.
    fn check_url(&self, url: &str) -> Result<()> {
        let rest = if let Some(r) = url.strip_prefix("https://") {
            let _ = r;
            return Ok(());
        } else if let Some(r) = url.strip_prefix("http://") {
            r
        } else {
            return Err(Error::InsecureHttp(url.chars().take(100).collect()));
        };
        let hostport = rest.split(['/', '?', '#']).next().unwrap_or("");
        let hostport = hostport
            .rsplit_once('@')
            .map(|(_, h)| h)
            .unwrap_or(hostport);
        let host = if let Some(v6) = hostport.strip_prefix('[') {
            v6.split(']').next().unwrap_or("")
        } else {
            hostport.split(':').next().unwrap_or("")
        };
        if self.insecure_http || is_loopback_host(host) {
            Ok(())
        } else {
            Err(Error::InsecureHttp(host.to_string()))
        }
    }

    /// Resolves a Location header against the registry.
    fn resolve(&self, loc: &str) -> Result<String> {
        let url = if loc.starts_with("http://") || loc.starts_with("https://") {
            loc.to_string()
        } else if loc.starts_with('/') {
            format!("{}{loc}", self.base)
        } else {
            return Err(Error::Status {
                op: "following the registry's Location".into(),
                status: 0,
                detail: format!(
                    ": unusable location {:?}",
                    loc.chars().take(100).collect::<String>()
                ),
            });
        };
        self.check_url(&url)?;
        Ok(url)
    }

    /// Sends a request built by `make` (given the Authorization to use),
    /// authenticating once on a 401 challenge and sending it again.
    fn send(&self, op: &str, make: &mut MakeRequest<'_>) -> Result<Response<Body>> {
        let auth = self.authorization.lock().expect("not poisoned").clone();
        let resp = make(auth.as_deref()).map_err(|e| Error::http(op, e))?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        let challenge = header(&resp, "www-authenticate").and_then(auth::parse_challenge);
        let Some(challenge) = challenge else {
            let mut resp = resp;
            return Err(Error::Denied {
                op: op.into(),
                status: 401,
                detail: status_detail(&mut resp),
            });
        };
        let new = self.authenticate(op, &challenge)?;
        *self.authorization.lock().expect("not poisoned") = Some(new.clone());
        let mut resp = make(Some(&new)).map_err(|e| Error::http(op, e))?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            return Err(Error::Denied {
                op: op.into(),
                status: 401,
                detail: status_detail(&mut resp),
            });
        }
        Ok(resp)
    }

    /// Answers a challenge: Basic with the credentials, or a token from the
    /// Bearer realm (with the credentials, if any).
    fn authenticate(&self, op: &str, c: &Challenge) -> Result<String> {
        match c {
            Challenge::Basic => match &self.creds {
                Some(cr) => Ok(cr.basic()),
                None => Err(Error::Denied {
                    op: op.into(),
                    status: 401,
                    detail: format!(
                        ": no credentials for {} in the auth file",
                        self.reference.registry
                    ),
                }),
            },
            Challenge::Bearer {
                realm,
                service,
                scope,
            } => {
                // Credentials go only where plain HTTP is allowed to go.
                self.check_url(realm)?;
                let mut q = vec![];
                if let Some(s) = service {
                    q.push(("service", s.clone()));
                }
                q.push((
                    "scope",
                    scope.clone().unwrap_or_else(|| {
                        format!("repository:{}:{}", self.reference.repository, self.actions)
                    }),
                ));
                let mut req = self.agent.get(realm.as_str());
                for (k, v) in &q {
                    req = req.query(*k, v);
                }
                if let Some(cr) = &self.creds {
                    req = req.header("Authorization", cr.basic());
                }
                let mut resp = req
                    .call()
                    .map_err(|e| Error::http(format!("{op}: getting a token"), e))?;
                if !resp.status().is_success() {
                    return Err(Error::Denied {
                        op: format!("{op}: getting a token"),
                        status: resp.status().as_u16(),
                        detail: status_detail(&mut resp),
                    });
                }
                let bytes = read_capped(&mut resp, MAX_TOKEN_LEN, "reading a token")?;
                let t = auth::token_from(&bytes).ok_or_else(|| Error::Denied {
                    op: format!("{op}: getting a token"),
                    status: resp.status().as_u16(),
                    detail: ": the answer holds no usable token".into(),
                })?;
                Ok(format!("Bearer {t}"))
            }
        }
    }

    /// `GET /v2/`: checks that the registry answers (authenticating if
    /// it asks).
    pub fn ping(&self) -> Result<()> {
        let url = format!("{}/v2/", self.base);
        let mut resp = self.send("contacting the registry", &mut |a| {
            let mut r = self.agent.get(&url);
            if let Some(a) = a {
                r = r.header("Authorization", a);
            }
            r.call()
        })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(unexpected("contacting the registry", &mut resp))
        }
    }

    /// `HEAD` a blob: its size, or None if the registry does not have it.
    pub fn blob_size(&self, d: &Digest) -> Result<Option<u64>> {
        let url = self.repo_url(&format!("blobs/{d}"));
        let op = format!("checking blob {d}");
        let mut resp = self.send(&op, &mut |a| {
            let mut r = self.agent.head(&url);
            if let Some(a) = a {
                r = r.header("Authorization", a);
            }
            r.call()
        })?;
        match resp.status().as_u16() {
            200 => Ok(Some(
                header(&resp, "content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0),
            )),
            404 => Ok(None),
            // A redirect means the registry has it (elsewhere).
            307 | 302 | 301 | 303 | 308 => Ok(Some(
                header(&resp, "content-length")
                    .and_then(|l| l.parse().ok())
                    .unwrap_or(0),
            )),
            _ => Err(unexpected(&op, &mut resp)),
        }
    }

    /// `GET` a blob from `offset` on (`Range: bytes=OFFSET-`). Redirects
    /// are followed without credentials, within the plain-HTTP policy.
    pub fn get_blob(&self, d: &Digest, offset: u64) -> Result<BlobStream> {
        let op = format!("downloading blob {d}");
        let mut url = self.repo_url(&format!("blobs/{d}"));
        let mut first = true;
        for _ in 0..=MAX_REDIRECTS {
            let range = format!("bytes={offset}-");
            let mut resp = if first {
                self.send(&op, &mut |a| {
                    let mut r = self.agent.get(&url);
                    if let Some(a) = a {
                        r = r.header("Authorization", a);
                    }
                    if offset > 0 {
                        r = r.header("Range", &range);
                    }
                    r.call()
                })?
            } else {
                let mut r = self.agent.get(&url);
                if offset > 0 {
                    r = r.header("Range", &range);
                }
                r.call().map_err(|e| Error::http(&op, e))?
            };
            first = false;
            match resp.status().as_u16() {
                200 => {
                    return Ok(BlobStream {
                        reader: Box::new(resp.into_body().into_reader()),
                        start: 0,
                    })
                }
                206 => {
                    // `Content-Range: bytes START-END/TOTAL` must start where asked.
                    let start = header(&resp, "content-range")
                        .and_then(|c| c.strip_prefix("bytes "))
                        .and_then(|c| c.split('-').next())
                        .and_then(|s| s.parse::<u64>().ok());
                    if start != Some(offset) {
                        return Err(Error::Status {
                            op,
                            status: 206,
                            detail: ": the partial answer does not start where asked".into(),
                        });
                    }
                    return Ok(BlobStream {
                        reader: Box::new(resp.into_body().into_reader()),
                        start: offset,
                    });
                }
                416 if offset > 0 => {
                    // Nothing after `offset`: the caller has it all (or more).
                    return Ok(BlobStream {
                        reader: Box::new(std::io::empty()),
                        start: offset,
                    });
                }
                301 | 302 | 303 | 307 | 308 => {
                    let loc = header(&resp, "location").unwrap_or("").to_string();
                    url = self.resolve(&loc)?;
                }
                404 => {
                    return Err(Error::NotFound {
                        op,
                        detail: status_detail(&mut resp),
                    })
                }
                _ => return Err(unexpected(&op, &mut resp)),
            }
        }
        Err(Error::Status {
            op,
            status: 0,
            detail: format!(": more than {MAX_REDIRECTS} redirects"),
        })
    }

    /// Asks the registry to mount blob `d` from repository `from` of the
    /// same registry: true if it did, false if it started an upload
    /// instead (abandoned).
    pub fn mount_blob(&self, d: &Digest, from: &str) -> Result<bool> {
        let op = format!("mounting blob {d} from {from}");
        let url = self.repo_url("blobs/uploads/");
        let ds = d.to_string();
        let mut resp = self.send(&op, &mut |a| {
            let mut r = self
                .agent
                .post(&url)
                .query("mount", &ds)
                .query("from", from);
            if let Some(a) = a {
                r = r.header("Authorization", a);
            }
            r.send_empty()
        })?;
        match resp.status().as_u16() {
            201 => Ok(true),
            202 => Ok(false),
            _ => Err(unexpected(&op, &mut resp)),
        }
    }

    /// Starts an upload session: its Location.
    fn start_upload(&self, op: &str) -> Result<String> {
        let url = self.repo_url("blobs/uploads/");
        let mut resp = self.send(op, &mut |a| {
            let mut r = self.agent.post(&url);
            if let Some(a) = a {
                r = r.header("Authorization", a);
            }
            r.send_empty()
        })?;
        if resp.status().as_u16() != 202 {
            return Err(unexpected(op, &mut resp));
        }
        let loc = header(&resp, "location").unwrap_or("").to_string();
        self.resolve(&loc)
    }

    /// Uploads `size` bytes of `file` as blob `d`: in one PUT up to the
    /// chunk size, else in PATCH chunks, each resumed from the registry's
    /// `Range` if a transfer is cut. `progress` gets the bytes sent so far.
    pub fn upload_blob(
        &self,
        d: &Digest,
        file: &dyn BlobSource,
        size: u64,
        progress: &dyn Fn(u64),
    ) -> Result<()> {
        let op = format!("uploading blob {d}");
        let mut loc = self.start_upload(&op)?;
        let ds = d.to_string();
        if size <= self.chunk_size {
            let body = read_range(file, 0, size, &op)?;
            let mut resp = self.send(&op, &mut |a| {
                let mut r = self
                    .agent
                    .put(&loc)
                    .query("digest", &ds)
                    .header("Content-Type", "application/octet-stream");
                if let Some(a) = a {
                    r = r.header("Authorization", a);
                }
                r.send(&body[..])
            })?;
            if resp.status().as_u16() != 201 {
                return Err(unexpected(&op, &mut resp));
            }
            progress(size);
            return Ok(());
        }
        let mut sent = 0u64;
        let mut tries = 0;
        while sent < size {
            let n = self.chunk_size.min(size - sent);
            let body = read_range(file, sent, n, &op)?;
            let crange = format!("{}-{}", sent, sent + n - 1);
            let attempt = self.send(&op, &mut |a| {
                let mut r = self
                    .agent
                    .patch(&loc)
                    .header("Content-Type", "application/octet-stream")
                    .header("Content-Range", &crange);
                if let Some(a) = a {
                    r = r.header("Authorization", a);
                }
                r.send(&body[..])
            });
            match attempt {
                Ok(resp) if resp.status().as_u16() == 202 => {
                    let l = header(&resp, "location").unwrap_or("").to_string();
                    loc = self.resolve(&l)?;
                    sent += n;
                    tries = 0;
                    progress(sent);
                }
                // After a cut, a registry that kept part of the cut chunk
                // (docker-registry 2.8) may refuse the session it reported
                // as resumable: start a new one from the beginning.
                Ok(mut resp) if resp.status().as_u16() == 404 && tries > 0 => {
                    tries += 1;
                    if tries >= CHUNK_TRIES {
                        return Err(unexpected(&op, &mut resp));
                    }
                    loc = self.start_upload(&op)?;
                    sent = 0;
                }
                Ok(mut resp) if resp.status().as_u16() != 416 => {
                    return Err(unexpected(&op, &mut resp))
                }
                other => {
                    // Cut (or out of step): ask where the upload stands.
                    tries += 1;
                    if tries >= CHUNK_TRIES {
                        return match other {
                            Err(e) => Err(e),
                            Ok(mut resp) => Err(unexpected(&op, &mut resp)),
                        };
                    }
                    // A registry that kept part of the cut chunk may refuse
                    // the session (its state no longer matches): start a
                    // new one from the beginning.
                    match self.upload_status(&op, &loc) {
                        Ok((l, have)) if have <= size => {
                            loc = l;
                            sent = have;
                        }
                        Ok(_) | Err(Error::NotFound { .. }) | Err(Error::Status { .. }) => {
                            loc = self.start_upload(&op)?;
                            sent = 0;
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        let mut resp = self.send(&op, &mut |a| {
            let mut r = self.agent.put(&loc).query("digest", &ds);
            if let Some(a) = a {
                r = r.header("Authorization", a);
            }
            r.send_empty()
        })?;
        if resp.status().as_u16() != 201 {
            return Err(unexpected(&op, &mut resp));
        }
        Ok(())
    }

    /// `GET` an upload session: its Location and how many bytes it holds.
    fn upload_status(&self, op: &str, loc: &str) -> Result<(String, u64)> {
        let mut resp = self.send(op, &mut |a| {
            let mut r = self.agent.get(loc);
            if let Some(a) = a {
                r = r.header("Authorization", a);
            }
            r.call()
        })?;
        if resp.status().as_u16() != 204 {
            return Err(unexpected(op, &mut resp));
        }
        // `Range: 0-END` (inclusive); none or `0-0`... with no bytes: 0.
        let have = header(&resp, "range")
            .and_then(|r| r.rsplit_once('-'))
            .and_then(|(_, e)| e.parse::<u64>().ok())
            .map(|e| e + 1)
            .unwrap_or(0);
        let l = header(&resp, "location").map(str::to_string);
        let loc = match l {
            Some(l) => self.resolve(&l)?,
            None => loc.to_string(),
        };
        Ok((loc, have))
    }

    /// `GET` the manifest `reference` names (tag or digest): its digest and
    /// bytes (at most [`MAX_MANIFEST_LEN`]). A manifest asked by digest must
    /// hash to it.
    pub fn get_manifest(&self, reference: &Reference) -> Result<(Digest, Vec<u8>)> {
        let op = format!("getting manifest {reference}");
        let url = self.repo_url(&format!("manifests/{}", reference.manifest_ref()));
        let mut resp = self.send(&op, &mut |a| {
            let mut r = self.agent.get(&url).header("Accept", MANIFEST_MEDIA_TYPE);
            if let Some(a) = a {
                r = r.header("Authorization", a);
            }
            r.call()
        })?;
        match resp.status().as_u16() {
            200 => {}
            404 => {
                return Err(Error::NotFound {
                    op,
                    detail: status_detail(&mut resp),
                })
            }
            _ => return Err(unexpected(&op, &mut resp)),
        }
        let bytes = read_capped(&mut resp, MAX_MANIFEST_LEN as u64, &op)?;
        let d = Digest::of(&bytes);
        if let Some(want) = &reference.digest {
            if *want != d {
                return Err(Error::DigestMismatch {
                    what: format!("manifest {reference}"),
                    digest: want.to_string(),
                    why: format!("it hashes to {d}"),
                });
            }
        }
        Ok((d, bytes))
    }

    /// `PUT` a manifest under `tag` (or its digest when None): its digest.
    pub fn put_manifest(&self, tag: Option<&str>, bytes: &[u8]) -> Result<Digest> {
        let d = Digest::of(bytes);
        let name = tag.map(str::to_string).unwrap_or_else(|| d.to_string());
        let op = format!("writing manifest {}:{name}", self.reference.repository);
        let url = self.repo_url(&format!("manifests/{name}"));
        let mut resp = self.send(&op, &mut |a| {
            let mut r = self
                .agent
                .put(&url)
                .header("Content-Type", MANIFEST_MEDIA_TYPE);
            if let Some(a) = a {
                r = r.header("Authorization", a);
            }
            r.send(bytes)
        })?;
        if resp.status().as_u16() != 201 {
            return Err(unexpected(&op, &mut resp));
        }
        Ok(d)
    }
}

fn unexpected(op: &str, resp: &mut Response<Body>) -> Error {
    let status = resp.status().as_u16();
    let detail = status_detail(resp);
    match status {
        401 | 403 => Error::Denied {
            op: op.into(),
            status,
            detail,
        },
        404 => Error::NotFound {
            op: op.into(),
            detail,
        },
        _ => Error::Status {
            op: op.into(),
            status,
            detail,
        },
    }
}

/// Reads a body of at most `limit` bytes.
fn read_capped(resp: &mut Response<Body>, limit: u64, op: &str) -> Result<Vec<u8>> {
    match resp.body_mut().with_config().limit(limit).read_to_vec() {
        Ok(v) => Ok(v),
        Err(ureq::Error::BodyExceedsLimit(_)) => Err(Error::TooLarge {
            op: op.into(),
            limit,
        }),
        Err(e) => Err(Error::http(op, e)),
    }
}

/// What an upload reads from: a file, or bytes in memory.
pub trait BlobSource {
    /// Fills `buf` from `offset`.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
}

impl BlobSource for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl BlobSource for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match self.get(start..).and_then(|s| s.get(..buf.len())) {
            Some(s) => {
                buf.copy_from_slice(s);
                Ok(())
            }
            None => Err(std::io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

fn read_range(file: &dyn BlobSource, offset: u64, n: u64, op: &str) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; n as usize];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| Error::io(format!("{op}: reading the file"), e))?;
    Ok(buf)
}
