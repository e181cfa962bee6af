//! Shared by the kimberlized suites: the tools as processes (one home
//! with the vmm and dekimberlize suites), certificates made with rcgen,
//! a daemon process and its log events, a test app overlay.

#![allow(dead_code)]

pub mod capture;
#[path = "../../../vmm/tests/common/ctl.rs"]
pub mod ctl;
#[path = "../../../vmm/tests/common/tools.rs"]
pub mod tools;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kimberlized::client::Client;
use kimberlized::tls;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};
use serde_json::Value;

pub use tools::{build_app, Logged};

/// A workspace binary: every binary is built into the same directory.
pub fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_kimberlized")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace binaries first (cargo build --bins)",
        p.display()
    );
    p
}

/// True if KVM tests can run; panics if they must (KIMBERLEY_REQUIRE_KVM=1).
pub fn kvm() -> bool {
    kimberley_vmm::kvm_for_tests()
}

/// One VM-running test at a time in this process (the machine is shared).
pub fn serial() -> MutexGuard<'static, ()> {
    static M: Mutex<()> = Mutex::new(());
    M.lock().unwrap_or_else(|e| e.into_inner())
}

/// A certificate authority made for a test.
pub struct Ca {
    pub pem: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// A new CA named `name`, its certificate at `dir/NAME-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let cert = p.self_signed(&key).unwrap();
        let pem = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&pem, cert.pem()).unwrap();
        Ca {
            pem,
            issuer: Issuer::new(p, key),
        }
    }

    /// A leaf certificate for `names` (DNS names or IP addresses) signed
    /// by this CA: `(cert, key)` PEM files `dir/NAME.pem`, `dir/NAME.key`.
    pub fn issue(
        &self,
        dir: &Path,
        name: &str,
        names: &[&str],
        client: bool,
    ) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
        p.distinguished_name.push(DnType::CommonName, name);
        p.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }
}

/// Everything a daemon and a device need: a CA for each side's
/// certificates (the operator's, one CA here), the daemon's and a
/// device's certificates.
pub struct Pki {
    pub ca: Ca,
    pub server: (PathBuf, PathBuf),
    pub device: (PathBuf, PathBuf),
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        let ca = Ca::new(dir, "operator");
        let server = ca.issue(
            dir,
            "cloudlet",
            &["127.0.0.1", "cloudlet.local", "10.77.0.1"],
            false,
        );
        let device = ca.issue(dir, "device", &["device"], true);
        Pki { ca, server, device }
    }

    /// The device's TLS identity.
    pub fn device_id(&self) -> tls::Identity {
        tls::Identity {
            cert: self.device.0.clone(),
            key: self.device.1.clone(),
            ca: Some(self.ca.pem.clone()),
            pins: vec![],
        }
    }
}

/// A running daemon.
pub struct Daemon {
    pub proc: Logged,
    pub addr: SocketAddr,
    pub state: PathBuf,
}

impl Daemon {
    /// `kimberlized --listen 127.0.0.1:0 --no-mdns` holding `base`, its
    /// state in `dir/state`, with `extra` arguments.
    pub fn start(dir: &Path, pki: &Pki, base: &Path, extra: &[&str]) -> Daemon {
        let mut c = Command::new(bin("kimberlized"));
        c.args(["--listen", "127.0.0.1:0", "--no-mdns", "--state-dir"])
            .arg(dir.join("state"))
            .arg("--base")
            .arg(base)
            .arg("--cert")
            .arg(&pki.server.0)
            .arg("--key")
            .arg(&pki.server.1)
            .arg("--client-ca")
            .arg(&pki.ca.pem)
            .args(extra);
        Daemon::spawn(&mut c, dir)
    }

    /// Spawns `cmd` (a kimberlized command whose state is `dir/state`) and
    /// waits for its `listening` line.
    pub fn spawn(cmd: &mut Command, dir: &Path) -> Daemon {
        let proc = Logged::spawn(cmd, "kimberlized");
        let l = event(&proc, "listening", Duration::from_secs(30));
        let port = l["port"].as_u64().unwrap() as u16;
        Daemon {
            proc,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            state: dir.join("state"),
        }
    }

