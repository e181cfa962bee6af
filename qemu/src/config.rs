//! What a QEMU VM is made of ([`MachineConfig`]) and the exact
//! `qemu-system-x86_64` command line for it (pure).

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use kimberley_formats::vmdir::MachineSpec;
use kimberley_machine::PortForward;

use crate::error::{Error, Result};
use crate::BACKEND;

/// The QEMU program (looked up on `PATH`).
pub const QEMU: &str = "qemu-system-x86_64";
/// The machine type pinned for new VMs (QEMU 7.2's `pc`).
pub const DEFAULT_MACHINE_TYPE: &str = "pc-i440fx-7.2";
/// The kernel command line when none is given: the console on the first
/// serial port, quiet, and a panic that stops the VM (with `-no-reboot`).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 quiet panic=-1";
/// The virtio-serial port name qemu-guest-agent listens on.
pub const AGENT_PORT: &str = "org.qemu.guest_agent.0";

/// Smallest and largest guest RAM.
pub const MIN_MEMORY: u64 = 64 << 20;
/// Largest guest RAM.
pub const MAX_MEMORY: u64 = 1 << 40;

/// The accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// QEMU's own binary translation.
    Tcg,
    /// Hardware-assisted KVM.
    Kvm,
}

impl Accel {
    /// As QEMU and the manifest spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Tcg => "tcg",
            Accel::Kvm => "kvm",
        }
    }

    /// Inverse of [`Accel::as_str`].
    pub fn parse(s: &str) -> Option<Accel> {
        match s {
            "tcg" => Some(Accel::Tcg),
            "kvm" => Some(Accel::Kvm),
            _ => None,
        }
    }

    /// The CPU model used with it: `qemu64` under TCG (QEMU's default,
    /// migration-stable), `host` under KVM.
    pub fn default_cpu(self) -> &'static str {
        match self {
            Accel::Tcg => "qemu64",
            Accel::Kvm => "host",
        }
    }
}

/// A QEMU VM: everything its command line is made from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MachineConfig {
    /// The kernel (`-kernel`).
    pub kernel: PathBuf,
    /// Its initial RAM disk (`-initrd`).
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Guest RAM in bytes (a multiple of 1 MiB).
    pub memory_size: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Raw disk images, virtio-blk in this order.
    pub disks: Vec<PathBuf>,
    /// The accelerator.
    pub accel: Accel,
    /// The pinned machine type (e.g. `pc-i440fx-7.2`).
    pub machine_type: String,
    /// The CPU model.
    pub cpu: String,
    /// User networking (a virtio-net NIC); `None`: no NIC.
    pub net: Option<UserNet>,
}

/// QEMU user networking of a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct UserNet {
    /// Host ports forwarded into the guest.
    pub forwards: Vec<PortForward>,
    /// The guest reaches the host and the outside network; without it
    /// (`restrict=on`) only the forwarded ports connect it to anything.
    pub outside: bool,
}

/// How one QEMU process of a [`MachineConfig`] is started.
#[derive(Debug, Clone, Copy)]
pub struct Launch<'a> {
    /// The file that is the guest's RAM.
    pub memory_file: &'a Path,
    /// `share=on` (the file is written: it *is* the RAM) or off (mapped
    /// privately: a restore that leaves the file as it is).
    pub share: bool,
    /// The QMP socket QEMU listens on.
    pub qmp: &'a Path,
    /// The guest agent's socket QEMU listens on.
    pub qga: &'a Path,
    /// Where QEMU writes the serial console (the write end of a pipe we
    /// read, as `/proc/self/fd/N`): not its stdout, where QEMU prints
    /// messages of its own.
    pub console: &'a Path,
    /// Wait for the device state (`-incoming defer`, paused: `-S`).
    pub incoming: bool,
    /// QEMU's image locking on the disks; off for a machine receiving a
    /// live migration on shared disks (the hand-over, not the lock, keeps
    /// one writer: the source may have to run on before COMMIT).
    pub lock_disks: bool,
    /// Keep the disks' page cache when QEMU activates them at the end of an
    /// incoming migration (`file.drop-cache=off`): only where that cache
    /// cannot be stale (see [`Vm`](crate::Vm)'s incoming start).
    pub keep_disk_cache: bool,
}

