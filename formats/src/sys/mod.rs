//! Raw system calls the crates share, one small module per concern, each
//! `unsafe` block next to its `// SAFETY:` argument.

pub mod clone;
pub mod cred;
pub mod file;
pub mod lock;
pub mod openat;
pub mod pagemap;
pub mod poll;
pub mod punch;
pub mod sched;
pub mod signal;
pub mod tempdir;
pub mod uffd;