    /// A library client with `id`, for 127.0.0.1.
    pub fn client(&self, id: &tls::Identity) -> Client {
        Client::new(
            tls::client_config(id).unwrap(),
            vec![self.addr],
            tls::server_name("127.0.0.1").unwrap(),
        )
    }

    /// The session directories in the state directory.
    pub fn session_dirs(&self) -> Vec<String> {
        std::fs::read_dir(self.state.join("sessions"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    }

    /// Log events named `name` so far.
    pub fn events(&self, name: &str) -> Vec<Value> {
        events(&self.proc, name)
    }
}

/// The JSON log lines of `p` whose event is `name`.
pub fn events(p: &Logged, name: &str) -> Vec<Value> {
    p.err
        .lock()
        .unwrap()
        .iter()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["event"] == name)
        .collect()
}

/// Waits up to `within` for a log line of `p` with event `name`.
pub fn event(p: &Logged, name: &str, within: Duration) -> Value {
    let t = Instant::now();
    loop {
        if let Some(v) = events(p, name).pop() {
            return v;
        }
        assert!(
            t.elapsed() < within,
            "no {name:?} event within {within:?}: {}",
            p.stderr()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The test app: a 1 MiB random region and a running counter.
pub const INSTALL: &str = "fill app 1M 7 random\ncounter start\n";

/// In `dir`: `key`, `base` (32 MiB memory, 4 MiB disk) and `app.ovl`.
pub fn app(dir: &Path) {
    build_app(dir, "32M", "4M", INSTALL, &[]);
}

/// The overlay key of [`app`].
pub fn key_of(dir: &Path) -> [u8; 32] {
    let text = std::fs::read_to_string(dir.join("key")).unwrap();
    let k = kimberley_formats::crypto::keyfile::parse(text.as_bytes()).unwrap();
    k
}

/// What the web app of [`linux_web_app`] serves on its guest port 8080.
pub const WEB_MARKER: &str = "kimberley-forwarded-app";

/// In `dir`: `key`, `base` (a Linux guest under QEMU from `kernel` and
/// `initrd`, 256 MiB, user networking) and `app.ovl`, whose launch VM runs
/// busybox httpd on port 8080 serving [`WEB_MARKER`].
pub fn linux_web_app(dir: &Path, kernel: &Path, initrd: &Path) {
    let ok = |c: &mut Command| {
        let o = c.stdin(std::process::Stdio::null()).output().unwrap();
        assert!(
            o.status.success(),
            "{c:?}: {}",
            String::from_utf8_lossy(&o.stderr)
        );
    };
    ok(Command::new(bin("kimberlize"))
        .args(["keygen", "-o"])
        .arg(dir.join("key")));
    ok(Command::new(bin("kimberlize"))
        .args(["base", "--qemu", "--memory", "256M", "--net", "user"])
        // The machine may be shared with other QEMU guests (TCG where KVM
        // is nested): more than the default 30 s to boot.
        .args(["--timeout", "180", "--kernel"])
        .arg(kernel)
        .arg("--initrd")
        .arg(initrd)
        .arg("-o")
        .arg(dir.join("base")));
    std::fs::write(
        dir.join("install.sh"),
        format!(
            "set -e\nmkdir -p /www\necho {WEB_MARKER} > /www/index.html\nhttpd -p 8080 -h /www\n"
        ),
    )
    .unwrap();
    std::fs::write(dir.join("resume.sh"), "sleep 1\n").unwrap();
    ok(Command::new(bin("kimberlize"))
        .args(["build", "-q", "--base"])
        .arg(dir.join("base"))
        .arg("--install")
        .arg(dir.join("install.sh"))
        .arg("--resume")
        .arg(dir.join("resume.sh"))
        .arg("-k")
        .arg(dir.join("key"))
        .arg("-o")
        .arg(dir.join("app.ovl")));
}

/// Shared log, for tests that collect output from threads.
pub type Shared<T> = Arc<Mutex<T>>;
