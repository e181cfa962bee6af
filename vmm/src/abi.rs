//! The guest boot ABI, shared source with the test guest.

#[path = "../../guest/src/abi.rs"]
mod shared;

pub use shared::*;
