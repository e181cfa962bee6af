//! The receiving side: one incoming migration into a new VM directory,
//! then the guest runs here.

use std::fs::File;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kimberley_formats::vmdir::dir::digest_file;
use kimberley_formats::vmdir::{Component, Kind, Manifest, VmDir, VmDirWriter};
use kimberley_vmm::Vm;
use rayon::prelude::*;

use crate::chunks::{self, CHUNK};
use crate::wire::{self, msg, Cursor, Rx, Tx};

/// A migrated VM, running, and its committed directory.
pub struct Received {
    /// The running guest.
    pub vm: Vm,
    /// Its directory.
    pub dir: VmDir,
    /// Receiver-side timings.
    pub stats: serde_json::Value,
}

/// Waits on `listener` for a sender holding `key` (connections that fail
/// the handshake are logged and refused; the receiver keeps waiting), then
/// receives one VM into `out`.
pub fn receive(
    listener: &TcpListener,
    key: &[u8; 32],
    out: &Path,
    quiet: bool,
) -> Result<Received> {
    loop {
        let (stream, peer) = listener.accept().context("accepting a connection")?;
        stream.set_read_timeout(Some(Duration::from_secs(60))).ok();
        stream.set_write_timeout(Some(Duration::from_secs(30))).ok();
        match wire::handshake_receiver(stream, key) {
            Ok((tx, rx)) => {
                if !quiet {
                    eprintln!("vmigrate: migration from {peer}");
                }
                return session(tx, rx, out);
            }
            Err(e) => eprintln!("vmigrate: refused {peer}: {e:#}"),
        }
    }
}

fn session(mut tx: Tx, mut rx: Rx, out: &Path) -> Result<Received> {
    match receive_vm(&mut rx, &mut tx, out) {
        Ok(mut pending) => {
            let t_restore = pending.t_commit;
            let r = start_guest(&mut pending, &mut tx, &mut rx, t_restore);
            match r {
                Ok(()) => finish(pending),
                Err(e) => Err(e.context("the migration failed; what was received is discarded")),
            }
        }
        Err(e) => {
            let _ = tx.send(msg::ERROR, format!("{e:#}").into_bytes());
            Err(e.context("the migration failed; what was received is discarded"))
        }
    }
}

struct Target {
    file: File,
    chunks: u64,
}

struct Pending {
    w: VmDirWriter,
    name: String,
    vcpus: u32,
    memory_size: u64,
    disks: Vec<(PathBuf, u64, bool)>,
    state: Vec<u8>,
    t_commit: Instant,
    t_first: Instant,
    rounds: u32,
    bytes: u64,
    vm: Option<Vm>,
}

fn punch(f: &File, off: u64) -> std::io::Result<()> {
    // SAFETY: fallocate on a file descriptor we own.
    let rc = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off as i64,
            CHUNK as i64,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        f.write_all_at(&[0u8; CHUNK], off)
    }
}

fn apply(targets: &[Target], bodies: &mut Vec<Vec<u8>>) -> Result<()> {
    let r: Result<()> = bodies.par_drain(..).try_for_each(|b| {
        let d = chunks::decode(&b)?;
        let t = targets
            .get(d.target as usize)
            .filter(|t| t.chunks > 0 || d.entries.is_empty())
            .ok_or_else(|| anyhow!("protocol error: CHUNKS for unknown target {}", d.target))?;
        for (idx, data) in &d.entries {
            if *idx >= t.chunks {
                bail!(
                    "protocol error: chunk {idx} beyond the end of target {}",
                    d.target
                );
            }
            let off = idx * CHUNK as u64;
            match data {
                Some(r) => t.file.write_all_at(&d.plain[r.clone()], off),
                None => punch(&t.file, off),
            }
            .context("writing received data")?;
        }
        Ok(())
    });
    r
}

