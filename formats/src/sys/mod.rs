//! Raw system calls the crates share, one small module per concern, each
//! `unsafe` block next to its `// SAFETY:` argument.

pub mod cred;
pub mod poll;
pub mod tempdir;
