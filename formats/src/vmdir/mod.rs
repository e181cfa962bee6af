//! The VM directory (VMDIR): `manifest.json` plus raw component files.
//!
//! [`manifest`] parses and encodes the manifest (pure); [`dir`] opens and
//! writes directories; [`import`] wraps existing raw images.

pub mod dir;
pub mod import;
pub mod manifest;

pub use dir::{VmDir, VmDirWriter, MANIFEST};
pub use manifest::{file_name, Component, Kind, Manifest};
