//! Choosing the accelerator: KVM only where it can run a Linux kernel.

use std::path::Path;

use crate::config::Accel;
use crate::error::{Error, Result};

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccelChoice {
    /// KVM where it can run a Linux kernel, TCG elsewhere.
    #[default]
    Auto,
    /// KVM, or an error saying why not.
    Kvm,
    /// TCG.
    Tcg,
}

/// What the host offers, read from `/dev/kvm`, `/proc/cpuinfo` and
/// `/sys/module`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostFacts {
    /// `/dev/kvm` can be opened read-write.
    pub dev_kvm: bool,
    /// `vmx` or `svm` is among the CPU flags.
    pub hw_virt: bool,
    /// The `kvm_pvm` module (page-table based nested KVM) is loaded: KVM
    /// runs kernel-mode code only through instruction emulation.
    pub kvm_pvm: bool,
}

impl HostFacts {
    /// This host's.
    pub fn probe() -> HostFacts {
        let dev_kvm = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        let hw_virt = std::fs::read_to_string("/proc/cpuinfo")
            .map(|c| {
                c.lines()
                    .filter(|l| l.starts_with("flags"))
                    .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
            })
            .unwrap_or(false);
        let kvm_pvm = Path::new("/sys/module/kvm_pvm").exists();
        HostFacts {
            dev_kvm,
            hw_virt,
            kvm_pvm,
        }
    }

    /// Whether KVM can run a Linux kernel here, and if not, why.
    pub fn kvm_runs_linux(&self) -> std::result::Result<(), &'static str> {
        if !self.dev_kvm {
            Err("/dev/kvm cannot be opened")
        } else if self.kvm_pvm {
            Err("KVM here is kvm_pvm (nested, page-table based): kernel code runs emulated")
        } else if !self.hw_virt {
            Err("the CPU has no vmx or svm flag")
        } else {
            Ok(())
        }
    }
}

/// Picks the accelerator for `choice` on a host with `facts`, and says why.
pub fn choose_with(choice: AccelChoice, facts: &HostFacts) -> Result<(Accel, String)> {
    match (choice, facts.kvm_runs_linux()) {
        (AccelChoice::Tcg, _) => Ok((Accel::Tcg, "TCG, as asked".into())),
        (AccelChoice::Kvm, Ok(())) => Ok((Accel::Kvm, "KVM, as asked".into())),
        (AccelChoice::Kvm, Err(why)) => Err(Error::Unsupported(format!(
            "KVM cannot run a Linux guest on this host: {why}"
        ))),
        (AccelChoice::Auto, Ok(())) => Ok((
            Accel::Kvm,
            "KVM (/dev/kvm with hardware virtualisation)".into(),
        )),
        (AccelChoice::Auto, Err(why)) => Ok((Accel::Tcg, format!("TCG ({why})"))),
    }
}

/// [`choose_with`] on this host.
pub fn choose(choice: AccelChoice) -> Result<(Accel, String)> {
    choose_with(choice, &HostFacts::probe())
}

/// Whether a VM suspended under `accel` can be resumed on this host.
pub fn usable(accel: Accel) -> Result<()> {
    match accel {
        Accel::Tcg => Ok(()),
        Accel::Kvm => HostFacts::probe().kvm_runs_linux().map_err(|why| {
            Error::Unsupported(format!(
                "the VM was suspended under KVM and must be resumed under KVM, which cannot run it here: {why}"
            ))
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_only_where_it_runs_linux() {
        let hw = HostFacts {
            dev_kvm: true,
            hw_virt: true,
            kvm_pvm: false,
        };
        let pvm = HostFacts {
            kvm_pvm: true,
            hw_virt: false,
            ..hw
        };
        let none = HostFacts {
            dev_kvm: false,
            ..hw
        };
        assert_eq!(choose_with(AccelChoice::Auto, &hw).unwrap().0, Accel::Kvm);
        let (a, why) = choose_with(AccelChoice::Auto, &pvm).unwrap();
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("kvm_pvm"), "{why}");
        assert_eq!(choose_with(AccelChoice::Auto, &none).unwrap().0, Accel::Tcg);
        assert!(choose_with(AccelChoice::Kvm, &pvm).is_err());
        assert_eq!(choose_with(AccelChoice::Tcg, &hw).unwrap().0, Accel::Tcg);
        // kvm_pvm with vmx passed through still runs kernels emulated.
        let pvm_vmx = HostFacts {
            kvm_pvm: true,
            ..hw
        };
        assert_eq!(
            choose_with(AccelChoice::Auto, &pvm_vmx).unwrap().0,
            Accel::Tcg
        );
    }
}
