//! Saving and restoring state: the `Persist` trait, a small bounds-checked
//! binary codec, and the state blob envelope (see docs/VMM.md, "State blob").

mod codec;

#[cfg(test)]
pub(crate) use codec::Pod;
pub use codec::{Reader, Writer};

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
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(body).to_le_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks the envelope and returns the body.
pub fn open(blob: &[u8]) -> Result<&[u8]> {
    if blob.len() < HEADER_LEN {
        return Err(Error::corrupt(format!(
            "{} bytes is shorter than the header",
            blob.len()
        )));
    }
    if blob[0..8] != MAGIC {
        return Err(Error::corrupt("bad magic (not a Kimberley VM state blob)"));
    }
    let le32 = |o: usize| u32::from_le_bytes([blob[o], blob[o + 1], blob[o + 2], blob[o + 3]]);
    let le64 = |o: usize| {
        let mut a = [0u8; 8];
        a.copy_from_slice(&blob[o..o + 8]);
        u64::from_le_bytes(a)
    };
    let version = le32(8);
    if version != VERSION {
        return Err(Error::StateVersion {
            found: version,
            expected: VERSION,
        });
    }
    if le32(12) != 0 {
        return Err(Error::corrupt("unknown header flags"));
    }
    let len = le64(16);
    if len > MAX_BODY {
        return Err(Error::corrupt(format!(
            "body length {len} exceeds the cap of {MAX_BODY}"
        )));
    }
    if (blob.len() - HEADER_LEN) as u64 != len {
        return Err(Error::corrupt(format!(
            "body length {len} does not match the {} bytes present",
            blob.len() - HEADER_LEN
        )));
    }
    let body = &blob[HEADER_LEN..];
    if xxhash_rust::xxh3::xxh3_64(body) != le64(24) {
        return Err(Error::corrupt("checksum mismatch"));
    }
    Ok(body)
}