impl MachineConfig {
    /// Checks what QEMU would otherwise refuse with a less clear message.
    pub fn validate(&self) -> Result<()> {
        let bad = |s: String| Err(Error::Config(s));
        if self.memory_size < MIN_MEMORY
            || self.memory_size > MAX_MEMORY
            || !self.memory_size.is_multiple_of(1 << 20)
        {
            return bad(format!(
                "memory size {} is not a multiple of 1 MiB between 64 MiB and 1 TiB",
                self.memory_size
            ));
        }
        if self.vcpus == 0 || self.vcpus > 255 {
            return bad(format!("{} vCPUs: 1 to 255", self.vcpus));
        }
        if self.cmdline.len() > 4096 || self.cmdline.chars().any(char::is_control) {
            return bad(
                "the kernel command line must be at most 4096 bytes without control characters"
                    .into(),
            );
        }
        for (what, s) in [
            ("machine type", &self.machine_type),
            ("CPU model", &self.cpu),
        ] {
            if s.is_empty()
                || !s
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.+".contains(&b))
            {
                return bad(format!("{what} {s:?} is not a plain name"));
            }
        }
        if self.disks.len() > 64 {
            return bad("more than 64 disks".into());
        }
        Ok(())
    }

    /// The devices this VM has, in the order QEMU creates them (the
    /// manifest's `machine.devices`): restoring needs exactly these.
    pub fn devices(&self) -> Vec<String> {
        let mut d = vec![
            "isa-serial".to_string(),
            "virtio-serial-pci".to_string(),
            format!("virtserialport:{AGENT_PORT}"),
        ];
        d.extend((0..self.disks.len()).map(|i| format!("virtio-blk-pci:disk{i}")));
        if self.net.is_some() {
            d.push("virtio-net-pci:user".into());
        }
        d
    }

    /// The manifest's machine description of this VM, run by QEMU
    /// `version`.
    pub fn spec(&self, version: &str) -> MachineSpec {
        MachineSpec {
            backend: BACKEND.into(),
            version: version.into(),
            machine_type: self.machine_type.clone(),
            accel: self.accel.as_str().into(),
            cpu: self.cpu.clone(),
            cmdline: self.cmdline.clone(),
            devices: self.devices(),
        }
    }

