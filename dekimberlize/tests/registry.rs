//! Overlays to cloudlets through a real OCI registry (Debian's
//! docker-registry on loopback): `kimberlize push`, `kimberlize fetch`
//! into the cloudlet cache, `dekimberlize --from`, with a TCP proxy that
//! counts, cuts and rate-limits what the registry sends.

mod common;
#[path = "../../registry/tests/common/oci.rs"]
mod oci;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::{code, ok, run, setup_with, stderr, two_layers};
use kimberley_cli::exit;
use kimberley_formats::testkit::{make_pair, Pair, PairSpec};

const MIB: u64 = 1 << 20;

fn kimberlize(args: &[&OsStr]) -> Output {
    run(Command::new(common::bin("kimberlize")).args(args))
}

fn push(r: &str, overlays: &[&Path]) -> Output {
    let mut c = Command::new(common::bin("kimberlize"));
    c.args(["push", "-q", r]).args(overlays);
    run(&mut c)
}

fn fetch(cache: &Path, r: &str, extra: &[&str]) -> Output {
    let mut c = Command::new(common::bin("kimberlize"));
    c.args(["fetch", "--cache"]).arg(cache).args(extra).arg(r);
    run(&mut c)
}

fn sha256_hex(p: &Path) -> String {
    let bytes = std::fs::read(p).unwrap();
    kimberley_registry::Digest::of(&bytes).hex()
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).unwrap().len()
}

/// The blob of `ovl` in cache `cache`.
fn cached(cache: &Path, ovl: &Path) -> PathBuf {
    cache.join("blobs/sha256").join(sha256_hex(ovl))
}

/// Asserts that every data file of VM directory `a` equals `b`'s.
fn same_vm(a: &Path, b: &Path) {
    let mut n = 0;
    for e in std::fs::read_dir(b).unwrap() {
        let name = e.unwrap().file_name();
        if name == "manifest.json" {
            continue;
        }
        let (x, y) = (
            std::fs::read(a.join(&name)).unwrap(),
            std::fs::read(b.join(&name)).unwrap(),
        );
        assert!(x == y, "{name:?} differs");
        n += 1;
    }
    assert!(n >= 2);
}

/// A single-layer overlay large enough for the transfer counts to mean
/// something (several MiB of mostly random pages), with its pair and key.
fn big_layer(dir: &Path, seed: u64) -> (PathBuf, Pair, PathBuf) {
    sized_layer(dir, seed, 16 * MIB, 8 * MIB)
}

/// [`big_layer`] with this much memory and disk.
fn sized_layer(dir: &Path, seed: u64, memory: u64, disk: u64) -> (PathBuf, Pair, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (p, key) = setup_with(
        dir,
        &PairSpec {
            seed,
            memory,
            disks: vec![disk],
            launch_disks: vec![disk],
            change_percent: 90,
            state: None,
        },
    );
    let ovl = dir.join("big.ovl");
    ok(common::diff(
        &p.base,
        &p.launch,
        &ovl,
        &["-k".as_ref(), key.as_os_str()],
    ));
    (ovl, p, key)
}

/// Push a two-layer chain, fetch it into an empty cache and apply the
/// cached layers: the launch VM, byte for byte. A second fetch has nothing
/// new (exit 10); chains out of order are refused (exit 5).
#[test]
fn push_fetch_apply_two_layers() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    let (l1, l2, p2) = two_layers(t.path(), &p, &key);
    let r = format!("{}/apps/office:v1", reg.addr());
    let o = ok(push(&r, &[&l1, &l2]));
    let printed = String::from_utf8(o.stdout).unwrap();
    assert!(
        printed.starts_with(&format!("{}/apps/office@sha256:", reg.addr())),
        "{printed}"
    );

    // Out of chain order: refused before anything is sent.
    let o = push(&format!("{}/apps/wrong:v1", reg.addr()), &[&l2, &l1]);
    assert_eq!(code(&o), exit::WRONG_BASE as i32, "{}", stderr(&o));
    assert!(stderr(&o).contains("not the child"), "{}", stderr(&o));

    let cache = t.path().join("cache");
    let o = fetch(&cache, &r, &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let o = fetch(&cache, &r, &["--quiet"]);
    assert_eq!(code(&o), exit::NOTHING_NEW as i32, "{}", stderr(&o));
    assert!(o.stderr.is_empty());
    // By digest too (no network needed: the cache has it).
    let o = fetch(&cache, printed.trim(), &[]);
    assert_eq!(code(&o), exit::NOTHING_NEW as i32, "{}", stderr(&o));

    // Private: 0700 directories, 0600 files.
    use std::os::unix::fs::PermissionsExt;
    for p in [
        cache.clone(),
        cache.join("blobs/sha256"),
        cached(&cache, &l1),
    ] {
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert!(mode == 0o700 || mode == 0o600, "{} {mode:o}", p.display());
    }

    let out = t.path().join("out");
    let mut c = Command::new(common::bin("dekimberlize"));
    c.args(["-q", "--base"])
        .arg(&p.base)
        .arg("-i")
        .arg(cached(&cache, &l1))
        .arg("-i")
        .arg(cached(&cache, &l2))
        .arg("-k")
        .arg(&key)
        .arg("-o")
        .arg(&out);
    ok(run(&mut c));
    same_vm(&out, &p2.launch);
}

