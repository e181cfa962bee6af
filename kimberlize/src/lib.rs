//! `kimberlize`: make VM overlays. The binary is a thin front end over
//! `kimberley-formats` (and `kimberley-vmm` for the VM-running commands).

pub mod cli;
mod depfile;
mod diff;
mod inspect;
mod oci;
mod offload;
mod vm;

use anyhow::Result;

/// Parses arguments and runs the command.
pub fn main() -> Result<()> {
    let args = cli::parse();
    match args.command {
        cli::Command::Keygen { output } => kimberley_cli::keys::keygen(&output),
        cli::Command::Import(a) => diff::import(a),
        cli::Command::Diff(a) => diff::diff(a),
        cli::Command::Base(a) => vm::base(a),
        cli::Command::Build(a) => vm::build(a),
        cli::Command::Inspect(a) => inspect::inspect(a),
        cli::Command::Push(a) => oci::push(a),
        cli::Command::Fetch(a) => oci::fetch(a),
        cli::Command::Gc(a) => oci::gc(a),
        cli::Command::Offload(a) => offload::offload(a),
        cli::Command::Cache(a) => oci::cache(a),
        cli::Command::Completions(a) => {
            kimberley_cli::help::completions(cli::command(), a.shell, &mut std::io::stdout())?;
            Ok(())
        }
    }
}
