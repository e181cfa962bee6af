//! OCI artifacts of overlay chains (docs/FORMAT.md section 17): references,
//! manifests, auth challenges, token answers and auth files never panic;
//! what parses re-encodes canonically. The first byte picks the parser.
#![no_main]

use kimberley_registry::{auth, Manifest, Reference};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            let Ok(s) = std::str::from_utf8(rest) else { return };
            let Ok(r) = Reference::parse(s) else { return };
            let again = Reference::parse(&r.to_string()).expect("a printed reference parses");
            assert_eq!(again, r, "round trip");
            let _ = (r.host(), r.is_loopback(), r.manifest_ref());
        }
        1 => {
            let Ok(m) = Manifest::decode(rest) else { return };
            let chain = m.chain().expect("a decoded manifest has a chain");
            assert_eq!(chain.len(), m.layers.len());
            let bytes = m.encode();
            assert_eq!(Manifest::decode(&bytes).expect("re-encoded parses"), m);
        }
        2 => {
            let Ok(s) = std::str::from_utf8(rest) else { return };
            let _ = auth::parse_challenge(s);
        }
        _ => {
            if let Some(t) = auth::token_from(rest) {
                assert!(t.bytes().all(|b| (0x21..0x7f).contains(&b)));
            }
            let _ = auth::credentials_from("fuzz", rest, "registry.example:5000");
        }
    }
});