/// A fetch cut at 60% of a layer, run again: the rerun receives at most
/// the rest plus 1 MiB, and the blob verifies.
#[test]
fn cut_fetch_resumes_with_range() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (ovl, _, _) = big_layer(&t.path().join("p"), 3);
    let n = size(&ovl);
    assert!(n > 4 * MIB, "{n}");
    ok(push(&format!("{}/big/one:v1", reg.addr()), &[&ovl]));
    let proxy = oci::Proxy::start(reg.port);
    let r = format!("{}/big/one:v1", proxy.addr());
    let cache = t.path().join("cache");
    proxy.cut_after(n * 6 / 10);
    let o = fetch(&cache, &r, &[]);
    assert_eq!(code(&o), exit::ERROR as i32, "{}", stderr(&o));
    let partial = cache
        .join("blobs/sha256")
        .join(format!("{}.partial", sha256_hex(&ovl)));
    let have = size(&partial);
    assert!(have >= n / 2 && have < n, "{have} of {n}");
    assert!(!cached(&cache, &ovl).exists());

    proxy.cut_after(0);
    proxy.reset();
    let o = fetch(&cache, &r, &[]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(
        proxy.down() <= n - have + MIB,
        "the rerun received {} bytes for the {} left",
        proxy.down(),
        n - have
    );
    assert_eq!(
        std::fs::read(cached(&cache, &ovl)).unwrap(),
        std::fs::read(&ovl).unwrap()
    );
    assert!(!partial.exists());
}

/// A second chain sharing the parent downloads only its own layer, the
/// config and the manifest.
#[test]
fn shared_parent_is_not_downloaded_again() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (big, p, key) = big_layer(&t.path().join("p"), 4);
    // Two children of `big`: launch VMs of two other pairs.
    let child = |seed: u64, name: &str| {
        let d = t.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let q = make_pair(
            &d,
            &PairSpec {
                seed,
                ..Default::default()
            },
        )
        .unwrap();
        let out = d.join("child.ovl");
        ok(common::diff(
            &p.base,
            &q.launch,
            &out,
            &[
                "--parent".as_ref(),
                big.as_os_str(),
                "-k".as_ref(),
                key.as_os_str(),
            ],
        ));
        out
    };
    let (a, b) = (child(11, "a"), child(12, "b"));
    ok(push(&format!("{}/apps/a:v1", reg.addr()), &[&big, &a]));
    ok(push(&format!("{}/apps/b:v1", reg.addr()), &[&big, &b]));
    let proxy = oci::Proxy::start(reg.port);
    let cache = t.path().join("cache");
    ok(fetch(&cache, &format!("{}/apps/a:v1", proxy.addr()), &[]));
    assert!(proxy.down() > size(&big));
    proxy.reset();
    ok(fetch(&cache, &format!("{}/apps/b:v1", proxy.addr()), &[]));
    // Its layer, a config of a few hundred bytes, a manifest of a few KiB
    // and the HTTP headers.
    let got = proxy.down();
    assert!(
        got >= size(&b) && got <= size(&b) + 32 * 1024,
        "{got} for a layer of {}",
        size(&b)
    );
}

