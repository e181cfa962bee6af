//! Kimberley's formats and pipelines.
//!
//! - [`vmdir`]: the VM directory (a suspended or powered-off VM on disk).
//! - [`overlay`]: the VM overlay format: pure encoders and parsers over bytes.
//! - [`crypto`]: keys, key derivation and the STREAM segment sealing.
//! - [`diff`]: the `kimberlize diff` pipeline (base + launch → overlay).
//! - [`apply`]: the `dekimberlize` pipeline (base + overlay chain → launch).
//!
//! `docs/FORMAT.md` at the repository root is the normative specification of
//! every byte this crate reads or writes.

pub mod apply;
pub mod chunk;
pub mod cleanup;
pub mod crypto;
pub mod diff;
pub mod digest;
pub mod error;
pub mod fs;
pub mod fsutil;
pub mod image;
pub mod le;
pub mod overlay;
pub mod progress;
pub mod sparse;
pub mod spool;
pub mod sys;
pub mod testkit;
pub mod vmdir;
pub mod working_set;

pub use error::{Error, Result};
