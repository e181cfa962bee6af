//! Synthesis sessions: the bases a daemon holds, its limits, and each
//! session's life (overlay received and applied into the state directory,
//! launch VM resumed behind a private control socket, suspended or
//! discarded when it ends).

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kimberley_formats::apply::early::Early;
use kimberley_formats::apply::{self, ApplyOptions, Input, Opened};
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::digest::{hex, Digest};
use kimberley_formats::fsutil;
use kimberley_formats::progress::Progress as ApplyProgress;
use kimberley_formats::vmdir::{total_size, VmDir};
use kimberley_machine::{control, ControlSocket, PortForward, RestoreOptions};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::api::{BaseInfo, Forward, Info, Limits, Progress, Reason, SessionInfo, State};
use crate::log;

/// A refusal or failure: the reason and its sentence.
pub type Refusal = (Reason, String);

/// How long a new guest has to answer its agent after the resume.
const FIRST_ANSWER: Duration = Duration::from_secs(60);
/// How long a stop (suspend, or discard) may take before the request
/// answers anyway.
const STOP_WAIT: Duration = Duration::from_secs(300);
/// The launch VM in a session directory.
const VM: &str = "vm";
/// The control socket in a session directory.
const SOCK: &str = "control.sock";
/// What a session directory records (for a restart).
const RECORD: &str = "session.json";

/// What went wrong opening the daemon's state.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The state directory could not be created or made private.
    #[error("preparing the state directory {0}: {1}")]
    StateDir(PathBuf, #[source] io::Error),
    /// A base VM directory could not be opened.
    #[error("opening base VM {0}: {1}")]
    Base(PathBuf, #[source] kimberley_formats::Error),
    /// Two bases with one identity.
    #[error("base VMs {0} and {1} are the same VM (one identity)")]
    DuplicateBase(PathBuf, PathBuf),
}

/// A base VM the daemon holds.
#[derive(Debug)]
pub struct Base {
    /// The opened VM directory.
    pub dir: VmDir,
    /// Its identity.
    pub identity: Digest,
}

/// One session.
#[derive(Debug)]
pub struct Session {
    /// 16 hex digits.
    pub id: String,
    /// The SHA-256 fingerprint of the client certificate that made it:
    /// only that client may see or control it.
    pub owner: String,
    /// Its directory in the state directory.
    pub dir: PathBuf,
    /// Base identity (hex).
    pub base: String,
    /// Guest memory, bytes.
    pub memory: u64,
    /// Launch VM size, bytes.
    pub disk: u64,
    /// The guest ports it asked for.
    pub ports: Vec<u16>,
    /// Their forwards: those of the running VM, or (not running) the last
    /// ones it had, which a resume asks for again.
    forwards: Mutex<Vec<Forward>>,
    state: Mutex<State>,
    changed: Condvar,
    /// Set to end the control server (the VM then suspends or is discarded).
    stop: Arc<AtomicBool>,
    /// What to do when the VM stops: discard rather than suspend.
    discard: AtomicBool,
}

/// What a session directory's `session.json` says.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    id: String,
    owner: String,
    base: String,
    memory: u64,
    disk: u64,
    /// The guest ports asked for.
    #[serde(default)]
    ports: Vec<u16>,
    /// Their last forwards (taken again at a resume where still free).
    #[serde(default)]
    forwards: Vec<Forward>,
    /// True once the VM was suspended cleanly into `vm/`.
    suspended: bool,
}

impl Session {
    /// What the API shows of it.
    pub fn info(&self) -> SessionInfo {
        let state = self.state();
        SessionInfo {
            id: self.id.clone(),
            state,
            base: self.base.clone(),
            memory: self.memory,
            disk: self.disk,
            ports: self.ports.clone(),
            forwards: if state == State::Running {
                self.forwards()
            } else {
                Vec::new()
            },
        }
    }

    /// Its forwards (see the field).
    fn forwards(&self) -> Vec<Forward> {
        self.forwards
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Its current state.
    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, s: State) {
        *self.state.lock().unwrap_or_else(|e| e.into_inner()) = s;
        self.changed.notify_all();
    }

    /// Waits until the state is not `s` (at most `within`).
    fn wait_leave(&self, s: State, within: Duration) -> State {
        let g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (g, _) = self
            .changed
            .wait_timeout_while(g, within, |st| *st == s)
            .unwrap_or_else(|e| e.into_inner());
        *g
    }

    fn record(&self, suspended: bool) -> io::Result<()> {
        let r = Record {
            id: self.id.clone(),
            owner: self.owner.clone(),
            base: self.base.clone(),
            memory: self.memory,
            disk: self.disk,
            ports: self.ports.clone(),
            forwards: self.forwards(),
            suspended,
        };
        let f =
            fsutil::AtomicFile::create(&self.dir.join(RECORD), true).map_err(io::Error::other)?;
        serde_json::to_writer(f.file(), &r)?;
        f.commit().map_err(io::Error::other)
    }

