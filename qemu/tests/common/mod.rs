//! Test fixtures of the QEMU suites: the guest (`guest.rs`), and looking
//! into files and making tokens.

#![allow(dead_code)]

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

pub mod guest;
pub use guest::*;

/// True if `needle` is somewhere in the data extents of `path`.
pub fn file_contains(path: &Path, needle: &[u8]) -> bool {
    let f = File::open(path).unwrap();
    let size = f.metadata().unwrap().len();
    let mut buf = vec![0u8; 8 << 20];
    for (start, end) in kimberley_formats::sparse::data_extents(&f, size).unwrap() {
        let mut pos = start;
        while pos < end {
            // Overlap chunks so a needle across a boundary is found.
            let n = ((end - pos) as usize).min(buf.len());
            f.read_exact_at(&mut buf[..n], pos).unwrap();
            if buf[..n].windows(needle.len()).any(|w| w == needle) {
                return true;
            }
            if pos + n as u64 >= end {
                break;
            }
            pos += (n - needle.len()) as u64;
        }
    }
    false
}

/// A random lowercase token.
pub fn token() -> String {
    let mut b = [0u8; 12];
    getrandom::fill(&mut b).unwrap();
    b.iter().map(|x| (b'a' + x % 26) as char).collect()
}
