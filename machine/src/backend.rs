//! Backends: what restores a suspended VM directory into a running
//! [`Machine`], and how its memory and disks are placed while it runs.
//! (Booting a new VM takes backend-specific settings, so each backend has
//! its own boot function.)

use std::net::IpAddr;
use std::path::Path;

use kimberley_formats::apply::early::Early;
use kimberley_formats::vmdir::manifest::Manifest;
use kimberley_formats::vmdir::patched::Patched;
use kimberley_formats::vmdir::{VmDir, VmDirWriter};

use crate::error::Result;
use crate::Machine;

/// Where a restored machine's memory and disks live while it runs.
pub enum Placement<'a> {
    /// In the directory it is restored from, which it suspends back into
    /// (`dekimberlize --run`, `vmigrate run`). The directory is in use
    /// while the machine runs.
    InPlace,
    /// Copies in the new directory being written, which it suspends into;
    /// the directory restored from is only read (`kimberlize build`).
    CopyInto(&'a VmDirWriter),
}

/// How guest memory is brought in at restore.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MemorySource {
    /// The memory file mapped copy-on-write: pages fault in lazily.
    #[default]
    PrivateFileMap,
    /// Anonymous memory whose pages a handler thread reads from the memory
    /// file on first touch (userfaultfd). Backends without it refuse it.
    Lazy,
    /// [`MemorySource::Lazy`] with one page per first touch, recorded in
    /// order ([`crate::Machine::touched_pages`]): what `kimberlize build`
    /// uses to record a working set. Backends without it refuse it.
    LazyRecording,
}

/// A TCP port of the guest reachable from the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// Host address to listen on.
    pub host_addr: IpAddr,
    /// Host port.
    pub host_port: u16,
    /// Guest port.
    pub guest_port: u16,
}

impl std::str::FromStr for PortForward {
    type Err = String;

    /// `[ADDR:]HOSTPORT:GUESTPORT`, ADDR defaulting to 127.0.0.1 (an IPv6
    /// address in brackets).
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || format!("{s:?} is not [ADDR:]HOSTPORT:GUESTPORT (e.g. 8080:80)");
        let (rest, guest) = s.rsplit_once(':').ok_or_else(bad)?;
        let guest_port: u16 = guest.parse().map_err(|_| bad())?;
        let (addr, host) = match rest.rsplit_once(':') {
            Some((a, h)) => (a.trim_start_matches('[').trim_end_matches(']'), h),
            None => ("127.0.0.1", rest),
        };
        let host_port: u16 = host.parse().map_err(|_| bad())?;
        let host_addr: IpAddr = addr.parse().map_err(|_| bad())?;
        if host_port == 0 || guest_port == 0 {
            return Err(bad());
        }
        Ok(PortForward {
            host_addr,
            host_port,
            guest_port,
        })
    }
}

/// How to restore.
pub struct RestoreOptions<'a> {
    /// Where memory and disks live while it runs.
    pub placement: Placement<'a>,
    /// How memory comes in.
    pub memory: MemorySource,
    /// Guest ports to reach from the host.
    pub forwards: Vec<PortForward>,
    /// Let the guest reach the outside network (a machine with a network
    /// card; without this its network is cut off from the host's).
    pub network: bool,
}

impl<'a> RestoreOptions<'a> {
    /// In place, memory mapped privately, no forwards.
    pub fn in_place() -> Self {
        RestoreOptions {
            placement: Placement::InPlace,
            memory: MemorySource::default(),
            forwards: Vec::new(),
            network: false,
        }
    }

    /// Into the new directory `w` (see [`Placement::CopyInto`]).
    pub fn copy_into(w: &'a VmDirWriter) -> Self {
        RestoreOptions {
            placement: Placement::CopyInto(w),
            memory: MemorySource::default(),
            forwards: Vec::new(),
            network: false,
        }
    }
}

/// Restores suspended VM directories of one kind.
pub trait Backend: Send + Sync {
    /// Its name, as VM directories record it (`"microvm"`, `"qemu"`).
    fn name(&self) -> &'static str;
    /// Refuses, with a clear error, a directory this backend cannot resume
    /// on this host (another backend, machine type, version or
    /// accelerator, no state).
    fn check(&self, dir: &VmDir) -> Result<()>;
    /// Restores `dir`; returns once the guest has run.
    fn restore(&self, dir: &VmDir, opts: RestoreOptions<'_>) -> Result<Box<dyn Machine>>;
    /// True when [`Backend::restore_patched`] works (with
    /// `Placement::CopyInto`, memory mapped from the file, no network).
    fn patched_restore(&self) -> bool {
        false
    }
    /// Restores `vm`, a base's files plus in-memory changes that were
    /// never written out (`kimberlize build --parent`), into the
    /// `Placement::CopyInto` directory of `opts`. Where
    /// [`Backend::patched_restore`] is false, the caller writes `vm` out and
    /// calls [`Backend::restore`] instead.
    fn restore_patched(&self, vm: &Patched, opts: RestoreOptions<'_>) -> Result<Box<dyn Machine>> {
        let _ = (vm, opts);
        Err(crate::Error::Unsupported(format!(
            "the {} backend restores only VM directories",
            self.name()
        )))
    }
    /// True when [`Backend::restore_arriving`] works.
    fn serves_arriving(&self) -> bool {
        false
    }
    /// Restores the launch VM `launch` while its overlay is still being
    /// applied into the directory that will be `out` (early start): state,
    /// memory and disks come from `early` as they arrive. The machine runs
    /// in place: once the apply has committed `out`, it suspends into it.
    /// Backends that cannot serve memory that is still arriving refuse
    /// (the caller then applies in full first).
    fn restore_arriving(
        &self,
        early: &Early,
        launch: &Manifest,
        out: &Path,
    ) -> Result<Box<dyn Machine>> {
        let _ = (early, launch, out);
        Err(crate::Error::Unsupported(format!(
            "the {} backend cannot start a VM before its overlay has arrived",
            self.name()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_forwards_parse() {
        let f: PortForward = "8080:80".parse().unwrap();
        assert_eq!(
            (f.host_addr.to_string(), f.host_port, f.guest_port),
            ("127.0.0.1".into(), 8080, 80)
        );
        let f: PortForward = "0.0.0.0:2222:22".parse().unwrap();
        assert_eq!(f.host_addr.to_string(), "0.0.0.0");
        let f: PortForward = "[::1]:2222:22".parse().unwrap();
        assert_eq!(f.host_addr.to_string(), "::1");
        for bad in ["80", "x:80", "8080:0", "a.b:1:2", "1:2:3:4", ""] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
    }
}