fn receive_vm(rx: &mut Rx, tx: &mut Tx, out: &Path) -> Result<Pending> {
    let (t, body) = rx.recv()?;
    if t != msg::START {
        bail!("protocol error: {} before START", msg::name(t));
    }
    let mut c = Cursor::new(&body, "START");
    let memory_size = c.u64()?;
    let vcpus = c.u32()?;
    let ndisks = c.u32()? as usize;
    let shared = c.take(4)?[0] != 0;
    if memory_size % CHUNK as u64 != 0 || memory_size == 0 || memory_size > (1 << 40) || ndisks > 8
    {
        bail!("protocol error: START describes an impossible VM");
    }
    let mut w = VmDirWriter::create(out)?;
    w.set_sync(true);
    let mem = w.create_file("memory.raw")?;
    mem.set_len(memory_size).context("sizing memory.raw")?;
    let mut targets = vec![Target {
        file: mem,
        chunks: memory_size / CHUNK as u64,
    }];
    let mut disks = Vec::new();
    for i in 0..ndisks {
        let size = c.u64()?;
        let plen = c.u32()? as usize;
        let path = String::from_utf8(c.take(plen)?.to_vec())
            .map_err(|_| anyhow!("protocol error: disk path is not UTF-8"))?;
        let name = format!("disk{i}.raw");
        let dst = w.path().join(&name);
        if shared {
            // Storage both hosts see: link the very file into the VMDIR.
            std::fs::hard_link(&path, &dst).with_context(|| {
                format!("--shared-disk: linking {path} (the disk must be on storage this host shares, on the same file system as the output)")
            })?;
            targets.push(Target {
                file: File::open(&dst).context("opening a shared disk")?,
                chunks: 0,
            });
        } else {
            let f = w.create_file(&name)?;
            f.set_len(size).context("sizing a disk")?;
            targets.push(Target {
                file: f,
                chunks: size.div_ceil(CHUNK as u64),
            });
        }
        disks.push((dst, size, shared));
    }
    c.finish()?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "vm".into());
    let mut pending_bodies: Vec<Vec<u8>> = Vec::new();
    let mut state = None;
    let mut rounds = 0;
    let mut bytes = 0u64;
    loop {
        let (t, body) = rx.recv()?;
        bytes += body.len() as u64;
        match t {
            msg::CHUNKS => {
                pending_bodies.push(body);
                if pending_bodies.len() >= 64 {
                    apply(&targets, &mut pending_bodies)?;
                }
            }
            msg::ROUND_END => {
                apply(&targets, &mut pending_bodies)?;
                rounds += 1;
                tx.send(msg::ROUND_ACK, body)?;
            }
            msg::STATE => {
                apply(&targets, &mut pending_bodies)?;
                kimberley_vmm::validate_state(&body)
                    .map_err(|e| anyhow!("the received state is unusable: {e}"))?;
                state = Some(body);
            }
            msg::COMMIT => {
                let t_commit = Instant::now();
                apply(&targets, &mut pending_bodies)?;
                let state = state.ok_or_else(|| anyhow!("protocol error: COMMIT before STATE"))?;
                return Ok(Pending {
                    w,
                    name,
                    vcpus,
                    memory_size,
                    disks,
                    state,
                    t_commit,
                    t_first: t_commit,
                    rounds,
                    bytes,
                    vm: None,
                });
            }
            msg::ABORT => bail!("the sender cancelled the migration"),
            other => bail!("protocol error: unexpected {}", msg::name(other)),
        }
    }
}

fn start_guest(p: &mut Pending, tx: &mut Tx, rx: &mut Rx, t_commit: Instant) -> Result<()> {
    let disks = p.disks.iter().map(|d| d.0.clone()).collect();
    let vm = match Vm::restore(&p.w.path().join("memory.raw"), disks, &p.state) {
        Ok(vm) => vm,
        Err(e) => {
            let _ = tx.send(msg::ERROR, format!("resuming the guest: {e}").into_bytes());
            bail!("resuming the guest: {e}");
        }
    };
    let first = vm
        .wait_first_exit(Duration::from_secs(10))
        .map_err(|e| anyhow!("the guest did not start: {e}"));
    let first = match first {
        Ok(_) => vm.first_entry().unwrap_or_else(Instant::now),
        Err(e) => {
            let _ = tx.send(msg::ERROR, format!("{e:#}").into_bytes());
            return Err(e);
        }
    };
    p.t_first = first;
    p.vm = Some(vm);
    let mut body = Vec::new();
    body.extend_from_slice(&(first.duration_since(t_commit).as_micros() as u64).to_le_bytes());
    body.extend_from_slice(&(first.elapsed().as_micros() as u64).to_le_bytes());
    tx.send(msg::RUNNING, body)?;
    // The source stops for good only when it has our RUNNING; until its
    // DONE arrives, this copy may still have to go.
    let (t, _) = rx
        .recv()
        .context("the sender did not confirm the hand-over")?;
    match t {
        msg::DONE => Ok(()),
        msg::ABORT => bail!("the sender cancelled the migration"),
        other => bail!("protocol error: {} instead of DONE", msg::name(other)),
    }
}

fn finish(mut p: Pending) -> Result<Received> {
    let mut vm = p.vm.take().expect("started");
    let t = Instant::now();
    let dir = p.w.path().to_path_buf();
    std::fs::write(dir.join("state.bin"), &p.state).context("writing state.bin")?;
    let mut components = vec![Component {
        kind: Kind::Memory,
        size: p.memory_size,
        digest: [0; 32],
    }];
    for (_, size, _) in &p.disks {
        components.push(Component {
            kind: Kind::Disk,
            size: *size,
            digest: [0; 32],
        });
    }
    components.push(Component {
        kind: Kind::State,
        size: p.state.len() as u64,
        digest: [0; 32],
    });
    // The digests describe the VM as it was at the hand-over; the guest
    // runs on (memory copy-on-write, disks in place) and is saved back
    // into the directory when stopped.
    let mut manifest = Manifest {
        name: p.name.clone(),
        vcpus: p.vcpus,
        components,
    };
    for i in 0..manifest.components.len() {
        let path = dir.join(manifest.file_name(i));
        let f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        manifest.components[i].digest = digest_file(&f, manifest.components[i].size)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    let out = p.w.commit(&manifest)?;
    let vdir = VmDir::open(&out)?;
    let disks = vdir
        .manifest
        .disk_indices()
        .into_iter()
        .map(|i| vdir.component_path(i))
        .collect();
    vm.relocate_disks(disks).map_err(|e| anyhow!("{e}"))?;
    let stats = serde_json::json!({
        "rounds": p.rounds,
        "bytes_received": p.bytes,
        "restore_ms": p.t_first.duration_since(p.t_commit).as_secs_f64() * 1000.0,
        "commit_dir_ms": t.elapsed().as_secs_f64() * 1000.0,
    });
    Ok(Received {
        vm,
        dir: vdir,
        stats,
    })
}

/// Binds the listening socket.
pub fn listen(addr: &str) -> Result<TcpListener> {
    TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))
}