/// Two fetches of the same reference at once: one download, both caches
/// readers see the verified blob.
#[test]
fn concurrent_fetches_download_once() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (big, _, _) = big_layer(&t.path().join("p"), 5);
    ok(push(&format!("{}/big/two:v1", reg.addr()), &[&big]));
    let proxy = oci::Proxy::start(reg.port);
    // Slow enough that the two overlap: about 0.3 s for the layer.
    proxy.limit(size(&big) * 3);
    let cache = t.path().join("cache");
    let r = format!("{}/big/two:v1", proxy.addr());
    let spawn = || {
        Command::new(common::bin("kimberlize"))
            .args(["fetch", "--cache"])
            .arg(&cache)
            .arg(&r)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let (c1, c2) = (spawn(), spawn());
    let (s1, e1) = common::finish(c1);
    let (s2, e2) = common::finish(c2);
    let codes = [s1.code().unwrap(), s2.code().unwrap()];
    assert!(codes.contains(&0), "{codes:?}: {e1} {e2}");
    assert!(
        codes
            .iter()
            .all(|&c| c == 0 || c == exit::NOTHING_NEW as i32),
        "{codes:?}: {e1} {e2}"
    );
    assert!(
        proxy.down() < size(&big) + size(&big) / 2,
        "{} bytes for a layer of {}",
        proxy.down(),
        size(&big)
    );
    assert_eq!(
        std::fs::read(cached(&cache, &big)).unwrap(),
        std::fs::read(&big).unwrap()
    );
}

/// Attack: a blob modified in the registry's storage is refused, removed
/// from the cache and reported with its own exit code.
#[test]
fn tampered_blob_is_refused_and_removed() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    let (l1, l2, _) = two_layers(t.path(), &p, &key);
    let r = format!("{}/apps/t:v1", reg.addr());
    ok(push(&r, &[&l1, &l2]));
    let hex = sha256_hex(&l2);
    let data = reg.blob_data(&hex);
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&data, &bytes).unwrap();
    let cache = t.path().join("cache");
    let o = fetch(&cache, &r, &[]);
    assert_eq!(code(&o), exit::TAMPERED as i32, "{}", stderr(&o));
    assert!(stderr(&o).contains(&hex), "{}", stderr(&o));
    let dir = cache.join("blobs/sha256");
    assert!(!dir.join(&hex).exists());
    assert!(!dir.join(format!("{hex}.partial")).exists());
    // The untouched parent did verify and stays.
    assert!(cached(&cache, &l1).exists());
}

/// The quota evicts the least recently used chain that is not pinned.
#[test]
fn quota_evicts_the_least_recently_used_unpinned_chain() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let mut layers = Vec::new();
    for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
        let d = t.path().join(name);
        std::fs::create_dir(&d).unwrap();
        let (p, key) = setup_with(
            &d,
            &PairSpec {
                seed: 20 + i as u64,
                ..Default::default()
            },
        );
        let ovl = d.join("l.ovl");
        ok(common::diff(
            &p.base,
            &p.launch,
            &ovl,
            &["-k".as_ref(), key.as_os_str()],
        ));
        ok(push(&format!("{}/q/{name}:v1", reg.addr()), &[&ovl]));
        layers.push(ovl);
    }
    let r = |n: &str| format!("{}/q/{n}:v1", reg.addr());
    let cache = t.path().join("cache");
    // a (pinned), b, c: then d with room for about three layers.
    ok(fetch(&cache, &r("a"), &["--pin"]));
    ok(fetch(&cache, &r("b"), &[]));
    ok(fetch(&cache, &r("c"), &[]));
    // b was used after c: c is now the least recently used unpinned one.
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(code(&fetch(&cache, &r("b"), &[])), exit::NOTHING_NEW as i32);
    let max = layers.iter().map(|l| size(l)).max().unwrap();
    let quota = 3 * max + 4096;
    let o = fetch(&cache, &r("d"), &["--quota", &quota.to_string()]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    assert!(stderr(&o).contains("evicted 1 chain"), "{}", stderr(&o));
    let present: Vec<bool> = layers.iter().map(|l| cached(&cache, l).exists()).collect();
    assert_eq!(present, [true, true, false, true]);
    // gc with a small quota keeps only the pinned chain.
    let o = kimberlize(&[
        "gc".as_ref(),
        "--cache".as_ref(),
        cache.as_os_str(),
        "--quota".as_ref(),
        "1".as_ref(),
    ]);
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    let present: Vec<bool> = layers.iter().map(|l| cached(&cache, l).exists()).collect();
    assert_eq!(present, [true, false, false, false]);
}

