//! `vmigrate`: live pre-copy migration (issue 4, not built yet). Until it
//! is, the binary says so instead of pretending to work.

fn main() -> std::process::ExitCode {
    eprintln!(
        "error: vmigrate is not implemented yet (see the project's open issue on live migration)"
    );
    std::process::ExitCode::from(1)
}
