//! Crafted overlay bytes, shared by the formats and dekimberlize suites
//! (dekimberlize includes this file with `#[path]`).

#![allow(dead_code)]

use kimberley_formats::crypto::keys::{Argon2Params, KeyMaterial};
use kimberley_formats::overlay::header::{Header, HEADER_LEN};

/// A passphrase header asking for 1 GiB and 64 passes of Argon2id:
/// minutes of work and 1 GiB of memory before its MAC can fail.
pub fn expensive_kdf_header() -> [u8; HEADER_LEN] {
    let mut h = Header {
        version: kimberley_formats::overlay::header::VERSION_1,
        protection: KeyMaterial::Passphrase(Argon2Params {
            m_cost: 1 << 20,
            t_cost: 64,
            p_cost: 1,
        }),
        overlay_id: [1; 16],
        salt: [2; 32],
        base_id: [3; 32],
        result_id: [4; 32],
        parent_id: [0; 16],
        depth: 0,
        mac: [0; 32],
    };
    h.seal(None)
}
