//! The Linux guest of the tests: its kernel and initramfs (built once by
//! scripts/linux-base.sh, shared by all test binaries under a lock), and a
//! semaphore that keeps at most two QEMUs running at once. Also included
//! (`#[path]`) by the dekimberlize suite.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Condvar, Mutex, OnceLock};

/// The guest's kernel and initramfs.
#[derive(Debug, Clone)]
pub struct Artifacts {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Builds (or finds current) the artifacts in
/// `target/kimberley-linux-artifacts`, once per test binary; `flock`
/// serialises the test binaries.
pub fn artifacts() -> Artifacts {
    static A: OnceLock<Artifacts> = OnceLock::new();
    A.get_or_init(|| {
        let ws = workspace();
        let dir = ws.join("target/kimberley-linux-artifacts");
        std::fs::create_dir_all(ws.join("target")).unwrap();
        let lock = ws.join("target/kimberley-linux-artifacts.lock");
        let o = Command::new("flock")
            .arg(&lock)
            .arg(ws.join("scripts/linux-base.sh"))
            .arg("--artifacts")
            .arg(&dir)
            .output()
            .expect("running scripts/linux-base.sh");
        assert!(
            o.status.success(),
            "scripts/linux-base.sh --artifacts failed: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        Artifacts {
            kernel: dir.join("vmlinuz"),
            initrd: dir.join("initrd.cpio.gz"),
        }
    })
    .clone()
}

struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

fn slots() -> &'static Slots {
    static S: OnceLock<Slots> = OnceLock::new();
    S.get_or_init(|| Slots {
        used: Mutex::new(0),
        freed: Condvar::new(),
    })
}

/// Held while a test runs QEMU: at most two at once.
pub struct QemuSlot(());

impl Drop for QemuSlot {
    fn drop(&mut self) {
        let s = slots();
        *s.used.lock().unwrap_or_else(|p| p.into_inner()) -= 1;
        s.freed.notify_one();
    }
}

/// Waits for a free slot.
pub fn qemu_slot() -> QemuSlot {
    let s = slots();
    let mut used = s.used.lock().unwrap_or_else(|p| p.into_inner());
    while *used >= 2 {
        used = s.freed.wait(used).unwrap_or_else(|p| p.into_inner());
    }
    *used += 1;
    QemuSlot(())
}
