//! Disk image formats told apart by their magic numbers (pure: bytes in, a format out).

/// What an image file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    /// No known container: the bytes are the disk.
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// QEMU enhanced disk.
    Qed,
    /// VMware (a sparse extent, or a text descriptor).
    Vmdk,
    /// Microsoft Virtual PC / Hyper-V (fixed: a footer at the end only;
    /// dynamic: the footer also at the start).
    Vhd,
    /// Hyper-V's newer format.
    Vhdx,
    /// VirtualBox.
    Vdi,
}

/// Bytes of an image's start that [`detect`] looks at.
pub const HEAD_LEN: usize = 512;
/// Bytes of an image's end that [`detect_footer`] looks at (a VHD footer).
pub const FOOTER_LEN: usize = 512;

const VHD_COOKIE: &[u8; 8] = b"conectix";
const VDI_SIGNATURE: u32 = 0xbeda_107f;
const VDI_SIGNATURE_AT: usize = 0x40;

impl ImageFormat {
    /// The name users know it by.
    pub fn name(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qed => "QED",
            ImageFormat::Vmdk => "VMDK",
            ImageFormat::Vhd => "VHD",
            ImageFormat::Vhdx => "VHDX",
            ImageFormat::Vdi => "VDI",
        }
    }

    /// `qemu-img`'s name for it (`-f`).
    pub fn qemu_img_format(self) -> &'static str {
        match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Qed => "qed",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhd => "vpc",
            ImageFormat::Vhdx => "vhdx",
            ImageFormat::Vdi => "vdi",
        }
    }
}

/// The format of an image from its first bytes (up to [`HEAD_LEN`]; fewer
/// for a short file). A fixed VHD has no header: see [`detect_footer`].
pub fn detect(head: &[u8]) -> ImageFormat {
    let starts = |m: &[u8]| head.starts_with(m);
    if starts(b"QFI\xfb") {
        ImageFormat::Qcow2
    } else if starts(b"QED\0") {
        ImageFormat::Qed
    } else if starts(b"KDMV") || starts(b"COWD") || starts(b"# Disk DescriptorFile") {
        ImageFormat::Vmdk
    } else if starts(b"vhdxfile") {
        ImageFormat::Vhdx
    } else if starts(VHD_COOKIE) {
        ImageFormat::Vhd
    } else if head
        .get(VDI_SIGNATURE_AT..VDI_SIGNATURE_AT + 4)
        .is_some_and(|s| s == VDI_SIGNATURE.to_le_bytes())
    {
        ImageFormat::Vdi
    } else {
        ImageFormat::Raw
    }
}

/// True if `tail`, an image's last [`FOOTER_LEN`] bytes (or 511 for images
/// made by old Virtual PC versions), is a VHD footer: a fixed VHD is the
/// raw disk followed by it.
pub fn detect_footer(tail: &[u8]) -> bool {
    let at = match tail.len() {
        FOOTER_LEN | 511 => 0,
        n if n > FOOTER_LEN => n - FOOTER_LEN,
        _ => return false,
    };
    tail[at..].starts_with(VHD_COOKIE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(off: usize, bytes: &[u8]) -> Vec<u8> {
        let mut v = vec![0u8; HEAD_LEN];
        v[off..off + bytes.len()].copy_from_slice(bytes);
        v
    }

    #[test]
    fn magic_table() {
        let vdi = {
            let mut v = at(0, b"<<< Oracle VM VirtualBox Disk Image >>>\n");
            v[0x40..0x44].copy_from_slice(&0xbeda_107fu32.to_le_bytes());
            v
        };
        let cases: &[(&str, Vec<u8>, ImageFormat)] = &[
            ("qcow2", at(0, b"QFI\xfb\0\0\0\x03"), ImageFormat::Qcow2),
            ("qed", at(0, b"QED\0"), ImageFormat::Qed),
            ("vmdk sparse", at(0, b"KDMV\x01\0\0\0"), ImageFormat::Vmdk),
            ("vmdk esx", at(0, b"COWD"), ImageFormat::Vmdk),
            (
                "vmdk descriptor",
                b"# Disk DescriptorFile\nversion=1\n".to_vec(),
                ImageFormat::Vmdk,
            ),
            ("vhdx", at(0, b"vhdxfile"), ImageFormat::Vhdx),
            ("dynamic vhd", at(0, b"conectix"), ImageFormat::Vhd),
            ("vdi", vdi, ImageFormat::Vdi),
            ("zeros", vec![0u8; HEAD_LEN], ImageFormat::Raw),
            ("empty", Vec::new(), ImageFormat::Raw),
            ("short", b"QFI".to_vec(), ImageFormat::Raw),
            ("magic not at 0", at(1, b"QFI\xfb"), ImageFormat::Raw),
            (
                "vdi signature elsewhere",
                at(0x44, &0xbeda_107fu32.to_le_bytes()),
                ImageFormat::Raw,
            ),
            (
                "vdi truncated",
                at(0, b"<<< ")[..0x42].to_vec(),
                ImageFormat::Raw,
            ),
        ];
        for (what, head, want) in cases {
            assert_eq!(detect(head), *want, "{what}");
        }
    }

    #[test]
    fn vhd_footer_at_the_end() {
        let mut tail = vec![0u8; 4096];
        assert!(!detect_footer(&tail));
        tail[4096 - 512..4096 - 504].copy_from_slice(b"conectix");
        assert!(detect_footer(&tail));
        assert!(detect_footer(&tail[4096 - 512..]));
        // The old 511-byte footer.
        let mut old = vec![0u8; 511];
        old[..8].copy_from_slice(b"conectix");
        assert!(detect_footer(&old));
        // Too short to hold a footer; a cookie elsewhere is not one.
        assert!(!detect_footer(b"conectix"));
        let mut elsewhere = vec![0u8; 512];
        elsewhere[8..16].copy_from_slice(b"conectix");
        assert!(!detect_footer(&elsewhere));
    }

    #[test]
    fn every_qemu_format_name_differs() {
        let all = [
            ImageFormat::Raw,
            ImageFormat::Qcow2,
            ImageFormat::Qed,
            ImageFormat::Vmdk,
            ImageFormat::Vhd,
            ImageFormat::Vhdx,
            ImageFormat::Vdi,
        ];
        let names: std::collections::BTreeSet<_> =
            all.iter().map(|f| f.qemu_img_format()).collect();
        assert_eq!(names.len(), all.len());
    }
}
