//! Control socket round trip (real KVM).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kimberley_vmm::control;
use serde_json::{json, Value};

struct Client {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Client {
    fn connect(p: &std::path::Path) -> Client {
        for _ in 0..500 {
            if let Ok(s) = UnixStream::connect(p) {
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                return Client {
                    r: BufReader::new(s.try_clone().unwrap()),
                    w: s,
                };
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("cannot connect to {}", p.display());
    }

    fn call(&mut self, req: &str) -> Value {
        self.w.write_all(req.as_bytes()).unwrap();
        self.w.write_all(b"\n").unwrap();
        let mut line = String::new();
        self.r.read_line(&mut line).unwrap();
        serde_json::from_str(&line).unwrap()
    }
}

#[test]
fn control_round_trip() {
    if !kvm_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("ctl.sock");
    let vm = boot(32, &[]);
    let stop = Arc::new(AtomicBool::new(false));
    let snaps = Arc::new(Mutex::new(Vec::new()));
    let snaps2 = snaps.clone();
    let snapshot: control::SnapshotFn = Box::new(move |vm, d| {
        let state = vm.save(&d.join("memory.raw")).map_err(|e| e.to_string())?;
        std::fs::write(d.join("state.bin"), &state).map_err(|e| e.to_string())?;
        snaps2.lock().unwrap().push(d.to_path_buf());
        Ok(())
    });
    let (s2, sock2) = (stop.clone(), sock.clone());
    let server =
        std::thread::spawn(move || control::serve(vm, &sock2, snapshot, s2, Box::new(|_| {})));

    let mut c = Client::connect(&sock);
    let st = c.call(r#"{"cmd":"status"}"#);
    assert_eq!(st["ok"], true, "{st}");
    assert_eq!(st["status"], "running");
    assert_eq!(st["memory_size"], 32 << 20);

    let r =
        c.call(&json!({"cmd":"exec","script":"print one\nprint two\ncounter start"}).to_string());
    assert_eq!(r, json!({"ok": true, "status": 0, "output": "one\ntwo"}));
    let r = c.call(&json!({"cmd":"exec","script":"nonsense"}).to_string());
    assert_eq!(r["ok"], true);
    assert_eq!(r["status"], 1);
    assert_eq!(r["output"], "error 1: unknown command 'nonsense'");

    assert_eq!(c.call(r#"{"cmd":"pause"}"#)["ok"], true);
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "paused");
    let r = c.call(&json!({"cmd":"exec","script":"print x"}).to_string());
    assert_eq!(r["ok"], false);
    assert!(r["error"].as_str().unwrap().contains("paused"));
    assert_eq!(c.call(r#"{"cmd":"resume"}"#)["ok"], true);
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "running");

    let snapdir = dir.path().join("snap");
    let r = c.call(&json!({"cmd":"snapshot","dir":snapdir}).to_string());
    assert_eq!(r["ok"], true, "{r}");
    assert!(snapdir.join("memory.raw").exists() && snapdir.join("state.bin").exists());
    assert_eq!(snaps.lock().unwrap().len(), 1);
    assert_eq!(c.call(r#"{"cmd":"status"}"#)["status"], "running");

    // Failures answer ok:false and keep the connection.
    let r = c.call(r#"{"cmd":"fly"}"#);
    assert_eq!(r["ok"], false);
    assert!(r["error"].is_string());
    let r = c.call("not json");
    assert_eq!(r["ok"], false);

    // A second client works too.
    let mut c2 = Client::connect(&sock);
    assert_eq!(c2.call(r#"{"cmd":"status"}"#)["ok"], true);

    let r = c.call(r#"{"cmd":"stop"}"#);
    assert_eq!(r["ok"], true);
    let mut vm = server.join().unwrap().unwrap();
    assert!(vm.is_paused());
    assert!(!sock.exists());
    vm.resume().unwrap();
    let l = run_ok(&mut vm, "counter");
    assert!(l[0].starts_with("counter "));

    // The stop flag ends the server too.
    let stop = Arc::new(AtomicBool::new(false));
    let (s2, sock2) = (stop.clone(), sock.clone());
    let server = std::thread::spawn(move || {
        control::serve(
            vm,
            &sock2,
            Box::new(|_, _| Err("no".into())),
            s2,
            Box::new(|_| {}),
        )
    });
    let mut c = Client::connect(&sock);
    let r = c.call(&json!({"cmd":"snapshot","dir":dir.path().join("s2")}).to_string());
    assert_eq!(r, json!({"ok": false, "error": "no"}));
    stop.store(true, Ordering::SeqCst);
    let vm = server.join().unwrap().unwrap();
    assert!(vm.is_paused());
}
