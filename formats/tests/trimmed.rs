//! The golden manifest of a trimmed disk (FORMAT.md 5.2 `trimmed`,
//! testdata/vectors/trim/): it parses, re-encodes byte for byte, and its
//! identity is the listed one, the same as without the member.

use std::path::Path;

use kimberley_formats::digest::hex;
use kimberley_formats::vmdir::{Kind, Manifest};

const GOLDEN_IDENTITY: &str = "a21ff43c9bfd72d732bf0108e93331ee0811cf5f6024c443ca75e4aef7c862de";

fn golden() -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/vectors/trim/manifest-trimmed.json");
    std::fs::read(p).unwrap()
}

#[test]
fn the_golden_trimmed_manifest() {
    let bytes = golden();
    let m = Manifest::parse(&bytes).unwrap();
    let flags: Vec<(Kind, bool)> = m.components.iter().map(|c| (c.kind, c.trimmed)).collect();
    assert_eq!(flags, [(Kind::Memory, false), (Kind::Disk, true)]);
    assert_eq!(m.encode(), bytes, "writers emit exactly this");
    assert_eq!(hex(&m.identity()), GOLDEN_IDENTITY);
    // The member is not part of the identity, and a manifest without it
    // is what every earlier writer wrote.
    let mut plain = m.clone();
    plain.components[1].trimmed = false;
    assert_eq!(plain.identity(), m.identity());
    let text = String::from_utf8(plain.encode()).unwrap();
    assert!(!text.contains("\"trimmed\""), "{text}");
}

#[test]
fn trimmed_is_only_true_and_only_on_disks() {
    let text = String::from_utf8(golden()).unwrap();
    let refused = [
        text.replace("\"trimmed\": true", "\"trimmed\": false"),
        text.replace("\"trimmed\": true", "\"trimmed\": 1"),
        text.replace(
            "\"blake3\": \"afb5",
            "\"trimmed\": true,\n      \"blake3\": \"afb5",
        ),
    ];
    for bad in refused {
        assert_ne!(bad, text);
        assert!(Manifest::parse(bad.as_bytes()).is_err(), "{bad}");
    }
}
