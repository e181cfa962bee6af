//! Temporary outputs: a process-wide registry that SIGINT/SIGTERM empties
//! before the process exits, and the removal of stale ones left by
//! processes that are gone.
//!
//! Every temporary output ([`crate::fsutil::AtomicFile`],
//! [`crate::fsutil::AtomicDir`], [`crate::fsutil::ScratchDir`]) is
//! registered while it exists. Creation and the commit's rename run under
//! the registry's lock, so the thread started by [`on_signals`] either sees
//! the temporary (and removes it) or sees it committed, never a temporary
//! created behind its back.

use std::collections::{BTreeMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use crate::sys::signal;

/// What a registered path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A file that becomes an output at its commit.
    File,
    /// A directory that becomes an output at its commit.
    Dir,
    /// A scratch directory that never becomes an output.
    Scratch,
}

#[derive(Debug)]
struct Entry {
    tmp: PathBuf,
    dest: PathBuf,
    kind: Kind,
}

#[derive(Default)]
struct Registry {
    next: u64,
    entries: BTreeMap<u64, Entry>,
    swept: Option<HashSet<PathBuf>>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    entries: BTreeMap::new(),
    swept: None,
});

fn lock() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// A registered temporary path; dropping it deregisters it (after its
/// owner removed or committed it).
#[derive(Debug)]
pub struct Registered(u64);

impl Drop for Registered {
    fn drop(&mut self) {
        lock().entries.remove(&self.0);
    }
}

/// Registers `tmp` (which will become `dest`, or nothing for
/// [`Kind::Scratch`]) and runs `create` (which makes `tmp`) under the
/// registry's lock. Nothing is registered if `create` fails.
pub fn create<T>(
    tmp: &Path,
    dest: &Path,
    kind: Kind,
    create: impl FnOnce() -> io::Result<T>,
) -> io::Result<(T, Registered)> {
    let mut r = lock();
    let v = create()?;
    let reg = r.insert(Entry {
        tmp: tmp.to_path_buf(),
        dest: dest.to_path_buf(),
        kind,
    });
    Ok((v, reg))
}

impl Registry {
    fn insert(&mut self, e: Entry) -> Registered {
        let id = self.next;
        self.next += 1;
        self.entries.insert(id, e);
        Registered(id)
    }
}

/// Runs `create`, which makes a scratch directory whose name it chooses
/// (`mkdtemp`), under the registry's lock, and registers what it made.
pub fn create_scratch(
    create: impl FnOnce() -> io::Result<PathBuf>,
) -> io::Result<(PathBuf, Registered)> {
    let mut r = lock();
    let path = create()?;
    let reg = r.insert(Entry {
        tmp: path.clone(),
        dest: path.clone(),
        kind: Kind::Scratch,
    });
    Ok((path, reg))
}

/// Registers `tmp` that someone will create later (a scratch directory
/// whose creator renames into it).
pub fn register(tmp: &Path, dest: &Path, kind: Kind) -> Registered {
    lock().insert(Entry {
        tmp: tmp.to_path_buf(),
        dest: dest.to_path_buf(),
        kind,
    })
}

/// Runs `f` (the commit's rename of the temporary `reg`) under the
/// registry's lock, and deregisters `reg` if it succeeds: an interruption
/// removes the temporary either before the rename or not at all, and never
/// calls a committed output partial.
pub fn commit<T, E>(reg: &Registered, f: impl FnOnce() -> Result<T, E>) -> Result<T, E> {
    let mut r = lock();
    let v = f()?;
    r.entries.remove(&reg.0);
    Ok(v)
}

/// The stale temporaries in `dir`: entries named like
/// [`crate::fsutil::temp_sibling`] names them (`.NAME.tmp-PID-N`), owned by
/// our effective uid, whose process is gone.
pub fn stale_in(dir: &Path) -> Vec<PathBuf> {
    let me = std::process::id();
    let uid = crate::sys::cred::euid();
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .filter(|e| {
            let name = e.file_name();
            let Some(pid) = temp_pid(&name.to_string_lossy()) else {
                return false;
            };
            pid != me
                && e.metadata().is_ok_and(|m| m.uid() == uid)
                && !signal::pid_alive(pid as i32)
        })
        .map(|e| e.path())
        .collect()
}

