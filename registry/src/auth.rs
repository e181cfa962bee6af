//! Registry credentials: `WWW-Authenticate` challenges and docker-style
//! auth files (`~/.docker/config.json`'s `auths`). Pure parsing; the
//! client does the token requests.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;

use crate::error::{Error, Result};

/// The largest auth file read.
pub const MAX_AUTH_FILE_LEN: u64 = 1 << 20;

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    /// `Basic realm=...`: send the credentials with every request.
    Basic,
    /// `Bearer realm=...,service=...,scope=...`: get a token from `realm`.
    Bearer {
        realm: String,
        service: Option<String>,
        scope: Option<String>,
    },
}

/// Parses one challenge (`Scheme k="v", k2=v2`); `None` if the scheme is
/// neither Basic nor Bearer, or a Bearer challenge has no realm.
pub fn parse_challenge(h: &str) -> Option<Challenge> {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let params = parse_params(rest)?;
    if scheme.eq_ignore_ascii_case("basic") {
        return Some(Challenge::Basic);
    }
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    Some(Challenge::Bearer {
        realm: params.get("realm")?.clone(),
        service: params.get("service").cloned(),
        scope: params.get("scope").cloned(),
    })
}

/// `k=v` or `k="v"` pairs separated by commas (quoted values may hold
/// commas and `\"`); keys are lower-cased.
fn parse_params(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let b = s.as_bytes();
    let mut i = 0;
    loop {
        while i < b.len() && (b[i] == b' ' || b[i] == b',') {
            i += 1;
        }
        if i == b.len() {
            return Some(out);
        }
        let k0 = i;
        while i < b.len() && b[i] != b'=' {
            i += 1;
        }
        if i == b.len() {
            return None;
        }
        let key = s[k0..i].trim().to_ascii_lowercase();
        i += 1;
        while i < b.len() && b[i] == b' ' {
            i += 1;
        }
        let mut val = String::new();
        if i < b.len() && b[i] == b'"' {
            i += 1;
            loop {
                if i == b.len() {
                    return None;
                }
                match b[i] {
                    b'"' => {
                        i += 1;
                        break;
                    }
                    b'\\' if i + 1 < b.len() => {
                        val.push(b[i + 1] as char);
                        i += 2;
                    }
                    _ => {
                        // Whole UTF-8 sequences: copy up to the next ASCII delimiter.
                        let start = i;
                        i += 1;
                        while i < b.len() && b[i] != b'"' && b[i] != b'\\' {
                            i += 1;
                        }
                        val.push_str(&s[start..i]);
                    }
                }
            }
        } else {
            let v0 = i;
            while i < b.len() && b[i] != b',' {
                i += 1;
            }
            val.push_str(s[v0..i].trim());
        }
        out.insert(key, val);
    }
}

/// A user name and password for one registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({:?}, <password>)", self.username)
    }
}

impl Credentials {
    /// The `Authorization: Basic` value.
    pub fn basic(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

/// Where the docker-style auth file is: `$DOCKER_CONFIG/config.json`, else
/// `~/.docker/config.json`.
pub fn default_auth_file() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("DOCKER_CONFIG") {
        return Some(Path::new(&d).join("config.json"));
    }
    std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker/config.json"))
}

/// The host part of an `auths` key: `host[:port]`, or a URL
/// (`https://host[:port]/v1/`) whose host is taken.
fn auths_key_host(k: &str) -> &str {
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    k.split('/').next().unwrap_or(k)
}

/// Finds `registry`'s credentials in an auth file's bytes: `auths.KEY.auth`
/// (base64 of `user:password`) or `username`/`password` members.
pub fn credentials_from(path: &str, bytes: &[u8], registry: &str) -> Result<Option<Credentials>> {
    let bad = |why: String| Error::AuthFile {
        path: path.into(),
        why,
    };
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("not JSON: {e}")))?;
    let Some(auths) = v.get("auths").and_then(|a| a.as_object()) else {
        return Ok(None);
    };
    for (k, entry) in auths {
        if auths_key_host(k) != registry {
            continue;
        }
        if let Some(a) = entry.get("auth").and_then(|a| a.as_str()) {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(a.trim())
                .map_err(|_| bad(format!("{k}: auth is not base64")))?;
            let raw = String::from_utf8(raw).map_err(|_| bad(format!("{k}: auth is not UTF-8")))?;
            let (u, p) = raw
                .split_once(':')
                .ok_or_else(|| bad(format!("{k}: auth is not user:password")))?;
            return Ok(Some(Credentials {
                username: u.into(),
                password: p.into(),
            }));
        }
        if let (Some(u), Some(p)) = (
            entry.get("username").and_then(|x| x.as_str()),
            entry.get("password").and_then(|x| x.as_str()),
        ) {
            return Ok(Some(Credentials {
                username: u.into(),
                password: p.into(),
            }));
        }
    }
    Ok(None)
}