    fn sock(&self) -> PathBuf {
        self.dir.join(SOCK)
    }
}

/// Where chains named by reference come from.
#[derive(Debug, Clone)]
pub struct References {
    /// The registries (`HOST[:PORT]`) devices may name.
    pub allowed: Vec<String>,
    /// The cloudlet cache.
    pub cache: kimberley_cli::oci::CacheArgs,
    /// How to reach registries.
    pub registry: kimberley_cli::oci::RegistryArgs,
}

/// The daemon's bases, limits and sessions.
#[derive(Debug)]
pub struct Manager {
    references: References,
    state_dir: PathBuf,
    bases: Vec<Base>,
    limits: Limits,
    threads: usize,
    table: Mutex<Table>,
    name: String,
    /// The host address forwarded ports listen on (none: no IPv4 address
    /// to forward from, ports are refused).
    forward_addr: Option<IpAddr>,
}

#[derive(Debug, Default)]
struct Table {
    sessions: HashMap<String, Arc<Session>>,
    /// Uploads accepted whose header is not read yet (they count as
    /// sessions for `max_sessions`).
    reserved: usize,
}

impl Table {
    fn active(&self) -> impl Iterator<Item = &Arc<Session>> {
        self.sessions
            .values()
            .filter(|s| s.state() != State::Suspended)
    }
}

/// A place among `max_sessions`, taken before an upload is read; given
/// back on drop unless it became a session.
#[derive(Debug)]
pub struct Reservation {
    mgr: Arc<Manager>,
    held: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.held {
            self.mgr.table().reserved -= 1;
        }
    }
}

fn sessions_dir(state: &Path) -> PathBuf {
    state.join("sessions")
}

/// Makes `p` a private directory (created 0700, or an existing one made
/// 0700).
fn private_dir(p: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match fsutil::create_private_dir(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            let m = std::fs::symlink_metadata(p)?;
            if !m.is_dir() {
                return Err(io::Error::other("not a directory"));
            }
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(fsutil::PRIVATE_DIR_MODE))
        }
        Err(e) => Err(e),
    }
}

