//! `vmctl`: a thin client of the control socket served by `vmigrate run` and `dekimberlize --run` (docs/VMM.md, "Control protocol").

pub mod cli;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::ExitCode;

use anyhow::{anyhow, Context, Result};
use kimberley_cli::exit::VMCTL_FAILED;
use kimberley_cli::run::with_code;
use serde_json::{json, Value};

use cli::Command;

/// Parses arguments, sends the request, prints the answer and exits as
/// `Tool::Vmctl`'s table says.
pub fn main() -> ExitCode {
    let args = cli::parse();
    if let Some(shell) = args.completions {
        return kimberley_cli::main_with(|| {
            Ok(kimberley_cli::help::completions(
                cli::command(),
                shell,
                &mut std::io::stdout(),
            )?)
        });
    }
    let mut status = 0u8;
    let code = kimberley_cli::main_with(|| {
        status = run(&args).map_err(|e| with_code(VMCTL_FAILED, format!("{e:#}")))?;
        Ok(())
    });
    if status != 0 {
        ExitCode::from(status)
    } else {
        code
    }
}

/// The request line for `cmd` (`script`: an exec's text; `cwd`: where a
/// relative snapshot directory is).
pub fn request(cmd: &Command, script: Option<&str>, cwd: &Path) -> Value {
    match cmd {
        Command::Status => json!({"cmd": "status"}),
        Command::Pause => json!({"cmd": "pause"}),
        Command::Resume => json!({"cmd": "resume"}),
        Command::Stop => json!({"cmd": "stop"}),
        // The server's working directory is not ours: it takes absolute
        // paths only.
        Command::Snapshot { dir } => json!({"cmd": "snapshot", "dir": cwd.join(dir)}),
        Command::Exec { timeout, .. } => {
            let mut v = json!({"cmd": "exec", "script": script.unwrap_or_default()});
            if let Some(s) = timeout {
                v["timeout_ms"] = s.saturating_mul(1000).into();
            }
            v
        }
    }
}

/// The exit code for `answer` to `cmd` (an `ok:true` answer): 0, or an
/// exec's script status (1 to 255; anything else non-zero: 255).
pub fn exit_code(cmd: &Command, answer: &Value) -> u8 {
    if !matches!(cmd, Command::Exec { .. }) {
        return 0;
    }
    match answer["status"].as_i64() {
        Some(0) => 0,
        Some(n) => u8::try_from(n).unwrap_or(255),
        None => 255,
    }
}

fn run(a: &cli::Cli) -> Result<u8> {
    let (Some(cmd), Some(socket)) = (&a.command, &a.socket) else {
        return Err(anyhow!("no socket or command given"));
    };
    let script = match cmd {
        Command::Exec { script, .. } => Some(read_script(script)?),
        _ => None,
    };
    let cwd = std::env::current_dir().context("finding the working directory")?;
    let req = request(cmd, script.as_deref(), &cwd);
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to the control socket {}", socket.display()))?;
    writeln!(s, "{req}").context("sending the request")?;
    let mut line = String::new();
    BufReader::new(&s)
        .read_line(&mut line)
        .context("reading the answer")?;
    if !line.ends_with('\n') {
        return Err(anyhow!(
            "the VM's process closed the connection without a whole answer"
        ));
    }
    let answer: Value = serde_json::from_str(line.trim_end())
        .map_err(|e| anyhow!("the answer is not JSON ({e}): {:?}", line.trim_end()))?;
    let mut out = std::io::stdout().lock();
    out.write_all(line.as_bytes())
        .and_then(|_| out.flush())
        .context("writing the answer")?;
    if answer["ok"] != true {
        let why = answer["error"].as_str().unwrap_or("no reason given");
        return Err(anyhow!("the VM's process refused: {why}"));
    }
    Ok(exit_code(cmd, &answer))
}

fn read_script(p: &Path) -> Result<String> {
    if p == Path::new("-") {
        let mut s = String::new();
        std::io::stdin()
            .read_to_string(&mut s)
            .context("reading the script from stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(p).with_context(|| format!("reading the script {}", p.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn requests() {
        let cwd = Path::new("/home/u");
        let exec = Command::Exec {
            script: PathBuf::from("-"),
            timeout: Some(3),
        };
        assert_eq!(
            request(&exec, Some("print hi\n"), cwd),
            json!({"cmd": "exec", "script": "print hi\n", "timeout_ms": 3000})
        );
        let snap = Command::Snapshot {
            dir: PathBuf::from("snap"),
        };
        assert_eq!(
            request(&snap, None, cwd),
            json!({"cmd": "snapshot", "dir": "/home/u/snap"})
        );
        let abs = Command::Snapshot {
            dir: PathBuf::from("/srv/snap"),
        };
        assert_eq!(request(&abs, None, cwd)["dir"], "/srv/snap");
        assert_eq!(request(&Command::Stop, None, cwd), json!({"cmd": "stop"}));
    }

    #[test]
    fn exit_codes() {
        let exec = Command::Exec {
            script: PathBuf::from("s"),
            timeout: None,
        };
        for (status, want) in [
            (json!(0), 0),
            (json!(3), 3),
            (json!(255), 255),
            (json!(256), 255),
            (json!(-1), 255),
            (json!(null), 255),
        ] {
            assert_eq!(
                exit_code(&exec, &json!({"ok": true, "status": status})),
                want,
                "{status}"
            );
        }
        // Other commands' "status" is a word.
        assert_eq!(
            exit_code(&Command::Stop, &json!({"ok": true, "status": "stopped"})),
            0
        );
    }
}
