//! Saving and restoring state: the `Persist` trait, the state blob codec
//! (`kimberley_formats::le` plus checked KVM structure copies) and the
//! state blob envelope (see docs/VMM.md, "State blob").

mod codec;

pub use codec::{ReadKvm, WriteKvm};
pub use kimberley_formats::le::{LeError, Reader, Writer};

use crate::error::{Error, Result};

/// A component whose state can be saved and later rebuilt.
pub trait Persist: Sized {
    /// The component's saved state.
    type State;
    /// What `restore` needs besides the state (file descriptors, memory...).
    type Args;
    /// Captures the state (the VM is paused).
    fn save(&self) -> Result<Self::State>;
    /// Rebuilds the component from `state`.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self>;
}

/// Binary encoding of a saved state.
pub trait Codec: Sized {
    /// Appends the encoding to `w`.
    fn encode(&self, w: &mut Writer);
    /// Decodes from `r`, checking every length against its cap.
    fn decode(r: &mut Reader<'_>) -> Result<Self>;
}

/// First 8 bytes of every state blob.
pub const MAGIC: [u8; 8] = *b"KIMBVMST";
/// Current (and only readable) format version.
pub const VERSION: u32 = 1;
/// Bytes of the fixed header.
pub const HEADER_LEN: usize = 32;
/// Largest body accepted.
pub const MAX_BODY: u64 = 64 << 20;

/// Wraps `body` in the envelope: magic, version, flags, length, checksum.
pub fn seal(body: &[u8]) -> Vec<u8> {
    let mut w = Writer::with_capacity(HEADER_LEN + body.len());
    w.raw(&MAGIC);
    w.u32(VERSION);
    w.u32(0);
    w.u64(body.len() as u64);
    w.u64(xxhash_rust::xxh3::xxh3_64(body));
    w.raw(body);
    w.into_inner()
}

/// Checks the envelope and returns the body.
pub fn open(blob: &[u8]) -> Result<&[u8]> {
    if blob.len() < HEADER_LEN {
        return Err(Error::corrupt(format!(
            "{} bytes is shorter than the header",
            blob.len()
        )));
    }
    let mut r = Reader::new(blob, "state blob header");
    if r.array::<8>()? != MAGIC {
        return Err(Error::corrupt("bad magic (not a Kimberley VM state blob)"));
    }
    let version = r.u32()?;
    if version != VERSION {
        return Err(Error::StateVersion {
            found: version,
            expected: VERSION,
        });
    }
    if r.u32()? != 0 {
        return Err(Error::corrupt("unknown header flags"));
    }
    let len = r.u64()?;
    if len > MAX_BODY {
        return Err(Error::corrupt(format!(
            "body length {len} exceeds the cap of {MAX_BODY}"
        )));
    }
    let sum = r.u64()?;
    let body = r.rest();
    if body.len() as u64 != len {
        return Err(Error::corrupt(format!(
            "body length {len} does not match the {} bytes present",
            body.len()
        )));
    }
    if xxhash_rust::xxh3::xxh3_64(body) != sum {
        return Err(Error::corrupt("checksum mismatch"));
    }
    Ok(body)
}