/// Reads `path` (absent: no credentials) for `registry`.
pub fn load_credentials(path: &Path, registry: &str) -> Result<Option<Credentials>> {
    use std::io::Read;
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(format!("opening {}", path.display()), e)),
    };
    let mut bytes = Vec::new();
    f.take(MAX_AUTH_FILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(format!("reading {}", path.display()), e))?;
    if bytes.len() as u64 > MAX_AUTH_FILE_LEN {
        return Err(Error::AuthFile {
            path: path.display().to_string(),
            why: format!("larger than {MAX_AUTH_FILE_LEN} bytes"),
        });
    }
    credentials_from(&path.display().to_string(), &bytes, registry)
}

/// The token in a token endpoint's JSON answer (`token` or `access_token`).
pub fn token_from(bytes: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(bytes).ok()?;
    let t = v.get("token").or_else(|| v.get("access_token"))?.as_str()?;
    // A header value: visible ASCII only.
    (!t.is_empty() && t.bytes().all(|b| (0x21..0x7f).contains(&b))).then(|| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#
            ),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token".into(),
                service: Some("registry.example".into()),
                scope: Some("repository:a/b:pull,push".into()),
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="x""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge(r#"Bearer service="x""#), None);
        assert_eq!(parse_challenge(r#"Negotiate abc"#), None);
        assert_eq!(parse_challenge(r#"Bearer realm="unterminated"#), None);
        assert_eq!(
            parse_challenge(r#"bearer realm=https://t/x , service = "q\"x""#),
            Some(Challenge::Bearer {
                realm: "https://t/x".into(),
                service: Some("q\"x".into()),
                scope: None,
            })
        );
    }

    #[test]
    fn auth_file() {
        let f = br#"{"auths":{"https://reg.example:5000/v1/":{"auth":"dXNlcjpwYTpzcw=="},
                      "other.example":{"username":"u2","password":"p2"}}}"#;
        let c = credentials_from("f", f, "reg.example:5000")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.username.as_str(), c.password.as_str()),
            ("user", "pa:ss")
        );
        assert_eq!(c.basic(), "Basic dXNlcjpwYTpzcw==");
        let c = credentials_from("f", f, "other.example").unwrap().unwrap();
        assert_eq!(c.username, "u2");
        assert_eq!(credentials_from("f", f, "reg.example").unwrap(), None);
        assert!(credentials_from("f", br#"{"auths":{"h":{"auth":"!!"}}}"#, "h").is_err());
        assert!(credentials_from("f", b"nope", "h").is_err());
        assert!(!format!("{c:?}").contains("p2"));
    }

    #[test]
    fn tokens() {
        assert_eq!(token_from(br#"{"token":"abc"}"#).as_deref(), Some("abc"));
        assert_eq!(
            token_from(br#"{"access_token":"x.y"}"#).as_deref(),
            Some("x.y")
        );
        assert_eq!(token_from(br#"{"token":"a\r\nX-Evil: 1"}"#), None);
        assert_eq!(token_from(b"{}"), None);
    }
}
