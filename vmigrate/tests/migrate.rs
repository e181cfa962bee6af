//! Live migration end to end on real KVM: two processes on loopback
//! (`vmigrate run` as the source, `vmigrate recv` as the destination),
//! correctness shown through the guest, and the failure cases that must
//! leave the source guest running and intact. With KIMBERLEY_REQUIRE_KVM=1
//! these tests fail instead of skipping when /dev/kvm is missing.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[test]
fn idle_guest() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("");
    let recv_stats = s.p("recv.json");
    let st = migrate_ok_with(
        &mut s,
        &[],
        &[std::ffi::OsStr::new("--stats-json"), recv_stats.as_os_str()],
    );
    assert_eq!(st["throttled"], false);
    // Both JSON outputs carry their schema version (docs/JSON.md).
    assert_eq!(st["schema"], 1, "{st}");
    let rs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&recv_stats).unwrap()).unwrap();
    assert_eq!(rs["schema"], 1, "{rs}");
    let r0 = &st["per_round"][0];
    assert!(r0["zero_pages"].as_u64().unwrap() > 1000, "{r0}");
    // Zero pages never travel as 4 KiB: 64 MiB in well under 30 MiB.
    assert!(st["bytes_on_wire"].as_u64().unwrap() < 30 << 20, "{st}");
}

#[test]
fn shared_disk_is_not_copied() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("disk-write 2M 1M 7\n");
    let dir = s.t.path().to_path_buf();
    let st = migrate_ok_with(
        &mut s,
        &["--shared-disk"],
        &[std::ffi::OsStr::new("--shared-disk-dir"), dir.as_os_str()],
    );
    let blocks: u64 = st["per_round"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["disk_blocks"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(blocks, 0, "a shared disk travelled: {st}");
    // Both hosts see the same file: here, the same inode.
    use std::os::unix::fs::MetadataExt;
    let a = std::fs::metadata(s.p("vm").join("disk0.raw")).unwrap();
    let b = std::fs::metadata(s.p("dst").join("disk0.raw")).unwrap();
    assert_eq!((a.dev(), a.ino()), (b.dev(), b.ino()));
}

#[test]
fn dirtying_guest() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("dirty hot 4M\n");
    let st = migrate_ok(&mut s, &["--max-bandwidth", "40M"]);
    assert!(st["rounds"].as_u64().unwrap() >= 2, "{st}");
    // The pause window is accounted for part by part (issue 7, finding
    // 16), and so is the prediction that ended pre-copy.
    let parts = &st["downtime_parts"];
    let names = [
        "pause_ms",
        "state_ms",
        "dirty_fetch_ms",
        "final_pages_ms",
        "state_send_ms",
        "receiver_apply_ms",
        "receiver_hash_ms",
        "receiver_commit_ms",
        "restore_ms",
        "network_ms",
    ];
    let sum: f64 = names
        .iter()
        .map(|n| parts[n].as_f64().unwrap_or_else(|| panic!("no {n}: {st}")))
        .sum();
    let down = st["downtime_ms"].as_f64().unwrap();
    assert!(
        (sum - down).abs() <= 0.01 * down + 0.01 || parts["network_ms"] == 0.0,
        "parts {sum} vs downtime {down}: {st}"
    );
    assert!(
        parts["network_ms"].as_f64().unwrap() <= 0.5 * down + 2.0,
        "most of the window is unaccounted for: {st}"
    );
    let e = &st["downtime_estimate"];
    let esum: f64 = [
        "source_ms",
        "final_pages_ms",
        "state_send_ms",
        "receiver_hash_ms",
        "receiver_ms",
        "round_trip_ms",
    ]
    .iter()
    .map(|n| e[n].as_f64().unwrap())
    .sum();
    assert!(
        (esum - e["total_ms"].as_f64().unwrap()).abs() < 0.01,
        "{st}"
    );
    // The receiver's own fixed cost was measured, not assumed.
    assert!(
        st["measured_costs"]["receiver_fixed_ms"].as_f64().unwrap() > 0.0,
        "{st}"
    );
}

#[test]
fn fast_dirtier_converges_by_throttling() {
    if !kvm() {
        return;
    }
    // The guest dirties its 8 MiB hot region at twice what the link
    // carries; the test guest's `dirty` job drops work missed while its
    // vCPU is throttled (like a CPU-bound workload), so throttling must
    // bring the migration to convergence.
    let mut s = Setup::new("dirty hot 16M\n");
    let st = migrate_ok(&mut s, &["--max-bandwidth", "8M", "--downtime-ms", "100"]);
    assert_eq!(st["throttled"], true, "{st}");
    assert!(st["max_throttle_pct"].as_u64().unwrap() >= 20, "{st}");
    assert_eq!(st["stop_reason"], "converged", "{st}");
}

#[test]
fn receiver_killed_mid_round() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("");
    let before = look(&s.src_sock);
    let (mut dst, addr) = s.recv(&s.key.clone(), "dst");
    let t = std::thread::spawn({
        let sock = s.src_sock.clone();
        let key = s.key.clone();
        move || {
            Command::new(bin("vmigrate"))
                .arg("send")
                .arg("--control")
                .arg(sock)
                .args(["--to", &addr, "--max-bandwidth", "2M", "-k"])
                .arg(key)
                .stdin(Stdio::null())
                .output()
                .unwrap()
        }
    });
    std::thread::sleep(Duration::from_millis(1500));
    dst.0.kill().unwrap();
    let o = t.join().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("keeps running on the source"));
    s.source_intact(&before);
    assert!(!s.p("dst").exists());
}

#[test]
fn wrong_key() {
    if !kvm() {
        return;
    }
    let mut s = Setup::new("");
    let before = look(&s.src_sock);
    let other = s.p("other.key");
    ok(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(&other)
        .output()
        .unwrap());
    let (_dst, addr) = s.recv(&other, "dst");
    let o = s.send(&addr, &[]);
    assert_eq!(
        o.status.code(),
        Some(4),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stderr).contains("authentication failed"));
    s.source_intact(&before);
    assert!(!s.p("dst").exists());
}

/// A receiver stopped by SIGINT/SIGTERM before a migration arrived exits
/// 130/143 and leaves no output.
#[test]
fn interrupted_receiver_exits_with_the_signal_code() {
    let t = tempfile::tempdir().unwrap();
    let key = t.path().join("key");
    keygen(&key);
    for (sig, code, name) in [
        (libc::SIGINT, kimberley_cli::exit::INTERRUPTED, "SIGINT"),
        (libc::SIGTERM, kimberley_cli::exit::TERMINATED, "SIGTERM"),
    ] {
        let out = t.path().join("dst");
        let (mut r, _addr) = receiver(&key, &out, &[], Duration::from_secs(10));
        r.signal(sig);
        let st = r.wait_exit(Duration::from_secs(30));
        assert_eq!(st.code(), Some(code as i32), "{}", r.stderr());
        // (Waits for the reader of its stderr to catch up.)
        let line = r.line_starting("error:", Duration::from_secs(10));
        assert!(
            line.ends_with(&format!("(interrupted by {name})")),
            "{line}"
        );
        assert!(!out.exists());
    }
}
