//! The VM state blob decoder (docs/VMM.md, "State blob"):
//! `kimberley_vmm::validate_state` must refuse bad input with an error,
//! never panic, and never allocate from a length it has not checked (the
//! runs use `-malloc_limit_mb`, far below what an unchecked u32 length
//! would ask for). The first byte picks a mode: even, the rest is a whole
//! blob; odd, the rest is a body that the harness seals (header and
//! checksum recomputed), so that mutations reach the sections.
#![no_main]

use kimberley_vmm::persist::seal;
use kimberley_vmm::validate_state;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let _ = if mode % 2 == 0 {
        validate_state(rest)
    } else {
        validate_state(&seal(rest))
    };
});