fn apply_from(base: &Path, r: &str, cache: &Path, key: &Path, out: &Path) -> Output {
    let mut c = Command::new(common::bin("dekimberlize"));
    c.args(["-q", "--no-sync", "--base"])
        .arg(base)
        .args(["--from", r, "--cache"])
        .arg(cache)
        .arg("-k")
        .arg(key)
        .arg("-o")
        .arg(out);
    run(&mut c)
}

/// `dekimberlize --from` with an empty cache over a link limited to
/// 100 Mbit/s applies while the layer arrives: the whole run takes at most
/// 1.1 times the transfer, as through a pipe. The layer stays in the cache,
/// verified, and a second run needs no registry at all.
#[test]
fn from_streams_while_applying() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    // A transfer of a few seconds, so that what is left to do once the
    // last byte arrived (checking the result) weighs little, as through a
    // pipe.
    let (big, p, key) = sized_layer(&t.path().join("p"), 6, 128 * MIB, 32 * MIB);
    ok(push(&format!("{}/apps/from:v1", reg.addr()), &[&big]));
    let proxy = oci::Proxy::start(reg.port);
    const RATE: u64 = 100_000_000 / 8;
    proxy.limit(RATE);
    let cache = t.path().join("cache");
    let out = t.path().join("out");
    let t0 = std::time::Instant::now();
    ok(apply_from(
        &p.base,
        &format!("{}/apps/from:v1", proxy.addr()),
        &cache,
        &key,
        &out,
    ));
    let took = t0.elapsed().as_secs_f64();
    let transfer = proxy.down() as f64 / RATE as f64;
    assert!(proxy.down() >= size(&big));
    assert!(
        took <= 1.1 * transfer,
        "{took:.3} s for a transfer of {transfer:.3} s ({} bytes)",
        proxy.down()
    );
    same_vm(&out, &p.launch);
    assert_eq!(
        std::fs::read(cached(&cache, &big)).unwrap(),
        std::fs::read(&big).unwrap()
    );
    // The cache alone: no registry, no proxy.
    let r = format!("{}/apps/from:v1", proxy.addr());
    drop(proxy);
    drop(reg);
    let out2 = t.path().join("out2");
    ok(apply_from(&p.base, &r, &cache, &key, &out2));
    same_vm(&out2, &p.launch);
}

/// Attack: a layer modified in the registry fails `--from` (exit 11) with
/// no output left and nothing of it kept in the cache.
#[test]
fn from_refuses_a_tampered_layer() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    let (l1, l2, _) = two_layers(t.path(), &p, &key);
    let r = format!("{}/apps/tf:v1", reg.addr());
    ok(push(&r, &[&l1, &l2]));
    let hex = sha256_hex(&l2);
    let data = reg.blob_data(&hex);
    // One byte more than the manifest says: every byte of an overlay is
    // authenticated, so a changed byte fails its own checks (exit 3 or 4);
    // a longer blob is what only the digest and size can catch.
    let mut bytes = std::fs::read(&data).unwrap();
    bytes.push(0);
    std::fs::write(&data, &bytes).unwrap();
    let cache = t.path().join("cache");
    let out = t.path().join("out");
    let o = apply_from(&p.base, &r, &cache, &key, &out);
    assert_eq!(code(&o), exit::TAMPERED as i32, "{}", stderr(&o));
    assert!(!out.exists());
    assert!(
        common::temps(t.path()).is_empty(),
        "{:?}",
        common::temps(t.path())
    );
    let dir = cache.join("blobs/sha256");
    assert!(!dir.join(&hex).exists());
    assert!(!dir.join(format!("{hex}.partial")).exists());
}