impl Manager {
    /// Opens the state directory (0700; sessions a previous run suspended
    /// are listed again, anything else a previous run left is removed)
    /// and the bases (their identities computed now). Guest ports are
    /// forwarded from `forward_addr` (none: sessions asking for ports are
    /// refused).
    pub fn open(
        state_dir: &Path,
        bases: &[PathBuf],
        limits: Limits,
        threads: usize,
        name: String,
        references: References,
        forward_addr: Option<IpAddr>,
    ) -> Result<Arc<Manager>, SetupError> {
        let sd = |e| SetupError::StateDir(state_dir.to_path_buf(), e);
        private_dir(state_dir).map_err(sd)?;
        let sessions = sessions_dir(state_dir);
        private_dir(&sessions).map_err(sd)?;
        let mut held: Vec<Base> = Vec::new();
        for p in bases {
            let dir = VmDir::open(p).map_err(|e| SetupError::Base(p.clone(), e))?;
            let identity = dir.identity();
            if let Some(b) = held.iter().find(|b| b.identity == identity) {
                return Err(SetupError::DuplicateBase(b.dir.path.clone(), p.clone()));
            }
            held.push(Base { dir, identity });
        }
        let mgr = Manager {
            state_dir: state_dir.to_path_buf(),
            bases: held,
            limits,
            threads,
            table: Mutex::new(Table::default()),
            name,
            references,
            forward_addr,
        };
        for e in std::fs::read_dir(&sessions).map_err(sd)?.flatten() {
            let dir = e.path();
            match kept(&dir) {
                Some(s) => {
                    log::info(
                        "session.listed",
                        json!({"session": s.id, "state": "suspended"}),
                    );
                    mgr.table().sessions.insert(s.id.clone(), Arc::new(s));
                }
                None => {
                    log::warn(
                        "state.removed",
                        json!({"path": dir, "why": "left by an earlier run, not a suspended session"}),
                    );
                    let _ = std::fs::remove_dir_all(&dir);
                }
            }
        }
        Ok(Arc::new(mgr))
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state directory.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// The bases held.
    pub fn bases(&self) -> &[Base] {
        &self.bases
    }

    /// `GET /v1/info`.
    pub fn info(&self) -> Info {
        Info {
            api: crate::API_VERSION,
            name: self.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            bases: self
                .bases
                .iter()
                .map(|b| BaseInfo {
                    identity: hex(&b.identity),
                    name: b.dir.manifest.name.clone(),
                    memory: b.dir.manifest.memory_size(),
                })
                .collect(),
            limits: self.limits,
            active_sessions: self.table().active().count(),
        }
    }

    /// Takes a place among `max_sessions`, or says why not.
    pub fn reserve(self: &Arc<Self>) -> Result<Reservation, Refusal> {
        let mut t = self.table();
        let n = t.active().count() + t.reserved;
        if n >= self.limits.max_sessions {
            return Err((
                Reason::LimitSessions,
                format!(
                    "this cloudlet runs {n} session(s) already, its limit (--max-sessions {})",
                    self.limits.max_sessions
                ),
            ));
        }
        t.reserved += 1;
        Ok(Reservation {
            mgr: self.clone(),
            held: true,
        })
    }

    /// Turns a reservation into a session needing `memory` and `disk`,
    /// after checking them against the limits; creates its directory.
    fn admit(
        &self,
        mut res: Reservation,
        owner: &str,
        base: &Base,
        memory: u64,
        disk: u64,
        ports: Vec<u16>,
    ) -> Result<Arc<Session>, Refusal> {
        use kimberley_cli::run::human_size;
        let mut t = self.table();
        let used_mem: u64 = t.active().map(|s| s.memory).sum();
        if used_mem.saturating_add(memory) > self.limits.max_memory {
            return Err((
                Reason::LimitMemory,
                format!(
                    "the VM needs {} of memory; {} of this cloudlet's {} (--max-memory) are in use",
                    human_size(memory),
                    human_size(used_mem),
                    human_size(self.limits.max_memory)
                ),
            ));
        }
        let used_disk: u64 = t.sessions.values().map(|s| s.disk).sum();
        if used_disk.saturating_add(disk) > self.limits.max_disk {
            return Err((
                Reason::LimitDisk,
                format!(
                    "the launch VM takes {}; {} of this cloudlet's {} (--max-disk) are in use",
                    human_size(disk),
                    human_size(used_disk),
                    human_size(self.limits.max_disk)
                ),
            ));
        }
        let id = new_id().map_err(|e| (Reason::Internal, format!("no randomness: {e}")))?;
        let dir = sessions_dir(&self.state_dir).join(&id);
        fsutil::create_private_dir(&dir).map_err(|e| {
            (
                Reason::Internal,
                format!("creating the session directory {}: {e}", dir.display()),
            )
        })?;
        let s = Arc::new(Session {
            id: id.clone(),
            owner: owner.to_string(),
            dir,
            base: hex(&base.identity),
            memory,
            disk,
            ports,
            forwards: Mutex::new(Vec::new()),
            state: Mutex::new(State::Synthesising),
            changed: Condvar::new(),
            stop: Arc::new(AtomicBool::new(false)),
            discard: AtomicBool::new(false),
        });
        if let Err(e) = s.record(false) {
            let _ = std::fs::remove_dir_all(&s.dir);
            return Err((Reason::Internal, format!("recording the session: {e}")));
        }
        res.held = false;
        t.reserved -= 1;
        t.sessions.insert(id, s.clone());
        Ok(s)
    }

    /// Forgets session `s` and removes its directory.
    fn discard(&self, s: &Session) {
        let _ = std::fs::remove_dir_all(&s.dir);
        self.table().sessions.remove(&s.id);
        s.set_state(State::Suspended);
    }

    /// The layers of the chain `r` names, from the cloudlet cache (and
    /// the registry for what it lacks), if `r`'s registry is allowed.
    fn chain(&self, r: &str) -> Result<Vec<Input>, Refusal> {
        let refused = |e: String| (Reason::Reference, e);
        let parsed = kimberley_cli::oci::reference(r).map_err(|e| refused(format!("{e:#}")))?;
        if !self.references.allowed.contains(&parsed.registry) {
            return Err(refused(format!(
                "references to {} are not served here (--allow-registry)",
                parsed.registry
            )));
        }
        kimberley_cli::oci::chain_inputs(r, &self.references.cache, &self.references.registry)
            .map_err(|e| {
                if kimberley_cli::oci::tampered_in(&e) {
                    (Reason::Corrupt, format!("{e:#}"))
                } else {
                    refused(format!("{e:#}"))
                }
            })
    }

    /// Session `id` if `owner` made it.
    pub fn get(&self, id: &str, owner: &str) -> Result<Arc<Session>, Refusal> {
        let s = self.table().sessions.get(id).cloned();
        match s {
            Some(s) if s.owner == owner => Ok(s),
            Some(_) => Err((
                Reason::Forbidden,
                format!("session {id} belongs to another client certificate"),
            )),
            None => Err((Reason::NotFound, format!("no session {id}"))),
        }
    }

    /// The sessions `owner` made.
    pub fn list(&self, owner: &str) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .table()
            .sessions
            .values()
            .filter(|s| s.owner == owner)
            .map(|s| s.info())
            .collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    /// Stops every running VM and waits until each is suspended into the
    /// state directory (for a daemon that is stopping).
    pub fn suspend_all(&self) {
        let running: Vec<Arc<Session>> = self.table().sessions.values().cloned().collect();
        for s in &running {
            s.discard.store(false, Ordering::SeqCst);
            s.stop.store(true, Ordering::SeqCst);
        }
        for s in &running {
            if matches!(s.state(), State::Running | State::Resuming) {
                s.wait_leave(State::Running, STOP_WAIT);
            }
        }
    }
}

/// A session a previous run suspended in `dir`, if it is one.
fn kept(dir: &Path) -> Option<Session> {
    let r: Record = serde_json::from_slice(&std::fs::read(dir.join(RECORD)).ok()?).ok()?;
    let name = dir.file_name()?.to_str()?;
    if !r.suspended || r.id != name {
        return None;
    }
    if !r.ports.is_empty() && crate::api::check_ports(&r.ports).is_err() {
        return None;
    }
    VmDir::open(&dir.join(VM)).ok()?;
    Some(Session {
        id: r.id,
        owner: r.owner,
        dir: dir.to_path_buf(),
        base: r.base,
        memory: r.memory,
        disk: r.disk,
        ports: r.ports,
        forwards: Mutex::new(r.forwards),
        state: Mutex::new(State::Suspended),
        changed: Condvar::new(),
        stop: Arc::new(AtomicBool::new(false)),
        discard: AtomicBool::new(false),
    })
}

fn new_id() -> Result<String, getrandom::Error> {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b)?;
    Ok(hex(&b))
}