    /// The configuration a VM directory's machine description stands for,
    /// with its files at the given paths; refuses a description this
    /// backend did not write.
    #[allow(clippy::too_many_arguments)]
    pub fn from_spec(
        spec: &MachineSpec,
        memory_size: u64,
        vcpus: u32,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        disks: Vec<PathBuf>,
        forwards: Vec<PortForward>,
        outside: bool,
    ) -> Result<MachineConfig> {
        if spec.backend != BACKEND {
            return Err(Error::Unsupported(format!(
                "the VM directory is for the {:?} backend, not {BACKEND}",
                spec.backend
            )));
        }
        let accel = Accel::parse(&spec.accel)
            .ok_or_else(|| Error::Unsupported(format!("unknown accelerator {:?}", spec.accel)))?;
        let has_net = spec.devices.iter().any(|d| d == "virtio-net-pci:user");
        // QEMU 7.2's user networking refuses `hostfwd=tcp:[ADDR]:...` for
        // an IPv6 ADDR ("Bad host address") only once it starts.
        if let Some(f) = forwards.iter().find(|f| f.host_addr.is_ipv6()) {
            return Err(Error::Unsupported(format!(
                "QEMU forwards guest ports from IPv4 host addresses only, not {}",
                f.host_addr
            )));
        }
        if !has_net && !forwards.is_empty() {
            return Err(Error::Unsupported(
                "the VM has no network card: ports cannot be forwarded into it".into(),
            ));
        }
        let cfg = MachineConfig {
            kernel,
            initrd,
            cmdline: spec.cmdline.clone(),
            memory_size,
            vcpus,
            disks,
            accel,
            machine_type: spec.machine_type.clone(),
            cpu: spec.cpu.clone(),
            net: has_net.then_some(UserNet { forwards, outside }),
        };
        if cfg.devices() != spec.devices {
            return Err(Error::Unsupported(format!(
                "the VM's devices {:?} are not what this backend makes for it ({:?})",
                spec.devices,
                cfg.devices()
            )));
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The exact argument vector (without the program) of one QEMU process.
    pub fn argv(&self, l: &Launch<'_>) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut arg = |s: OsString| a.push(s);
        let s = |x: &str| OsString::from(x);
        for x in [
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ] {
            arg(s(x));
        }
        arg(s("-machine"));
        arg(s(&format!(
            "{},accel={},memory-backend=ram0",
            self.machine_type,
            self.accel.as_str()
        )));
        arg(s("-cpu"));
        arg(s(&self.cpu));
        arg(s("-smp"));
        arg(s(&self.vcpus.to_string()));
        arg(s("-m"));
        arg(s(&format!("{}M", self.memory_size >> 20)));
        arg(s("-object"));
        arg(opt(
            &format!(
                "memory-backend-file,id=ram0,size={},mem-path=",
                self.memory_size
            ),
            l.memory_file,
            if l.share { ",share=on" } else { ",share=off" },
        ));
        arg(s("-kernel"));
        arg(self.kernel.clone().into_os_string());
        if let Some(i) = &self.initrd {
            arg(s("-initrd"));
            arg(i.clone().into_os_string());
        }
        arg(s("-append"));
        arg(s(&self.cmdline));
        // The serial console into a pipe we read.
        arg(s("-chardev"));
        arg(opt("file,id=console0,path=", l.console, ""));
        arg(s("-serial"));
        arg(s("chardev:console0"));
        arg(s("-device"));
        arg(s("virtio-serial-pci,id=vser0"));
        arg(s("-chardev"));
        arg(opt("socket,id=qga0,path=", l.qga, ",server=on,wait=off"));
        arg(s("-device"));
        arg(s(&format!(
            "virtserialport,bus=vser0.0,chardev=qga0,name={AGENT_PORT}"
        )));
        for (i, d) in self.disks.iter().enumerate() {
            arg(s("-drive"));
            arg(opt(
                "file=",
                d,
                &format!(
                    ",format=raw,if=none,id=disk{i},discard=unmap,cache=writeback{}{}",
                    if l.lock_disks {
                        ""
                    } else {
                        ",file.locking=off"
                    },
                    if l.keep_disk_cache {
                        ",file.drop-cache=off"
                    } else {
                        ""
                    }
                ),
            ));
            arg(s("-device"));
            arg(s(&format!("virtio-blk-pci,drive=disk{i},discard=on")));
        }
        if let Some(net) = &self.net {
            let mut n = "user,id=net0".to_string();
            if !net.outside {
                n.push_str(",restrict=on");
            }
            for f in &net.forwards {
                let addr = match f.host_addr {
                    std::net::IpAddr::V4(v4) => v4.to_string(),
                    std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                };
                n.push_str(&format!(
                    ",hostfwd=tcp:{addr}:{}-:{}",
                    f.host_port, f.guest_port
                ));
            }
            arg(s("-netdev"));
            arg(s(&n));
            arg(s("-device"));
            arg(s("virtio-net-pci,netdev=net0,romfile="));
        }
        arg(s("-chardev"));
        arg(opt("socket,id=qmp0,path=", l.qmp, ",server=on,wait=off"));
        arg(s("-mon"));
        arg(s("chardev=qmp0,mode=control"));
        if l.incoming {
            arg(s("-S"));
            arg(s("-incoming"));
            arg(s("defer"));
        }
        a
    }
}

/// `prefix` + `path` with its commas doubled (QEMU's option escaping) +
/// `suffix`.
fn opt(prefix: &str, path: &Path, suffix: &str) -> OsString {
    let mut v = prefix.as_bytes().to_vec();
    for &b in path.as_os_str().as_bytes() {
        v.push(b);
        if b == b',' {
            v.push(b',');
        }
    }
    v.extend_from_slice(suffix.as_bytes());
    OsString::from_vec(v)
}

/// `s` quoted for `/bin/sh` (QEMU runs `exec:` migration URIs with it).
pub fn shell_quote(s: &Path) -> String {
    let s = s.to_string_lossy();
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> MachineConfig {
        MachineConfig {
            kernel: "/k/vmlinuz".into(),
            initrd: Some("/k/initrd".into()),
            cmdline: DEFAULT_CMDLINE.into(),
            memory_size: 256 << 20,
            vcpus: 1,
            disks: vec!["/d/disk0.raw".into(), "/d/a,b.raw".into()],
            accel: Accel::Tcg,
            machine_type: DEFAULT_MACHINE_TYPE.into(),
            cpu: "qemu64".into(),
            net: Some(UserNet {
                forwards: vec![
                    "8080:80".parse().unwrap(),
                    "127.0.0.2:2222:22".parse().unwrap(),
                ],
                outside: false,
            }),
        }
    }

    fn argv(c: &MachineConfig, share: bool, incoming: bool) -> Vec<String> {
        c.argv(&Launch {
            memory_file: Path::new("/v/memory.raw"),
            share,
            qmp: Path::new("/w/qmp.sock"),
            qga: Path::new("/w/qga.sock"),
            console: Path::new("/proc/self/fd/9"),
            incoming,
            lock_disks: true,
            keep_disk_cache: false,
        })
        .into_iter()
        .map(|s| s.into_string().unwrap())
        .collect()
    }

    #[test]
    fn a_live_migration_receiver_takes_no_image_locks() {
        let drives = |keep_disk_cache: bool| -> Vec<String> {
            cfg()
                .argv(&Launch {
                    memory_file: Path::new("/v/memory.raw"),
                    share: true,
                    qmp: Path::new("/w/qmp.sock"),
                    qga: Path::new("/w/qga.sock"),
                    console: Path::new("/proc/self/fd/9"),
                    incoming: true,
                    lock_disks: false,
                    keep_disk_cache,
                })
                .into_iter()
                .map(|s| s.into_string().unwrap())
                .filter(|x| x.starts_with("file="))
                .collect()
        };
        let d = drives(false);
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|d| d.ends_with(",file.locking=off")), "{d:?}");
        let d = drives(true);
        assert!(
            d.iter()
                .all(|d| d.ends_with(",file.locking=off,file.drop-cache=off")),
            "{d:?}"
        );
        let plain = argv(&cfg(), true, true).join(" ");
        assert!(!plain.contains("locking") && !plain.contains("drop-cache"));
    }

