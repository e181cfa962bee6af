//! Make's depfile syntax (`TARGET...: DEP...`) for `build --depfile`: pure rendering.

use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A path Make cannot be given in a rule.
#[derive(Debug, PartialEq, Eq)]
pub struct Unrepresentable(pub PathBuf);

impl fmt::Display for Unrepresentable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:?} cannot be written in a Make rule (a newline, NUL or invalid UTF-8)",
            self.0
        )
    }
}

/// One path as GNU Make reads it in a rule: spaces, `#` and `:` (a
/// registry's `HOST:PORT` in a cache path) escaped with a backslash, `$`
/// doubled. Newlines (and bytes that are not UTF-8) have no
/// escape and are refused.
pub fn escape(p: &Path) -> Result<String, Unrepresentable> {
    let bad = || Unrepresentable(p.to_path_buf());
    let bytes = p.as_os_str().as_bytes();
    if bytes.iter().any(|&b| b == b'\n' || b == b'\r' || b == 0) {
        return Err(bad());
    }
    let s = std::str::from_utf8(bytes).map_err(|_| bad())?;
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' ' | '\t' => {
                out.push('\\');
                out.push(c);
            }
            '#' => out.push_str("\\#"),
            ':' => out.push_str("\\:"),
            '$' => out.push_str("$$"),
            c => out.push(c),
        }
    }
    Ok(out)
}

/// `targets: deps`, one dependency a line (backslash-continued), ending in
/// a newline.
pub fn render(targets: &[PathBuf], deps: &[PathBuf]) -> Result<String, Unrepresentable> {
    let mut out = String::new();
    for (i, t) in targets.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&escape(t)?);
    }
    out.push(':');
    for d in deps {
        out.push_str(" \\\n  ");
        out.push_str(&escape(d)?);
    }
    out.push('\n');
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_make_reads_specially() {
        assert_eq!(escape(Path::new("a b/c#d$e")).unwrap(), "a\\ b/c\\#d$$e");
        assert_eq!(escape(Path::new("plain/x.ovl")).unwrap(), "plain/x.ovl");
        assert_eq!(
            escape(Path::new("tags/127.0.0.1:5000/os/v1")).unwrap(),
            "tags/127.0.0.1\\:5000/os/v1"
        );
    }

    #[test]
    fn refuses_newlines() {
        assert!(escape(Path::new("a\nb")).is_err());
    }

    #[test]
    fn renders_a_rule() {
        let t = [PathBuf::from("app.ovl"), PathBuf::from("app vm")];
        let d = [PathBuf::from("base/manifest"), PathBuf::from("os.ovl")];
        assert_eq!(
            render(&t, &d).unwrap(),
            "app.ovl app\\ vm: \\\n  base/manifest \\\n  os.ovl\n"
        );
    }
}