/// One piece of an upload as the connection passes it on: bytes, or the
/// news that the upload was cut.
pub type Chunk = Result<Vec<u8>, ()>;

/// The overlay as the synthesis reads it: the chunks the connection
/// thread receives; their end (the sender dropped) is the end of the
/// overlay; a cut is an error.
pub struct Upload {
    rx: Receiver<Chunk>,
    buf: Vec<u8>,
    pos: usize,
}

impl Upload {
    /// Reads from `rx`.
    pub fn new(rx: Receiver<Chunk>) -> Upload {
        Upload {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for Upload {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(b)) => {
                    self.buf = b;
                    self.pos = 0;
                }
                Ok(Err(())) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the upload was cut before its end",
                    ))
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

fn ms(t0: Instant) -> u64 {
    t0.elapsed().as_millis() as u64
}

/// The reason an apply failed for.
fn reason_of(e: &kimberley_formats::Error, cut: bool) -> Reason {
    if cut {
        return Reason::UploadCut;
    }
    match e.exit_code() {
        3 => Reason::Corrupt,
        4 => Reason::Auth,
        5 => Reason::NoBase,
        _ => Reason::Internal,
    }
}

/// Where a session's overlay comes from.
pub enum Source {
    /// Uploaded in the request body.
    Upload(Upload),
    /// A chain in the cloudlet cache (or its registry).
    Reference(String),
}

/// Everything a new session needs from its request.
pub struct NewSession {
    /// The client certificate's fingerprint.
    pub owner: String,
    /// The overlay key.
    pub key: Secret,
    /// Its place among `max_sessions`.
    pub reservation: Reservation,
    /// The overlay.
    pub source: Source,
    /// The guest ports to forward (checked with [`crate::api::check_ports`]).
    pub ports: Vec<u16>,
    /// Set by the connection when the upload was cut.
    pub cut: Arc<AtomicBool>,
    /// When the request was accepted.
    pub t0: Instant,
}

/// Runs a new session on this thread: opens the overlay, picks its base,
/// checks the limits, applies it into the state directory, resumes the VM
/// and waits for the guest's first answer (each step a [`Progress`] line
/// sent to `events`, the last one `Ready` or `Failed`), then serves the
/// VM's control socket until it is stopped. A failure before `Ready`
/// leaves nothing in the state directory.
pub fn run(mgr: Arc<Manager>, new: NewSession, events: SyncSender<Progress>) {
    let t0 = new.t0;
    let owner = new.owner.clone();
    let failed = |r: Refusal| {
        log::warn(
            "session.refused",
            json!({"client": owner, "reason": r.0, "error": r.1}),
        );
        let _ = events.send(Progress::Failed {
            error: r.1,
            reason: r.0,
            ms: ms(t0),
        });
    };
    let (session, vm, early) = match synthesise(&mgr, new, &events) {
        Ok(x) => x,
        Err(r) => return failed(r),
    };
    let sock = match ControlSocket::bind(Some(&session.sock()), "kimberlized") {
        Ok(s) => s,
        Err(e) => {
            mgr.discard(&session);
            return failed((Reason::Internal, format!("binding the control socket: {e}")));
        }
    };
    // An early start runs the VM while the overlay is still applied; if it
    // cannot start, the VM starts once the apply has committed.
    let (started, applying) = match early {
        Some(e) => {
            let r = start_early(&session, &vm, &e, t0, &events);
            match r {
                Ok(m) => (Ok(m), Some(e.applying)),
                Err(why) => {
                    log::warn(
                        "session.early_start_failed",
                        json!({"session": session.id, "error": why.1}),
                    );
                    // The apply's own failure says why (a cut upload, a
                    // forged segment); if it succeeded, the VM starts now.
                    match e.applying.join() {
                        Ok(Ok(())) => (start_vm(&mgr, &session, &vm, t0, &events), None),
                        Ok(Err(r)) => (Err(r), None),
                        Err(_) => (Err(why), None),
                    }
                }
            }
        }
        None => (start_vm(&mgr, &session, &vm, t0, &events), None),
    };
    match started {
        Ok(machine) => {
            session.set_state(State::Running);
            log::info(
                "session.ready",
                json!({"session": session.id, "client": session.owner, "ms": ms(t0)}),
            );
            let _ = events.send(Progress::Ready {
                ms: ms(t0),
                forwards: session.forwards(),
            });
            drop(events);
            serve(&mgr, &session, &vm, machine, sock, applying);
        }
        Err(r) => {
            drop(sock);
            mgr.discard(&session);
            failed(r)
        }
    }
}

/// A synthesis still running while its launch VM starts early: what the
/// VM reads from, and the apply's thread (true once it committed).
struct Arriving {
    early: Early,
    launch: kimberley_formats::vmdir::Manifest,
    applying: std::thread::JoinHandle<Result<(), Refusal>>,
}

/// Whether `chain` can start early on `base`: one version-2 overlay, a
/// backend that serves memory still arriving (the microVM), no ports.
fn early_plan(
    base: &Base,
    chain: &[Opened],
    ports: &[u16],
) -> Option<(Early, kimberley_formats::vmdir::Manifest)> {
    let [o] = chain else { return None };
    if !ports.is_empty() {
        return None;
    }
    let mut launch = o.manifest.launch_manifest();
    launch.machine = base.dir.manifest.machine.clone();
    let backend = kimberley_cli::machines::backend_of(&launch, &base.dir.path).ok()?;
    if !backend.serves_arriving() {
        return None;
    }
    let early = Early::new(&base.dir, o).ok()??;
    Some((early, launch))
}

fn synthesise(
    mgr: &Arc<Manager>,
    new: NewSession,
    events: &SyncSender<Progress>,
) -> Result<(Arc<Session>, PathBuf, Option<Arriving>), Refusal> {
    let t0 = new.t0;
    let secret = new.key;
    let inputs = match new.source {
        Source::Upload(u) => vec![Input {
            name: "the upload".into(),
            reader: Box::new(u),
        }],
        Source::Reference(r) => mgr.chain(&r)?,
    };
    let mut chain: Vec<Opened> = Vec::new();
    for input in inputs {
        chain.push(
            Opened::open(input, Some(&secret), &ReadPolicy::default())
                .map_err(|e| (reason_of(&e, new.cut.load(Ordering::SeqCst)), e.to_string()))?,
        );
    }
    let (Some(first), Some(opened)) = (chain.first(), chain.last()) else {
        return Err((Reason::Corrupt, "the chain has no overlay".into()));
    };
    let base = mgr
        .bases
        .iter()
        .find(|b| first.applies_to(&b.identity))
        .ok_or_else(|| {
            (
                Reason::NoBase,
                "the overlay was made from a base VM this cloudlet does not hold".to_string(),
            )
        })?;
    if !new.ports.is_empty() {
        forwardable(base)?;
        if mgr.forward_addr.is_none() {
            return Err((
                Reason::Ports,
                "this cloudlet forwards no ports: it listens on an IPv6 address and QEMU forwards from IPv4 ones only (kimberlized --forward-address)".into(),
            ));
        }
    }
    let launch = opened.manifest.launch_manifest();
    let (memory, disk) = (launch.memory_size(), total_size(&launch.components));
    let session = mgr.admit(new.reservation, &new.owner, base, memory, disk, new.ports)?;
    log::info(
        "session.accepted",
        json!({"session": session.id, "client": session.owner, "base": session.base, "memory": memory, "disk": disk}),
    );
    let _ = events.send(Progress::Accepted {
        session: session.id.clone(),
        base: session.base.clone(),
        memory,
        disk,
        ms: ms(t0),
    });
    let vm = session.dir.join(VM);
    let opts = ApplyOptions {
        secret: Some(secret),
        policy: ReadPolicy::default(),
        threads: mgr.threads,
        // Soft state: complete and checked, not worth an fsync.
        sync: false,
    };
    if let Some((early, launch)) = early_plan(base, &chain, &session.ports) {
        let (b, o, out, e, s, ev) = (
            base.dir.clone(),
            chain.pop().expect("one overlay"),
            vm.clone(),
            early.clone(),
            session.clone(),
            events.clone(),
        );
        let cut = new.cut.clone();
        let applying = std::thread::spawn(move || {
            let r = apply::apply_early(&b, o, &out, &opts, &ApplyProgress::default(), t0, &e);
            match r {
                Ok(stats) => {
                    log::info(
                        "session.synthesised",
                        json!({"session": s.id, "overlay_bytes": stats.overlay_bytes, "launch_bytes": stats.launch_bytes, "early_start": true, "ms": ms(t0)}),
                    );
                    // Heard only if the guest has not answered yet.
                    let _ = ev.try_send(Progress::Synthesised {
                        launch_bytes: stats.launch_bytes,
                        ms: ms(t0),
                    });
                    Ok(())
                }
                Err(err) => {
                    // A VM that ran on what had arrived is discarded.
                    let r = (reason_of(&err, cut.load(Ordering::SeqCst)), err.to_string());
                    log::warn(
                        "session.synthesis_failed",
                        json!({"session": s.id, "reason": r.0, "error": r.1}),
                    );
                    s.discard.store(true, Ordering::SeqCst);
                    s.stop.store(true, Ordering::SeqCst);
                    Err(r)
                }
            }
        });
        return Ok((
            session,
            vm,
            Some(Arriving {
                early,
                launch,
                applying,
            }),
        ));
    }
    match apply::apply_opened(&base.dir, chain, &vm, &opts, &ApplyProgress::default(), t0) {
        Ok(stats) => {
            log::info(
                "session.synthesised",
                json!({"session": session.id, "overlay_bytes": stats.overlay_bytes, "launch_bytes": stats.launch_bytes, "ms": ms(t0)}),
            );
            let _ = events.send(Progress::Synthesised {
                launch_bytes: stats.launch_bytes,
                ms: ms(t0),
            });
            Ok((session, vm, None))
        }
        Err(e) => {
            mgr.discard(&session);
            Err((reason_of(&e, new.cut.load(Ordering::SeqCst)), e.to_string()))
        }
    }
}

/// Refuses guest ports for a VM on `base` unless it is a QEMU machine with
/// a network card (the only kind whose ports the backend forwards).
fn forwardable(base: &Base) -> Result<(), Refusal> {
    let refuse = |what: &str| {
        Err((
            Reason::Ports,
            format!("guest ports cannot be forwarded into this VM: {what} (only Linux guests under QEMU with a network card, `kimberlize base --qemu --net user`, have forwarded ports)"),
        ))
    };
    match &base.dir.manifest.machine {
        None => refuse("its base is a microVM"),
        Some(m) if m.backend != "qemu" => {
            refuse(&format!("its base runs on the {} backend", m.backend))
        }
        Some(m) if !m.devices.iter().any(|d| d.starts_with("virtio-net")) => {
            refuse("its base has no network card")
        }
        Some(_) => Ok(()),
    }
}

/// Host ports on `addr` for session `s`'s guest ports: the ones it had
/// before, where they are still free, else ports the kernel picks, other
/// than those other sessions (running or suspended) hold or will ask for
/// again. Each is held by a listener until the VM takes it (dropped just
/// before the restore: the backend binds them itself).
fn assign(
    mgr: &Manager,
    addr: IpAddr,
    s: &Session,
) -> Result<(Vec<Forward>, Vec<TcpListener>), Refusal> {
    let before = s.forwards();
    let others: Vec<SocketAddr> = mgr
        .table()
        .sessions
        .values()
        .filter(|o| o.id != s.id)
        .flat_map(|o| o.forwards())
        .map(|f| f.host)
        .collect();
    let fresh = |guest: u16| -> Result<TcpListener, Refusal> {
        let mut tries = 0;
        loop {
            let l = TcpListener::bind(SocketAddr::new(addr, 0)).map_err(|e| {
                (
                    Reason::Internal,
                    format!("finding a free host port on {addr} for guest port {guest}: {e}"),
                )
            })?;
            tries += 1;
            match l.local_addr() {
                Ok(a) if others.contains(&a) && tries < 16 => continue,
                _ => return Ok(l),
            }
        }
    };
    let mut forwards = Vec::new();
    let mut held = Vec::new();
    for &guest in &s.ports {
        let old = before
            .iter()
            .find(|f| f.guest == guest && f.host.ip() == addr)
            .map(|f| f.host);
        let l = match old.filter(|a| !others.contains(a)).map(TcpListener::bind) {
            Some(Ok(l)) => l,
            _ => fresh(guest)?,
        };
        let host = l.local_addr().map_err(|e| {
            (
                Reason::Internal,
                format!("the forwarded port's address: {e}"),
            )
        })?;
        if let Some(old) = before.iter().find(|f| f.guest == guest) {
            if old.host != host {
                log::warn(
                    "session.forward_moved",
                    json!({"session": s.id, "guest": guest, "was": old.host, "now": host}),
                );
            }
        }
        forwards.push(Forward { guest, host });
        held.push(l);
    }
    Ok((forwards, held))
}

fn start_vm(
    mgr: &Manager,
    session: &Session,
    vm: &Path,
    t0: Instant,
    events: &SyncSender<Progress>,
) -> Result<Box<dyn kimberley_machine::Machine>, Refusal> {
    session.set_state(State::Resuming);
    let dir = VmDir::open(vm).map_err(|e| (Reason::Internal, e.to_string()))?;
    let (forwards, held) = match mgr.forward_addr {
        Some(addr) => assign(mgr, addr, session)?,
        None if session.ports.is_empty() => (Vec::new(), Vec::new()),
        None => {
            return Err((
                Reason::Ports,
                "this cloudlet forwards no ports (kimberlized --forward-address)".into(),
            ))
        }
    };
    let opts = RestoreOptions {
        forwards: forwards
            .iter()
            .map(|f| PortForward {
                host_addr: f.host.ip(),
                host_port: f.host.port(),
                guest_port: f.guest,
            })
            .collect(),
        ..RestoreOptions::in_place()
    };
    *session.forwards.lock().unwrap_or_else(|e| e.into_inner()) = forwards.clone();
    drop(held);
    let machine = kimberley_cli::machines::restore(&dir, opts)
        .map_err(|e| (Reason::Vm, format!("resuming the launch VM: {e:#}")))?;
    if !forwards.is_empty() {
        log::info(
            "session.forwards",
            json!({"session": session.id, "forwards": forwards}),
        );
    }
    first_answer(session, machine, t0, events, forwards)
}

/// A resumed session's VM: made to stop with the session, `resumed`
/// said, and its first answer waited for.
fn first_answer(
    session: &Session,
    mut machine: Box<dyn kimberley_machine::Machine>,
    t0: Instant,
    events: &SyncSender<Progress>,
    forwards: Vec<Forward>,
) -> Result<Box<dyn kimberley_machine::Machine>, Refusal> {
    machine.set_interrupt(session.stop.clone());
    let _ = events.send(Progress::Resumed {
        ms: ms(t0),
        forwards,
    });
    machine
        .agent()
        .ping(FIRST_ANSWER)
        .map_err(|e| (Reason::Vm, format!("the guest did not answer: {e}")))?;
    Ok(machine)
}

/// Starts the launch VM of `a` while its overlay is still being applied
/// into `vm` (the microVM: memory from what arrived, disks as the merge
/// writes them); returns once the guest answered.
fn start_early(
    session: &Session,
    vm: &Path,
    a: &Arriving,
    t0: Instant,
    events: &SyncSender<Progress>,
) -> Result<Box<dyn kimberley_machine::Machine>, Refusal> {
    session.set_state(State::Resuming);
    a.early
        .wait_working_set()
        .map_err(|e| (Reason::Corrupt, format!("the overlay failed: {e}")))?;
    let backend = kimberley_cli::machines::backend_of(&a.launch, vm)
        .map_err(|e| (Reason::Internal, format!("{e:#}")))?;
    let machine = backend
        .restore_arriving(&a.early, &a.launch, vm)
        .map_err(|e| (Reason::Vm, format!("starting the launch VM early: {e}")))?;
    first_answer(session, machine, t0, events, Vec::new())
}

/// Serves the control socket until a stop, then suspends the VM into the
/// session directory or discards the session. `applying`: the synthesis
/// of a VM that started early, waited for before anything is kept (if it
/// fails, it stops the serving and the session is discarded).
fn serve(
    mgr: &Manager,
    session: &Arc<Session>,
    vm: &Path,
    machine: Box<dyn kimberley_machine::Machine>,
    sock: ControlSocket,
    applying: Option<std::thread::JoinHandle<Result<(), Refusal>>>,
) {
    let id = session.id.clone();
    let hooks = control::Hooks {
        snapshot: Box::new(|_, _| Err("snapshots are not offered by kimberlized".into())),
        migrate: None,
    };
    let console = Box::new(move |line: &str| {
        log::info("guest.console", json!({"session": id, "line": line}));
    });
    let served = control::serve_with(machine, sock, hooks, session.stop.clone(), console);
    if let Some(a) = applying {
        if !matches!(a.join(), Ok(Ok(()))) {
            session.discard.store(true, Ordering::SeqCst);
        }
    }
    let discard = session.discard.load(Ordering::SeqCst);
    let outcome = served.map_err(|e| e.to_string()).and_then(|(mut m, _)| {
        if discard {
            return Ok(false);
        }
        let dir = VmDir::open(vm).map_err(|e| e.to_string())?;
        m.suspend_in_place(&dir).map_err(|e| e.to_string())?;
        session.record(true).map_err(|e| e.to_string())?;
        Ok(true)
    });
    match outcome {
        Ok(true) => {
            log::info("session.suspended", json!({"session": session.id}));
            session.set_state(State::Suspended);
        }
        Ok(false) => {
            log::info("session.discarded", json!({"session": session.id}));
            mgr.discard(session);
        }
        Err(e) => {
            log::warn(
                "session.discarded",
                json!({"session": session.id, "error": e}),
            );
            mgr.discard(session);
        }
    }
}

/// Forwards one control request (`{"cmd":...}`) to session `s`'s VM and
/// returns its answer.
pub fn control(s: &Session, req: &Value, timeout: Duration) -> Result<Value, Refusal> {
    if s.state() != State::Running {
        return Err((
            Reason::State,
            format!("session {} is not running (it is {:?})", s.id, s.state()),
        ));
    }
    let vm_err = |e: io::Error| (Reason::Vm, format!("the VM's control socket: {e}"));
    let mut c = UnixStream::connect(s.sock()).map_err(vm_err)?;
    c.set_read_timeout(Some(timeout)).map_err(vm_err)?;
    let mut line = req.to_string();
    line.push('\n');
    c.write_all(line.as_bytes()).map_err(vm_err)?;
    let mut answer = String::new();
    BufReader::new(c).read_line(&mut answer).map_err(vm_err)?;
    serde_json::from_str(&answer).map_err(|e| (Reason::Vm, format!("bad control answer: {e}")))
}

/// Resumes the VM of the suspended session `s` (kept by `stop`, or by a
/// daemon that stopped) if the limits allow one more running VM; returns
/// once the guest answered. A VM that fails to come back is discarded
/// with its session (it may have run: its directory is no longer the
/// suspended VM).
pub fn revive(mgr: &Arc<Manager>, s: &Arc<Session>) -> Result<(), Refusal> {
    {
        let t = mgr.table();
        if s.state() != State::Suspended {
            return Err((Reason::State, format!("session {} is not suspended", s.id)));
        }
        let n = t.active().count() + t.reserved;
        if n >= mgr.limits.max_sessions {
            return Err((
                Reason::LimitSessions,
                format!(
                    "this cloudlet runs {n} session(s) already, its limit (--max-sessions {})",
                    mgr.limits.max_sessions
                ),
            ));
        }
        let used: u64 = t.active().map(|s| s.memory).sum();
        if used.saturating_add(s.memory) > mgr.limits.max_memory {
            return Err((
                Reason::LimitMemory,
                format!(
                    "the VM needs {} of memory; {} of this cloudlet's {} (--max-memory) are in use",
                    kimberley_cli::run::human_size(s.memory),
                    kimberley_cli::run::human_size(used),
                    kimberley_cli::run::human_size(mgr.limits.max_memory)
                ),
            ));
        }
        // Under the table's lock: counted as active from here.
        s.set_state(State::Resuming);
    }
    s.stop.store(false, Ordering::SeqCst);
    s.discard.store(false, Ordering::SeqCst);
    let fail = |r: Refusal| {
        mgr.discard(s);
        log::warn("session.discarded", json!({"session": s.id, "error": r.1}));
        Err(r)
    };
    if let Err(e) = s.record(false) {
        return fail((Reason::Internal, format!("recording the session: {e}")));
    }
    let sock = match ControlSocket::bind(Some(&s.sock()), "kimberlized") {
        Ok(sock) => sock,
        Err(e) => return fail((Reason::Internal, format!("binding the control socket: {e}"))),
    };
    let vm = s.dir.join(VM);
    // The VM starts and runs on a thread of its own, which serves it until
    // it stops: a QEMU guest dies with the thread that started it
    // (PR_SET_PDEATHSIG), and this request's thread ends with its answer.
    let (done, started) = std::sync::mpsc::sync_channel::<Result<(), Refusal>>(1);
    let (m, session) = (mgr.clone(), s.clone());
    let spawned = std::thread::Builder::new()
        .name(format!("session-{}", s.id))
        .spawn(move || {
            // Nobody reads these: the request's answer says how it went.
            let (events, _ignored) = std::sync::mpsc::sync_channel(8);
            let t0 = Instant::now();
            match start_vm(&m, &session, &vm, t0, &events) {
                Ok(machine) => {
                    session.set_state(State::Running);
                    log::info(
                        "session.ready",
                        json!({"session": session.id, "client": session.owner, "ms": ms(t0), "revived": true}),
                    );
                    let _ = done.send(Ok(()));
                    serve(&m, &session, &vm, machine, sock, None);
                }
                Err(r) => {
                    drop(sock);
                    let _ = done.send(Err(r));
                }
            }
        });
    if let Err(e) = spawned {
        return fail((
            Reason::Internal,
            format!("starting the session's thread: {e}"),
        ));
    }
    match started.recv() {
        Ok(Ok(())) => Ok(()),
        Ok(Err(r)) => fail(r),
        Err(_) => fail((
            Reason::Internal,
            "the session's thread ended before its VM answered".into(),
        )),
    }
}

/// Stops session `s`'s VM: suspended into the state directory (`keep`)
/// or discarded with its directory. Returns once done.
pub fn stop(mgr: &Manager, s: &Arc<Session>, keep: bool) -> Result<(), Refusal> {
    match s.state() {
        State::Suspended if keep => Ok(()),
        State::Suspended => {
            mgr.discard(s);
            log::info("session.discarded", json!({"session": s.id}));
            Ok(())
        }
        State::Synthesising | State::Resuming => {
            Err((Reason::State, format!("session {} is still starting", s.id)))
        }
        State::Running => {
            s.discard.store(!keep, Ordering::SeqCst);
            s.stop.store(true, Ordering::SeqCst);
            if s.wait_leave(State::Running, STOP_WAIT) == State::Running {
                return Err((Reason::Vm, format!("session {} did not stop in time", s.id)));
            }
            Ok(())
        }
    }
}