/// `kimberlize diff --parent-from REF` makes a layer on top of a chain in
/// a registry: byte for byte the layer `--parent FILE` makes (diffs are
/// reproducible with a key file), and it pushes as the chain's next layer.
#[test]
fn diff_on_top_of_a_chain_in_a_registry() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    let (l1, l2, p2) = two_layers(t.path(), &p, &key);
    ok(push(&format!("{}/apps/os:v1", reg.addr()), &[&l1]));
    let new = t.path().join("new.ovl");
    let cache = t.path().join("cache");
    let o = kimberlize(&[
        "diff".as_ref(),
        "-q".as_ref(),
        "--base".as_ref(),
        p.base.as_os_str(),
        "--parent-from".as_ref(),
        format!("{}/apps/os:v1", reg.addr()).as_ref(),
        "--cache".as_ref(),
        cache.as_os_str(),
        "--launch".as_ref(),
        p2.launch.as_os_str(),
        "-k".as_ref(),
        key.as_os_str(),
        "-o".as_ref(),
        new.as_os_str(),
    ]);
    ok(o);
    assert!(std::fs::read(&new).unwrap() == std::fs::read(&l2).unwrap());
    assert!(cached(&cache, &l1).exists());
    ok(push(&format!("{}/apps/app:v1", reg.addr()), &[&l1, &new]));
}

/// `kimberlize build --parent-from REF` builds a layer on top of a chain in
/// a registry (KVM): byte for byte the layer `build --parent FILE` makes,
/// and its depfile names the cache's file of the tag, which `kimberlize
/// fetch` replaces when the tag moves.
#[test]
fn build_on_top_of_a_chain_in_a_registry() {
    if !common::kvm() {
        return;
    }
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let t = tempfile::tempdir().unwrap();
    let d = |n: &str| t.path().join(n);
    let ex = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/layers");
    common::make_base(&d("base"), "64M", "256M");
    common::keygen(&d("key"));
    let build = |layer: &str, extra: &[&OsStr]| {
        let mut c = Command::new(common::bin("kimberlize"));
        c.args(["build", "-q", "--progress", "none", "--base"])
            .arg(d("base"))
            .arg("--install")
            .arg(ex.join(format!("{layer}-install.txt")))
            .arg("--resume")
            .arg(ex.join(format!("{layer}-resume.txt")))
            .arg("-k")
            .arg(d("key"))
            .args(extra);
        run(&mut c)
    };
    ok(build("os", &["-o".as_ref(), d("os.ovl").as_os_str()]));
    let r = format!("{}/apps/os:v1", reg.addr());
    ok(push(&r, &[&d("os.ovl")]));
    ok(build(
        "app",
        &[
            "--parent".as_ref(),
            d("os.ovl").as_os_str(),
            "-o".as_ref(),
            d("a.ovl").as_os_str(),
        ],
    ));
    ok(build(
        "app",
        &[
            "--parent-from".as_ref(),
            r.as_ref(),
            "--cache".as_ref(),
            d("cache").as_os_str(),
            "--depfile".as_ref(),
            d("b.d").as_os_str(),
            "-o".as_ref(),
            d("b.ovl").as_os_str(),
        ],
    ));
    assert!(std::fs::read(d("a.ovl")).unwrap() == std::fs::read(d("b.ovl")).unwrap());
    let deps = std::fs::read_to_string(d("b.d")).unwrap();
    let tag = d("cache").join("tags").join(reg.addr()).join("apps/os/v1");
    assert!(tag.exists(), "{}", tag.display());
    assert!(
        deps.contains(&tag.display().to_string().replace(':', "\\:")),
        "{deps}"
    );
}

/// A two-layer chain under a key pushed as `REGISTRY/apps/NAME:v1`, with
/// the pairs it was made from and an empty cache's path.
struct Pushed {
    t: tempfile::TempDir,
    p: Pair,
    p2: Pair,
    key: PathBuf,
    l1: PathBuf,
    r: String,
    cache: PathBuf,
}

fn pushed_chain(reg: &oci::Registry, name: &str) -> Pushed {
    let t = tempfile::tempdir().unwrap();
    let (p, key) = setup_with(t.path(), &PairSpec::default());
    let (l1, l2, p2) = two_layers(t.path(), &p, &key);
    let r = format!("{}/apps/{name}:v1", reg.addr());
    ok(push(&r, &[&l1, &l2]));
    let cache = t.path().join("cache");
    Pushed {
        t,
        p,
        p2,
        key,
        l1,
        r,
        cache,
    }
}