/// The PID in a temporary name `.NAME.tmp-PID-N`, if `name` is one.
fn temp_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('.')?;
    let i = rest.rfind(".tmp-")?;
    if i == 0 {
        return None;
    }
    let (pid, n) = rest[i + 5..].split_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok().filter(|&p| p > 0)
}

/// Removes the stale temporaries of [`stale_in`] from `dir`, once per
/// directory and process. Failures are ignored: they were somebody's
/// leftovers, and the output being made does not depend on them.
pub fn sweep(dir: &Path) {
    let key = fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
    {
        let mut r = lock();
        if !r.swept.get_or_insert_with(HashSet::new).insert(key) {
            return;
        }
    }
    for p in stale_in(dir) {
        remove(&p);
    }
}

/// Removes a file, or a directory with its contents (`lstat`: a symbolic
/// link is removed itself, never followed).
fn remove(p: &Path) {
    match fs::symlink_metadata(p) {
        Ok(m) if m.is_dir() => {
            // Another thread may still be adding files: try again.
            for _ in 0..20 {
                if fs::remove_dir_all(p).is_ok() || !crate::fsutil::occupied(p) {
                    return;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
        }
        Ok(_) => {
            let _ = fs::remove_file(p);
        }
        Err(_) => {}
    }
}

/// Removes every registered temporary and describes them ("the partial
/// app.ovl, 1 temporary directory"). The registry stays locked: nothing
/// is created or committed after this (the process is about to exit).
fn remove_all() -> String {
    let r = lock();
    let mut outputs = Vec::new();
    let mut scratch = 0;
    let scratches: HashSet<&Path> = r
        .entries
        .values()
        .filter(|e| e.kind == Kind::Scratch)
        .map(|e| e.tmp.as_path())
        .collect();
    // A scratch directory's name is registered before it is made (by a
    // directory renamed into it): it counts once it, or something made
    // into it, exists.
    let made = |s: &Path| {
        r.entries
            .values()
            .any(|e| (e.tmp == s || e.dest.starts_with(s)) && crate::fsutil::occupied(&e.tmp))
    };
    let made: HashSet<&Path> = scratches.iter().copied().filter(|s| made(s)).collect();
    for e in r.entries.values() {
        remove(&e.tmp);
        match e.kind {
            Kind::Scratch => scratch += usize::from(made.contains(e.tmp.as_path())),
            // Something being made inside or into a scratch directory is
            // part of it.
            _ if scratches.iter().any(|s| e.dest.starts_with(s)) => {}
            Kind::File | Kind::Dir => outputs.push(e.dest.display().to_string()),
        }
    }
    std::mem::forget(r);
    let mut parts = Vec::new();
    if !outputs.is_empty() {
        parts.push(format!("the partial {}", outputs.join(", ")));
    }
    match scratch {
        0 => {}
        1 => parts.push("1 temporary directory".into()),
        n => parts.push(format!("{n} temporary directories")),
    }
    parts.join(" and ")
}

/// Starts the thread that acts on SIGINT/SIGTERM (until a stop flag takes
/// them over, see [`signal::stop_on`]): it removes every registered
/// temporary, prints `{program}: interrupted by SIGINT; removed ...` on
/// stderr and exits with `exit_code(signal)`. Child processes started with
/// `PR_SET_PDEATHSIG` (QEMU) die with the process.
pub fn on_signals(program: String, exit_code: fn(libc::c_int) -> i32) -> io::Result<()> {
    let mut pipe = signal::to_pipe()?;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut b = [0u8; 1];
            loop {
                match pipe.read(&mut b) {
                    Ok(1) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    // The write end never closes; anything else: give up
                    // quietly (the default would have killed us anyway).
                    _ => return,
                }
            }
            let sig = signal::pending().unwrap_or(b[0] as libc::c_int);
            let removed = remove_all();
            let line = if removed.is_empty() {
                format!("{program}: interrupted by {}\n", signal::name(sig))
            } else {
                format!(
                    "{program}: interrupted by {}; removed {removed}\n",
                    signal::name(sig)
                )
            };
            // On a terminal, start from a clean line (a progress bar may
            // be half drawn). One write(2): not interleaved with others.
            let clear = if io::IsTerminal::is_terminal(&io::stderr()) {
                "\r\x1b[2K"
            } else {
                ""
            };
            let _ = io::Write::write_all(&mut io::stderr(), format!("{clear}{line}").as_bytes());
            signal::exit_now(exit_code(sig));
        })?;
    Ok(())
}

