//! `fs::free_space` over a whole disk image (bare ext4, GPT or MBR): never
//! panics; what it reports free is sorted, disjoint and inside the disk.
#![no_main]

use kimberley_formats::fs::{ext4, free_space};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = free_space(data) {
        let mut end = 0;
        for &(a, b) in &s.ranges {
            assert!(end <= a && a < b && b <= data.len() as u64, "{:?}", s.ranges);
            end = b;
        }
        assert!(s.file_systems > 0 || s.ranges.is_empty());
    }
    let _ = ext4::free_blocks(data, 0, data.len() as u64);
});
