//! The `machine` member of a version-2 manifest: the backend and the exact
//! virtual machine a VM directory was made for, so a backend that cannot
//! resume it refuses it with a clear error. Pure data (serde).

use serde::{Deserialize, Serialize};

/// Longest string member.
pub const MAX_FIELD: usize = 4096;
/// Most devices listed.
pub const MAX_DEVICES: usize = 64;

/// What runs a VM directory, beyond its components.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineSpec {
    /// The backend: `"qemu"` (the microVM writes version-1 manifests,
    /// without this member).
    pub backend: String,
    /// The backend's version that made it (e.g. QEMU `7.2.19`).
    pub version: String,
    /// The pinned machine type (e.g. `pc-i440fx-7.2`).
    pub machine_type: String,
    /// The accelerator: `"tcg"` or `"kvm"` (a VM suspended under one is
    /// resumed under the same one).
    pub accel: String,
    /// The CPU model.
    pub cpu: String,
    /// The kernel command line it booted with.
    pub cmdline: String,
    /// The devices, in the order the backend creates them.
    pub devices: Vec<String>,
}

impl MachineSpec {
    /// Checks the caps and that nothing is empty where it must not be.
    pub fn validate(&self) -> Result<(), String> {
        let fields = [
            ("backend", &self.backend),
            ("version", &self.version),
            ("machine_type", &self.machine_type),
            ("accel", &self.accel),
            ("cpu", &self.cpu),
        ];
        for (name, v) in fields {
            if v.is_empty() || v.len() > MAX_FIELD || v.chars().any(char::is_control) {
                return Err(format!(
                    "machine.{name} must be 1-{MAX_FIELD} bytes without control characters"
                ));
            }
        }
        if self.cmdline.len() > MAX_FIELD || self.cmdline.chars().any(char::is_control) {
            return Err(format!(
                "machine.cmdline must be at most {MAX_FIELD} bytes without control characters"
            ));
        }
        if self.devices.len() > MAX_DEVICES
            || self
                .devices
                .iter()
                .any(|d| d.is_empty() || d.len() > MAX_FIELD || d.chars().any(char::is_control))
        {
            return Err(format!(
                "machine.devices: at most {MAX_DEVICES} names of 1-{MAX_FIELD} bytes"
            ));
        }
        Ok(())
    }
}