/// True once SIGINT/SIGTERM came through [`on_signals`]: the signal thread
/// is cleaning up and will exit; errors seen meanwhile are its doing.
pub fn interrupted() -> bool {
    signal::pending().is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registered(tmp: &Path) -> bool {
        lock().entries.values().any(|e| e.tmp == tmp)
    }

    #[test]
    fn registered_until_committed_or_dropped() {
        let t = tempfile::tempdir().unwrap();
        let (tmp, dest) = (t.path().join(".a.tmp-1-0"), t.path().join("a"));
        let ((), reg) = create(&tmp, &dest, Kind::File, || fs::write(&tmp, b"x")).unwrap();
        assert!(registered(&tmp));
        // A failed commit keeps it registered; a successful one does not.
        assert!(commit(&reg, || Err::<(), _>("no")).is_err());
        assert!(registered(&tmp));
        commit(&reg, || fs::rename(&tmp, &dest)).unwrap();
        assert!(!registered(&tmp));
        drop(reg);
        // Dropped: deregistered.
        let ((), reg) = create(&tmp, &dest, Kind::File, || fs::write(&tmp, b"x")).unwrap();
        assert!(registered(&tmp));
        drop(reg);
        assert!(!registered(&tmp));
        // A failed creation registers nothing.
        let other = t.path().join(".b.tmp-1-0");
        assert!(
            create(&other, &dest, Kind::Dir, || Err::<(), _>(io::Error::other(
                "no"
            )))
            .is_err()
        );
        assert!(!registered(&other));
        let reg = register(&other, &other, Kind::Scratch);
        assert!(registered(&other));
        drop(reg);
        assert!(!registered(&other));
    }

    #[test]
    fn temp_names() {
        assert_eq!(temp_pid(".app.ovl.tmp-123-0"), Some(123));
        assert_eq!(temp_pid(".a.tmp-b.tmp-9-17"), Some(9));
        for bad in [
            "app.ovl.tmp-123-0",
            ".tmp-123-0",
            ".x.tmp-123",
            ".x.tmp-12a-0",
            ".x.tmp--0",
            ".x.tmp-0-0",
            ".x.tmp-1-",
            ".x.tmp-1-2-3",
        ] {
            assert_eq!(temp_pid(bad), None, "{bad}");
        }
    }

    #[test]
    fn stale_only_for_dead_processes() {
        let t = tempfile::tempdir().unwrap();
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let dead = c.id();
        c.wait().unwrap();
        let live = std::process::id();
        // PID 1 lives, whoever owns it.
        for (name, dir) in [
            (format!(".a.ovl.tmp-{dead}-0"), false),
            (format!(".vm.tmp-{dead}-3"), true),
            (format!(".b.ovl.tmp-{live}-0"), false),
            (".c.ovl.tmp-1-0".to_string(), false),
            (format!("d.tmp-{dead}-0"), false),
            (format!(".e.ovl.tmp-{dead}-1"), false),
        ] {
            let p = t.path().join(name);
            if dir {
                fs::create_dir(&p).unwrap();
                fs::write(p.join("inner"), b"x").unwrap();
            } else {
                fs::write(&p, b"x").unwrap();
            }
        }
        // Someone else's: never ours to remove.
        let theirs = t.path().join(format!(".e.ovl.tmp-{dead}-1"));
        std::os::unix::fs::lchown(&theirs, Some(crate::sys::cred::euid() + 1), None).unwrap();
        let mut stale: Vec<String> = stale_in(t.path())
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        stale.sort();
        assert_eq!(
            stale,
            [format!(".a.ovl.tmp-{dead}-0"), format!(".vm.tmp-{dead}-3")]
        );
        sweep(t.path());
        let mut left: Vec<String> = fs::read_dir(t.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                format!(".b.ovl.tmp-{live}-0"),
                ".c.ovl.tmp-1-0".to_string(),
                format!(".e.ovl.tmp-{dead}-1"),
                format!("d.tmp-{dead}-0"),
            ]
        );
    }
}
