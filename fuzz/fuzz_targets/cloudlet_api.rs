//! The cloudlet daemon's API (docs/CLOUDLET.md, "The daemon's API"): HTTP
//! heads read and parsed, Content-Length checked, JSON bodies and the
//! DNS-SD TXT record's bases and the `Kimberley-Ports` header never
//! panic; what parses re-encodes to itself. The first byte picks the parser.
#![no_main]

use std::collections::HashMap;
use std::io::BufReader;

use kimberlized::{api, discovery, http};
use libfuzzer_sys::fuzz_target;

/// Decodes `bytes` as `T` and, when that works, checks that its encoding
/// decodes to the same value.
fn round_trip<T>(bytes: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize + PartialEq + std::fmt::Debug,
{
    let Ok(v) = serde_json::from_slice::<T>(bytes) else { return };
    let again: T = serde_json::from_slice(&serde_json::to_vec(&v).expect("encodes"))
        .expect("an encoded body decodes");
    assert_eq!(again, v, "round trip");
}

/// A `Kimberley-Ports` value: what parses is within the caps and
/// re-encodes to itself.
fn ports(v: &str) {
    let Ok(p) = api::parse_ports(v) else { return };
    assert!(!p.is_empty() && p.len() <= api::MAX_PORTS, "ports over the cap");
    assert!(api::check_ports(&p).is_ok(), "parsed ports fail the check");
    assert_eq!(api::parse_ports(&api::ports_header(&p)), Ok(p), "round trip");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 4 {
        0 => {
            // What the daemon does with a connection's first bytes (through
            // a small buffer, so heads span refills).
            let mut r = BufReader::with_capacity(7, rest);
            let Ok(Some(head)) = http::read_head(&mut r) else { return };
            assert!(head.len() <= http::MAX_HEAD, "head over its cap");
            let Ok(req) = http::parse_request(&head) else { return };
            let _ = req.content_length();
            let _ = (req.header(api::KEY_HEADER), req.header(api::FROM_HEADER));
            if let Some(v) = req.header(api::PORTS_HEADER) {
                ports(v);
            }
        }
        1 => {
            // What the client does with the daemon's answer.
            let Ok(resp) = http::parse_response(rest) else { return };
            if let Ok(Some(n)) = resp.content_length() {
                let head = http::response_head(resp.status, api::JSON, Some(n));
                let again = http::parse_response(&head).expect("a made head parses");
                assert_eq!(again.content_length().ok(), Some(Some(n)));
            }
        }
        2 => {
            // Request bodies (daemon) and answers (client).
            round_trip::<api::Delete>(rest);
            round_trip::<api::Exec>(rest);
            round_trip::<api::Progress>(rest);
            round_trip::<api::Info>(rest);
            round_trip::<api::SessionInfo>(rest);
            round_trip::<api::ErrorBody>(rest);
            round_trip::<api::Forward>(rest);
            if let Ok(v) = std::str::from_utf8(rest) {
                ports(v);
            }
        }
        _ => {
            // A TXT record: key=value strings separated by NUL.
            let txt: HashMap<String, String> = rest
                .split(|&b| b == 0)
                .filter_map(|kv| {
                    let s = std::str::from_utf8(kv).ok()?;
                    let (k, v) = s.split_once('=')?;
                    Some((k.to_string(), v.to_string()))
                })
                .collect();
            let bases = discovery::bases_of(|k| txt.get(k).cloned());
            assert!(bases.len() <= txt.len());
        }
    }
});
