//! A version-2 diff keeps its compressed segments (and the working set's
//! chunks) in a private spool file, not in memory, and leaves nothing
//! behind when it fails (FORMAT.md section 10.5; `diff::writer`).
//!
//! Heap use is measured with a counting global allocator, so the tests of
//! this file run one at a time (`LOCK`).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use common::KEY;
use kimberley_formats::chunk::CHUNK;
use kimberley_formats::diff::{diff, DiffOptions, Protection};
use kimberley_formats::overlay::header::{VERSION_1, VERSION_MAP};
use kimberley_formats::overlay::Pos;
use kimberley_formats::progress::Progress;
use kimberley_formats::testkit::Rng;
use kimberley_formats::vmdir::import::{import, ImportSpec};
use kimberley_formats::vmdir::{Kind, VmDir};

struct Counting;

static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

fn grew(n: usize) {
    let now = CURRENT.fetch_add(n, Ordering::Relaxed) + n;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

// SAFETY: every call is forwarded unchanged to the system allocator; the
// counters only observe sizes and never touch the memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract for `alloc` is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as in `alloc`.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            grew(layout.size());
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: `ptr` came from this allocator (so from `System`) with
        // `layout`, as the caller guarantees.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as in `dealloc`; `new_size` is the caller's.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            CURRENT.fetch_sub(layout.size(), Ordering::Relaxed);
            grew(new_size);
        }
        p
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

static LOCK: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A base whose memory is `size` bytes of holes, and a launch VM whose
/// memory is `size` random bytes: the overlay is as large as the launch
/// VM, compressed or not.
fn random_pair(dir: &Path, size: u64) -> (PathBuf, PathBuf) {
    let bm = dir.join("raw-base");
    std::fs::File::create(&bm).unwrap().set_len(size).unwrap();
    let lm = dir.join("raw-launch");
    let mut f = io::BufWriter::new(std::fs::File::create(&lm).unwrap());
    let mut rng = Rng(7);
    let mut block = vec![0u8; 1 << 20];
    for _ in 0..size / block.len() as u64 {
        rng.fill(&mut block);
        f.write_all(&block).unwrap();
    }
    f.flush().unwrap();
    drop(f);
    let mut out = Vec::new();
    for (name, mem) in [("base", &bm), ("launch", &lm)] {
        let vm = dir.join(name);
        import(
            &vm,
            &ImportSpec {
                name: "vm".into(),
                vcpus: 1,
                memory: mem.clone(),
                disks: Vec::new(),
                state: None,
            },
        )
        .unwrap();
        std::fs::remove_file(mem).unwrap();
        out.push(vm);
    }
    (out[0].clone(), out[1].clone())
}

/// Counts what it is given.
#[derive(Default)]
struct Count(u64);