/// `kimberlize cache add-base` (prints the identity).
fn add_base(cache: &Path, vm: &Path) -> Output {
    let mut c = Command::new(common::bin("kimberlize"));
    c.args(["cache", "add-base", "-q", "--cache"])
        .arg(cache)
        .arg(vm);
    run(&mut c)
}

/// `dekimberlize --from REF` without --base: the cache's base.
fn apply_from_cached_base(r: &str, cache: &Path, key: Option<&Path>, out: &Path) -> Output {
    let mut c = Command::new(common::bin("dekimberlize"));
    c.args(["-q", "--no-sync", "--from", r, "--cache"])
        .arg(cache)
        .arg("-o")
        .arg(out);
    if let Some(k) = key {
        c.arg("-k").arg(k);
    }
    run(&mut c)
}

/// Every file of VM directory `a` equals `b`'s, the manifest included.
fn identical_dirs(a: &Path, b: &Path) {
    let names = |d: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names(a), names(b));
    for n in names(a) {
        assert!(
            std::fs::read(a.join(&n)).unwrap() == std::fs::read(b.join(&n)).unwrap(),
            "{n:?} differs"
        );
    }
}

/// A base kept in the cache by identity: `dekimberlize --from` without
/// --base finds it (an encrypted chain, through its keyed commitment) and
/// writes the launch VM the --base path writes, byte for byte; a cache
/// without the base says which one it needs (for an unencrypted chain,
/// its identity) and exits 7.
#[test]
fn from_finds_the_base_in_the_cache() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let Pushed {
        t,
        p,
        p2,
        key,
        r,
        cache,
        ..
    } = pushed_chain(&reg, "bases");
    // Before the base is added: a clear error, nothing written.
    let out0 = t.path().join("out0");
    let o = apply_from_cached_base(&r, &cache, Some(&key), &out0);
    assert_eq!(code(&o), exit::VMDIR as i32, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("kimberlize cache add-base"),
        "{}",
        stderr(&o)
    );
    assert!(!out0.exists());

    let o = ok(add_base(&cache, &p.base));
    let id = String::from_utf8(o.stdout).unwrap().trim().to_string();
    assert_eq!(id.len(), 64, "{id}");
    assert!(cache.join("bases").join(&id).join("manifest.json").exists());
    // A second base does not confuse the lookup.
    ok(add_base(&cache, &p2.base));
    let out = t.path().join("out");
    ok(apply_from_cached_base(&r, &cache, Some(&key), &out));
    same_vm(&out, &p2.launch);
    let out_base = t.path().join("out-base");
    ok(apply_from(&p.base, &r, &cache, &key, &out_base));
    identical_dirs(&out, &out_base);
    // --base still wins: a wrong one is refused even though the cache
    // holds the right one.
    let o = apply_from(&p2.base, &r, &cache, &key, &t.path().join("out-wrong"));
    assert_eq!(code(&o), exit::WRONG_BASE as i32, "{}", stderr(&o));

    // Unencrypted: the error names the base's identity.
    let plain = t.path().join("plain.ovl");
    ok(common::diff(
        &p.base,
        &p.launch,
        &plain,
        &["--no-encrypt".as_ref()],
    ));
    let rp = format!("{}/apps/plain:v1", reg.addr());
    ok(push(&rp, &[&plain]));
    let empty = t.path().join("empty-cache");
    let o = apply_from_cached_base(&rp, &empty, None, &t.path().join("out-plain"));
    assert_eq!(code(&o), exit::VMDIR as i32, "{}", stderr(&o));
    assert!(stderr(&o).contains(&id), "{}", stderr(&o));
    let o = apply_from_cached_base(&rp, &cache, None, &t.path().join("out-plain"));
    assert_eq!(code(&o), 0, "{}", stderr(&o));
    same_vm(&t.path().join("out-plain"), &p.launch);
}

