//! `memory.blocks` (FORMAT.md section 5.8): `blocks::decode` never panics;
//! what it accepts re-encodes to the same bytes and combines to the digest
//! it was checked against. The first byte picks the digest: 0 the next 32
//! input bytes (almost never right: the refusals), 1 the digest the file's
//! own hashes combine to (the acceptance path). Then le16 size in KiB
//! (memory of up to 64 MiB), then the file.
#![no_main]

use kimberley_formats::digest::combine;
use kimberley_formats::vmdir::blocks;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    let Some((size, rest)) = rest.split_first_chunk::<2>() else { return };
    let size = u64::from(u16::from_le_bytes(*size)) * 1024;
    let (digest, file) = if mode % 2 == 0 {
        let Some((d, f)) = rest.split_first_chunk::<32>() else { return };
        (*d, f)
    } else {
        let hashes: Vec<[u8; 32]> = rest
            .get(blocks::HEADER_LEN..)
            .unwrap_or(&[])
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        (combine(size, &hashes), rest)
    };
    if let Some(h) = blocks::decode(file, size, &digest) {
        assert_eq!(blocks::encode(size, &h), file, "accepted bytes that do not re-encode");
        assert_eq!(combine(size, &h), digest);
        assert_eq!(file.len() as u64, blocks::expected_len(size));
    }
});
