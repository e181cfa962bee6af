//! Plumbing shared by `kimberlize`, `dekimberlize` and `vmigrate`: key
//! options, progress bars, stats files, error reporting and exit codes,
//! help, man pages, completions and `--version`.

pub mod exit;
pub mod help;
pub mod keys;
pub mod machines;
pub mod man;
pub mod oci;
pub mod output;
pub mod progress;
pub mod run;
pub mod schema;
pub mod version;
pub mod vm;

pub use keys::{KeyArgs, ReadArgs};
pub use run::{main_with, Quiet};