/// Attack: a base modified in the cache after it was added is refused
/// before anything is written (every digest is checked again when a base
/// is used), removed from the cache, and reported (exit 11); adding it
/// again brings it back.
#[test]
fn a_tampered_base_in_the_cache_is_refused() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let Pushed {
        t,
        p,
        p2,
        key,
        r,
        cache,
        ..
    } = pushed_chain(&reg, "tb");
    ok(fetch(&cache, &r, &["-q"]));
    let o = ok(add_base(&cache, &p.base));
    let id = String::from_utf8(o.stdout).unwrap().trim().to_string();
    let dir = cache.join("bases").join(&id);
    // One byte of every component file, where the first layer keeps the
    // base's bytes or not: the check must not depend on where.
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        if path.file_name().unwrap() == "manifest.json" {
            continue;
        }
        let len = size(&path);
        if len == 0 {
            continue;
        }
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"\xa5", len - 1).unwrap();
    }
    let out = t.path().join("out");
    let o = apply_from_cached_base(&r, &cache, Some(&key), &out);
    assert_eq!(code(&o), exit::TAMPERED as i32, "{}", stderr(&o));
    assert!(stderr(&o).contains(&id), "{}", stderr(&o));
    assert!(!out.exists());
    assert!(!dir.exists());
    assert!(common::temps(&t.path().join("cache/bases")).is_empty());
    // Added again, it is used.
    ok(add_base(&cache, &p.base));
    ok(apply_from_cached_base(&r, &cache, Some(&key), &out));
    same_vm(&out, &p2.launch);
}

/// Four adds of the same base at once: every one succeeds with the same
/// identity, one copy is kept, nothing temporary is left, and it verifies.
#[test]
fn concurrent_adds_of_a_base_are_safe() {
    let t = tempfile::tempdir().unwrap();
    let (p, _) = setup_with(t.path(), &PairSpec::default());
    let cache = t.path().join("cache");
    let kids: Vec<_> = (0..4)
        .map(|_| {
            Command::new(common::bin("kimberlize"))
                .args(["cache", "add-base", "-q", "--cache"])
                .arg(&cache)
                .arg(&p.base)
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for k in kids {
        let o = k.wait_with_output().unwrap();
        assert_eq!(code(&o), 0, "{}", stderr(&o));
        ids.push(String::from_utf8(o.stdout).unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let names: Vec<_> = std::fs::read_dir(cache.join("bases"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, [ids[0].trim()]);
    identical_dirs(&cache.join("bases").join(ids[0].trim()), &p.base);
}

/// Quota eviction and gc leave bases alone; `cache list` shows chains,
/// tags, pins and bases; `cache remove-base` removes one.
#[test]
fn quota_eviction_leaves_bases() {
    let Some(reg) = oci::Registry::start() else {
        return;
    };
    let Pushed {
        t,
        p,
        p2,
        key,
        l1,
        r,
        cache,
    } = pushed_chain(&reg, "q");
    ok(fetch(&cache, &r, &["-q"]));
    let id = String::from_utf8(ok(add_base(&cache, &p.base)).stdout).unwrap();
    let id = id.trim();
    let list = |cache: &Path| {
        let mut c = Command::new(common::bin("kimberlize"));
        c.args(["cache", "list", "--cache"]).arg(cache);
        String::from_utf8(ok(run(&mut c)).stdout).unwrap()
    };
    let l = list(&cache);
    assert!(l.contains("2 layers") && l.contains("apps/q:v1"), "{l}");
    assert!(l.contains(id), "{l}");
    let mut c = Command::new(common::bin("kimberlize"));
    c.args(["gc", "-q", "--quota", "0", "--cache"]).arg(&cache);
    ok(run(&mut c));
    assert!(!cached(&cache, &l1).exists());
    let l = list(&cache);
    assert!(l.contains("chains (0") && l.contains(id), "{l}");
    // Still usable: the chain comes back from the registry, the base from
    // the cache.
    let out = t.path().join("out");
    ok(apply_from_cached_base(&r, &cache, Some(&key), &out));
    same_vm(&out, &p2.launch);
    let mut c = Command::new(common::bin("kimberlize"));
    c.args(["cache", "remove-base", "-q", id, "--cache"])
        .arg(&cache);
    ok(run(&mut c));
    assert!(!cache.join("bases").join(id).exists());
    let o = {
        let mut c = Command::new(common::bin("kimberlize"));
        c.args(["cache", "remove-base", id, "--cache"]).arg(&cache);
        run(&mut c)
    };
    assert_eq!(code(&o), exit::ERROR as i32, "{}", stderr(&o));
}
