//! The whole overlay read path: `Opened::open` then `apply::verify`.
//!
//! The first byte selects a mode (the rest is the payload):
//! - `% 4 == 0`: the payload is an overlay stream, no secret;
//! - `% 4 == 1`: the same with the key file `[7; 32]` (MAC/AEAD paths,
//!   and the default reader policy: unencrypted overlays refused);
//! - `% 4 == 2`: the payload is an overlay whose header MAC and segment
//!   tags are recomputed first (so mutations reach framing and parsing);
//! - `% 4 == 3`: structured: header + uncompressed segment bodies, which
//!   the harness compresses and seals (see common.rs), so mutations reach
//!   the manifest, record and index parsers and the decode pipeline.
//!
//! Modes 2 and 3 read with `--allow-unencrypted`, so that resealed
//! unencrypted overlays still reach the parsers.
#![no_main]

use std::io::Cursor;

use kimberley_formats::apply::{self, Input, Opened};
use kimberley_formats::crypto::keys::Secret;
use kimberley_formats::crypto::ReadPolicy;
use kimberley_formats::progress::Progress;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

const ALLOW_UNENCRYPTED: ReadPolicy = ReadPolicy {
    allow_unencrypted: true,
    kdf: kimberley_formats::crypto::KdfLimits::DEFAULT,
};

fn run(bytes: Vec<u8>, secret: Option<&Secret>, policy: &ReadPolicy) {
    let input = Input {
        name: "fuzz".into(),
        reader: Box::new(Cursor::new(bytes)),
    };
    if let Ok(opened) = Opened::open(input, secret, policy) {
        let _ = opened.geometry();
        let _ = apply::verify(opened, 1, &Progress::default());
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, payload)) = data.split_first() else {
        run(Vec::new(), None, &ReadPolicy::default());
        return;
    };
    let key = Secret::Key(common::KEY);
    match mode % 4 {
        0 => run(payload.to_vec(), None, &ReadPolicy::default()),
        1 => run(payload.to_vec(), Some(&key), &ReadPolicy::default()),
        2 => {
            let mut b = payload.to_vec();
            common::reseal(&mut b);
            run(b, Some(&key), &ALLOW_UNENCRYPTED);
        }
        _ => run(
            common::build_structured(payload),
            Some(&key),
            &ALLOW_UNENCRYPTED,
        ),
    }
});