    #[test]
    fn the_command_line_is_exactly_this() {
        let a = argv(&cfg(), true, false).join(" ");
        assert_eq!(
            a,
            "-nodefaults -no-user-config -display none -no-reboot \
             -machine pc-i440fx-7.2,accel=tcg,memory-backend=ram0 -cpu qemu64 -smp 1 -m 256M \
             -object memory-backend-file,id=ram0,size=268435456,mem-path=/v/memory.raw,share=on \
             -kernel /k/vmlinuz -initrd /k/initrd -append console=ttyS0 quiet panic=-1 \
             -chardev file,id=console0,path=/proc/self/fd/9 -serial chardev:console0 \
             -device virtio-serial-pci,id=vser0 \
             -chardev socket,id=qga0,path=/w/qga.sock,server=on,wait=off \
             -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0 \
             -drive file=/d/disk0.raw,format=raw,if=none,id=disk0,discard=unmap,cache=writeback \
             -device virtio-blk-pci,drive=disk0,discard=on \
             -drive file=/d/a,,b.raw,format=raw,if=none,id=disk1,discard=unmap,cache=writeback \
             -device virtio-blk-pci,drive=disk1,discard=on \
             -netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80,hostfwd=tcp:127.0.0.2:2222-:22 \
             -device virtio-net-pci,netdev=net0,romfile= \
             -chardev socket,id=qmp0,path=/w/qmp.sock,server=on,wait=off \
             -mon chardev=qmp0,mode=control"
        );
    }

