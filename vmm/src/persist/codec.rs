//! KVM structures in the state blob: length-prefixed raw copies whose
//! layout zerocopy checks at compile time.
//!
//! kvm-bindings (feature `serde`) derives zerocopy's `IntoBytes` and
//! `FromBytes` for the KVM UAPI structures, so the compiler proves that they
//! have no padding bytes (every byte of `as_bytes` is initialised) and that
//! every bit pattern is a valid value; no `unsafe` is needed here.

use kimberley_formats::le::{Reader, Writer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

use crate::error::{Error, Result};

/// Writes KVM structures.
pub trait WriteKvm {
    /// Appends `v` as `bytes` (u32 length, then its in-memory bytes).
    fn kvm_struct<T: IntoBytes + Immutable>(&mut self, v: &T);
}

impl WriteKvm for Writer {
    fn kvm_struct<T: IntoBytes + Immutable>(&mut self, v: &T) {
        self.bytes(v.as_bytes());
    }
}

/// Reads KVM structures.
pub trait ReadKvm {
    /// Reads a structure written by [`WriteKvm::kvm_struct`]; its length
    /// must be exactly `size_of::<T>()`.
    fn kvm_struct<T: FromBytes>(&mut self, what: &str) -> Result<T>;
}

impl ReadKvm for Reader<'_> {
    fn kvm_struct<T: FromBytes>(&mut self, what: &str) -> Result<T> {
        let size = std::mem::size_of::<T>();
        let b = self.bytes(size, what)?;
        T::read_from_bytes(b)
            .map_err(|_| Error::corrupt(format!("{what}: {} bytes, expected {size}", b.len())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{kvm_irqchip, kvm_regs, kvm_xsave};

    #[test]
    fn structures_round_trip_and_sizes_are_checked() {
        let regs = kvm_regs {
            rax: 0x1122_3344_5566_7788,
            rip: 0x40_1000,
            rflags: 2,
            ..Default::default()
        };
        let mut w = Writer::new();
        w.kvm_struct(&regs);
        let b = w.into_inner();
        // docs/VMM.md: u32 length 144, then the raw structure, little-endian.
        assert_eq!(b.len(), 4 + 144);
        assert_eq!(&b[..4], &144u32.to_le_bytes());
        assert_eq!(&b[4..12], &0x1122_3344_5566_7788u64.to_le_bytes());
        let mut r = Reader::new(&b, "t");
        let back: kvm_regs = r.kvm_struct("regs").unwrap();
        assert_eq!(back, regs);
        r.finish().unwrap();

        // The sizes the format fixes.
        assert_eq!(std::mem::size_of::<kvm_xsave>(), 4096);
        assert_eq!(std::mem::size_of::<kvm_irqchip>(), 520);

        // Too short: refused, naming the field.
        let mut w = Writer::new();
        w.bytes(&[0u8; 143]);
        let b = w.into_inner();
        let e = Reader::new(&b, "t")
            .kvm_struct::<kvm_regs>("regs")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "corrupt state blob: regs: 143 bytes, expected 144"
        );
        // Too long: refused by the cap before anything is read.
        let mut w = Writer::new();
        w.bytes(&[0u8; 145]);
        let b = w.into_inner();
        let e = Reader::new(&b, "t")
            .kvm_struct::<kvm_regs>("regs")
            .unwrap_err();
        assert!(
            e.to_string().contains("regs: 145 exceeds the cap of 144"),
            "{e}"
        );
    }
}
