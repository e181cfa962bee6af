//! Key files: `keyfile::parse` must never panic; what it accepts as a text
//! key must be the canonical spelling of the key it returns.
#![no_main]

use kimberley_formats::crypto::keyfile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(key) = keyfile::parse(data) else { return };
    if data.len() == 32 {
        assert_eq!(&key[..], data, "the raw form is the key itself");
        return;
    }
    let text = keyfile::encode(&key);
    let line = data
        .strip_suffix(b"\r\n")
        .or_else(|| data.strip_suffix(b"\n"))
        .unwrap_or(data);
    assert!(
        text.as_bytes().eq_ignore_ascii_case(line),
        "accepted a non-canonical spelling"
    );
    assert_eq!(keyfile::parse(text.as_bytes()), Ok(key), "round trip");
});