impl Write for Count {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0 += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn opts(version: u16, ws: Vec<Pos>, spool: &Path) -> DiffOptions {
    DiffOptions {
        threads: 2,
        level: 1,
        segment_bytes: 1 << 20,
        version,
        working_set: ws,
        spool_dir: Some(spool.to_path_buf()),
        ..DiffOptions::new(Protection::Key(KEY))
    }
}

/// The peak of heap bytes in use while `opts` diffs the pair, above what
/// was in use before; and the overlay's size.
fn peak_of(base: &Path, launch: &Path, opts: &DiffOptions) -> (usize, u64) {
    let base = VmDir::open(base).unwrap();
    let launch = VmDir::open(launch).unwrap();
    let before = CURRENT.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let (out, _) = diff(&base, &launch, opts, Count::default(), &Progress::default()).unwrap();
    (PEAK.load(Ordering::Relaxed) - before, out.0)
}

/// Open descriptors of this process on files in `dir` (a nameless spool
/// file reads as `dir/#inode (deleted)`).
fn open_in(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned() + "/";
    std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .map(|l| l.to_string_lossy().into_owned())
        .filter(|l| l.starts_with(&dir))
        .collect()
}

fn assert_nothing_left(dir: &Path) {
    let names: Vec<_> = std::fs::read_dir(dir).unwrap().collect();
    assert!(names.is_empty(), "left in the spool directory: {names:?}");
    let open = open_in(dir);
    assert!(open.is_empty(), "spool files still open: {open:?}");
}

const MIB: usize = 1 << 20;

#[test]
fn a_version_2_diff_holds_no_more_memory_than_version_1() {
    let _l = lock();
    let t = tempfile::tempdir().unwrap();
    let spool = t.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    let size = 256 << 20;
    let (base, launch) = random_pair(t.path(), size);
    let (v1, v1_bytes) = peak_of(&base, &launch, &opts(VERSION_1, Vec::new(), &spool));
    assert!(v1_bytes > size, "random data does not compress");
    let (v2, v2_bytes) = peak_of(&base, &launch, &opts(VERSION_MAP, Vec::new(), &spool));
    assert!(v2_bytes > v1_bytes);
    // Every other chunk of the first half in the working set: 128 MiB of
    // held chunks, written last.
    let ws: Vec<Pos> = (0..size / CHUNK / 2).step_by(2).map(|k| (0, k)).collect();
    let (v2ws, _) = peak_of(&base, &launch, &opts(VERSION_MAP, ws, &spool));
    eprintln!(
        "peak heap: version 1 {} MiB, version 2 {} MiB, version 2 with a working set {} MiB ({} MiB overlay)",
        v1 / MIB,
        v2 / MIB,
        v2ws / MIB,
        v2_bytes >> 20
    );
    // Holding the overlay (256 MiB) or the working set (64 MiB of
    // chunks) would exceed these by far.
    assert!(
        v2 < v1 + 16 * MIB,
        "version 2 peaked at {} MiB, version 1 at {} MiB",
        v2 / MIB,
        v1 / MIB
    );
    assert!(
        v2ws < v1 + 16 * MIB,
        "version 2 with a working set peaked at {} MiB, version 1 at {} MiB",
        v2ws / MIB,
        v1 / MIB
    );
    assert_nothing_left(&spool);
}

/// Fails its first write after the header once a spool file is open in
/// `dir` (so the spool was in use), as a full disk would.
struct FailingOutput {
    dir: PathBuf,
    written: u64,
    open_when_failed: Arc<Mutex<Vec<String>>>,
}

impl Write for FailingOutput {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.written >= 4096 {
            *self.open_when_failed.lock().unwrap() = open_in(&self.dir);
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        self.written += b.len() as u64;
        Ok(b.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn small_pair(t: &Path) -> kimberley_formats::testkit::Pair {
    kimberley_formats::testkit::make_pair(
        t,
        &kimberley_formats::testkit::PairSpec {
            memory: 4 << 20,
            disks: vec![8 << 20],
            launch_disks: vec![8 << 20],
            change_percent: 40,
            ..Default::default()
        },
    )
    .unwrap()
}

#[test]
fn a_failed_copy_out_of_the_spool_leaves_nothing() {
    let _l = lock();
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path());
    let spool = t.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    for ws in [Vec::new(), (0..200).map(|k| (0, k)).collect()] {
        let mut o = opts(VERSION_MAP, ws, &spool);
        o.segment_bytes = 64 << 10;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let out = FailingOutput {
            dir: spool.clone(),
            written: 0,
            open_when_failed: seen.clone(),
        };
        let base = VmDir::open(&p.base).unwrap();
        let launch = VmDir::open(&p.launch).unwrap();
        let e = match diff(&base, &launch, &o, out, &Progress::default()) {
            Ok(_) => panic!("the output failed, the diff did not"),
            Err(e) => e,
        };
        assert!(
            matches!(&e, kimberley_formats::Error::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC)),
            "{e:?}"
        );
        assert_nothing_left(&spool);
        // The spool was there, nameless, while the output failed (the
        // segments'; the working set's is closed once it is encoded).
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen[0].ends_with(" (deleted)"), "{seen:?}");
    }
}

#[test]
fn a_diff_that_fails_half_way_leaves_nothing() {
    let _l = lock();
    let t = tempfile::tempdir().unwrap();
    let p = small_pair(t.path());
    let spool = t.path().join("spool");
    std::fs::create_dir(&spool).unwrap();
    // The launch disk's last bytes no longer match its digest: found when
    // the classifier reaches them, after the memory's segments and the
    // working set's disk chunks were spooled. (No key: a key-file diff
    // verifies the launch VM before it starts.)
    let launch = VmDir::open(&p.launch).unwrap();
    assert_eq!(launch.manifest.components[1].kind, Kind::Disk);
    let disk = launch.component_path(1);
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    let size = f.metadata().unwrap().len();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0x5a; 64], size - 64).unwrap();
    drop(f);
    for ws in [Vec::new(), (0..200).map(|k| (1, k)).collect()] {
        let o = DiffOptions {
            protection: Protection::None,
            segment_bytes: 16 << 10,
            ..opts(VERSION_MAP, ws, &spool)
        };
        let base = VmDir::open(&p.base).unwrap();
        let launch = VmDir::open(&p.launch).unwrap();
        let r = diff(&base, &launch, &o, Count::default(), &Progress::default());
        let e = match r {
            Ok(_) => panic!("a launch VM that does not match its digests was diffed"),
            Err(e) => e,
        };
        assert!(e.to_string().contains("digest"), "{e}");
        assert_nothing_left(&spool);
    }
}

/// A tmpfs of `size` mounted at the new directory `dir`, unmounted on
/// drop: a file system that runs out of space. Needs root (as the full
/// disk tests of dekimberlize and vmm).
struct SmallTmpfs(PathBuf);

impl SmallTmpfs {
    fn mount(dir: &Path, size: &str) -> SmallTmpfs {
        std::fs::create_dir(dir).unwrap();
        let m = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            m.status.success(),
            "this test needs root to mount a small tmpfs: {}",
            String::from_utf8_lossy(&m.stderr)
        );
        SmallTmpfs(dir.to_path_buf())
    }
}

impl Drop for SmallTmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn a_full_spool_fails_the_diff_and_leaves_nothing() {
    let _l = lock();
    let t = tempfile::tempdir().unwrap();
    let spool = t.path().join("small");
    let _m = SmallTmpfs::mount(&spool, "1m");
    let (base, launch) = random_pair(t.path(), 8 << 20);
    // Without a working set the segments fill the spool; with one that
    // covers the whole memory, its chunks do.
    for (ws, what) in [
        (Vec::new(), "writing the overlay's spool file"),
        (
            (0..2048).map(|k| (0, k)).collect(),
            "writing the working set's spool file",
        ),
    ] {
        let o = opts(VERSION_MAP, ws, &spool);
        let base = VmDir::open(&base).unwrap();
        let launch = VmDir::open(&launch).unwrap();
        let e = match diff(&base, &launch, &o, Count::default(), &Progress::default()) {
            Ok(_) => panic!("8 MiB of random data fitted a 1 MiB spool"),
            Err(e) => e,
        };
        assert!(
            matches!(&e, kimberley_formats::Error::Io { context, source }
                if context == what && source.raw_os_error() == Some(libc::ENOSPC)),
            "{e:?}"
        );
        assert_nothing_left(&spool);
    }
}
