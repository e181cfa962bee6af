fn main() -> std::process::ExitCode {
    kimberley_cli::main_with(vmigrate::main)
}
