//! `kimberley-registry`: overlay chains as OCI artifacts. The pure part
//! (references, digests, manifests and their annotations, auth challenges
//! and auth files) parses and encodes without I/O; [`client`] talks to a
//! registry over HTTP(S) (docs/FORMAT.md, part 3).

pub mod auth;
pub mod client;
pub mod digest;
pub mod error;
pub mod manifest;
pub mod reference;

pub use client::{Client, ClientOptions};
pub use digest::{Digest, Sha256Writer};
pub use error::{Error, Result};
pub use manifest::{ChainConfig, Descriptor, Manifest};
pub use reference::Reference;
