//! The VM directory (VMDIR): `manifest.json` plus raw component files.
//!
//! [`manifest`] parses and encodes the manifest (pure), with the
//! [`machine`] description of version 2; [`dir`] opens and writes
//! directories; [`import`] wraps existing raw images; [`patched`] is a VM
//! held as its base's files plus in-memory changes.

pub mod blocks;
pub mod dir;
pub mod import;
pub mod machine;
pub mod manifest;
pub mod patched;

pub use dir::{VmDir, VmDirWriter, MANIFEST};
pub use machine::MachineSpec;
pub use manifest::{file_name, total_size, Component, Kind, Manifest};
