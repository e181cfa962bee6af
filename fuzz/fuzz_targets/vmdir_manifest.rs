//! `manifest.json`: `Manifest::parse` must never panic; what it accepts
//! must survive `encode` → `parse` unchanged, and `encode` is canonical.
#![no_main]

use kimberley_formats::vmdir::Manifest;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(m) = Manifest::parse(data) else { return };
    let _ = m.identity();
    let _ = m.memory_size();
    let _ = m.state_index();
    let _ = m.disk_indices();
    for i in 0..m.components.len() {
        let _ = m.file_name(i);
    }
    let enc = m.encode();
    let m2 = Manifest::parse(&enc).expect("an encoded manifest parses");
    assert_eq!(m2, m, "manifest round trip");
    assert_eq!(m2.identity(), m.identity());
    assert_eq!(m2.encode(), enc, "encode is canonical");
});