    #[test]
    fn a_restore_maps_privately_and_waits_paused_for_the_state() {
        let mut c = cfg();
        c.net = None;
        c.disks.clear();
        c.initrd = None;
        c.accel = Accel::Kvm;
        c.cpu = "host".into();
        let a = argv(&c, false, true);
        let j = a.join(" ");
        assert!(j.contains("accel=kvm"), "{j}");
        assert!(j.contains("mem-path=/v/memory.raw,share=off"), "{j}");
        assert!(j.ends_with("-S -incoming defer"), "{j}");
        assert!(
            !j.contains("-initrd") && !j.contains("-netdev") && !j.contains("-drive"),
            "{j}"
        );
        // The command line is one argument however many spaces it has.
        assert!(a.iter().any(|x| x == DEFAULT_CMDLINE));
    }

    #[test]
    fn devices_round_trip_through_the_machine_description() {
        let c = cfg();
        let spec = c.spec("7.2.19");
        assert_eq!(spec.backend, "qemu");
        spec.validate().unwrap();
        let back = MachineConfig::from_spec(
            &spec,
            c.memory_size,
            c.vcpus,
            c.kernel.clone(),
            c.initrd.clone(),
            c.disks.clone(),
            c.net.clone().unwrap().forwards,
            false,
        )
        .unwrap();
        assert_eq!(back, c);
        // The outside network is the restorer's choice, not the VM's.
        let open = MachineConfig::from_spec(
            &spec,
            c.memory_size,
            c.vcpus,
            c.kernel.clone(),
            c.initrd.clone(),
            c.disks.clone(),
            vec![],
            true,
        )
        .unwrap();
        let j = argv(&open, false, true).join(" ");
        assert!(j.contains("-netdev user,id=net0 "), "{j}");
        // Another device list, another backend, forwards without a NIC.
        let refused = |spec: &MachineSpec, forwards: Vec<PortForward>| {
            MachineConfig::from_spec(
                spec,
                c.memory_size,
                1,
                "/k".into(),
                None,
                c.disks.clone(),
                forwards,
                false,
            )
            .unwrap_err()
            .to_string()
        };
        let mut other = spec.clone();
        other.devices.push("virtio-rng-pci".into());
        assert!(refused(&other, vec![]).contains("devices"));
        let mut other = spec.clone();
        other.backend = "microvm".into();
        assert!(refused(&other, vec![]).contains("microvm"));
        let mut nonet = c.clone();
        nonet.net = None;
        assert!(
            refused(&nonet.spec("7.2"), vec!["80:80".parse().unwrap()]).contains("no network card")
        );
        assert!(refused(&spec, vec!["[::1]:2222:22".parse().unwrap()]).contains("IPv4"));
    }

    #[test]
    fn bad_configurations_are_refused() {
        let ok = cfg();
        ok.validate().unwrap();
        let mut c = ok.clone();
        c.memory_size = (256 << 20) + 4096;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.vcpus = 0;
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.machine_type = "pc,accel=kvm".into();
        assert!(c.validate().is_err());
        let mut c = ok.clone();
        c.cmdline = "a\nb".into();
        assert!(c.validate().is_err());
    }

    #[test]
    fn shell_quoting() {
        assert_eq!(shell_quote(Path::new("/a b/it's")), r#"'/a b/it'\''s'"#);
    }
}
