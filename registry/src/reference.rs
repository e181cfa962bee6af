//! References to artifacts: `HOST[:PORT]/REPO[:TAG][@sha256:HEX]`.

use std::fmt;

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The longest reference accepted (the distribution spec's name limit plus
/// a tag and a digest).
pub const MAX_REFERENCE_LEN: usize = 512;

/// A parsed reference. The registry host is always explicit (there is no
/// default registry); without a tag or digest the tag is `latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `host` or `host:port` (`[v6]:port` for IPv6).
    pub registry: String,
    /// The repository name: lower-case path components.
    pub repository: String,
    /// The tag, if one was given (or `latest` when neither was).
    pub tag: Option<String>,
    /// The manifest digest, if one was given.
    pub digest: Option<Digest>,
}

fn bad(s: &str, why: &str) -> Error {
    Error::Reference(s.chars().take(100).collect(), why.into())
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: ".", "_", "__" or one or more "-".
        let start = i;
        while i < b.len() && !is_alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
fn valid_tag(t: &str) -> bool {
    let b = t.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|&x| x.is_ascii_alphanumeric() || matches!(x, b'_' | b'.' | b'-'))
}

/// A host name (labels of letters, digits and inner hyphens, dot
/// separated) or a bracketed IPv6 address, then an optional port.
fn valid_registry(r: &str) -> bool {
    let (host, port) = if let Some(rest) = r.strip_prefix('[') {
        let Some((v6, after)) = rest.split_once(']') else {
            return false;
        };
        if v6.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match after {
            "" => (None, None),
            p => match p.strip_prefix(':') {
                Some(p) => (None, Some(p)),
                None => return false,
            },
        }
    } else {
        match r.rsplit_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(r), None),
        }
    };
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return false;
        }
        if !matches!(p.parse::<u32>(), Ok(1..=65535)) {
            return false;
        }
    }
    match host {
        None => true,
        Some(h) => {
            !h.is_empty()
                && h.len() <= 253
                && h.split('.').all(|l| {
                    let b = l.as_bytes();
                    !b.is_empty()
                        && b.len() <= 63
                        && b[0].is_ascii_alphanumeric()
                        && b[b.len() - 1].is_ascii_alphanumeric()
                        && b.iter().all(|&x| x.is_ascii_alphanumeric() || x == b'-')
                })
        }
    }
}

impl Reference {
    /// Parses `HOST[:PORT]/REPO[:TAG][@sha256:HEX]`.
    pub fn parse(s: &str) -> Result<Reference> {
        if s.len() > MAX_REFERENCE_LEN {
            return Err(bad(s, "too long"));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => (
                r,
                Some(Digest::parse(d).map_err(|_| bad(s, "bad digest (sha256:HEX)"))?),
            ),
            None => (s, None),
        };
        let (registry, path) = rest
            .split_once('/')
            .ok_or_else(|| bad(s, "no registry host (HOST[:PORT]/REPO:TAG)"))?;
        if !valid_registry(registry) {
            return Err(bad(s, "bad registry host"));
        }
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t)),
            _ => (path, None),
        };
        if repository.is_empty() || repository.len() > 255 {
            return Err(bad(s, "bad repository name length"));
        }
        if !repository.split('/').all(valid_component) {
            return Err(bad(
                s,
                "bad repository name (lower-case letters, digits and . _ __ - between them, / between components)",
            ));
        }
        if let Some(t) = tag {
            if !valid_tag(t) {
                return Err(bad(s, "bad tag"));
            }
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some("latest".into()),
        };
        Ok(Reference {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// The host without port (the brackets of an IPv6 address removed).
    pub fn host(&self) -> &str {
        if let Some(rest) = self.registry.strip_prefix('[') {
            return rest.split_once(']').map(|(h, _)| h).unwrap_or(rest);
        }
        self.registry
            .rsplit_once(':')
            .map(|(h, _)| h)
            .unwrap_or(&self.registry)
    }

    /// True if the host is `localhost` or a loopback address: plain HTTP
    /// is allowed to it without `--insecure-http`.
    pub fn is_loopback(&self) -> bool {
        is_loopback_host(self.host())
    }

    /// What a manifest request names: the digest if given, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => "latest".into(),
        }
    }

    /// The same repository with another digest and no tag.
    pub fn with_digest(&self, d: Digest) -> Reference {
        Reference {
            tag: None,
            digest: Some(d),
            ..self.clone()
        }
    }
}

/// True for `localhost` and loopback IP addresses.
pub fn is_loopback_host(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .map(|a| a.is_loopback())
            .unwrap_or(false)
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_the_forms() {
        let r = Reference::parse("127.0.0.1:5000/apps/office:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.host(), "127.0.0.1");
        assert_eq!(r.repository, "apps/office");
        assert_eq!(r.tag.as_deref(), Some("v1"));
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), "127.0.0.1:5000/apps/office:v1");

        let r = Reference::parse(&format!("registry.example.org/office@{D}")).unwrap();
        assert_eq!(r.tag, None);
        assert_eq!(r.manifest_ref(), D);
        assert!(!r.is_loopback());

        let r = Reference::parse("localhost/office").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert!(r.is_loopback());

        let r = Reference::parse(&format!("[::1]:5000/a/b:t@{D}")).unwrap();
        assert_eq!(r.host(), "::1");
        assert!(r.is_loopback());
        assert_eq!(r.to_string(), format!("[::1]:5000/a/b:t@{D}"));
    }

    #[test]
    fn refuses_malformed_references() {
        for s in [
            "office:v1",                          // no host
            "host/",                              // no repository
            "host/Office",                        // upper case
            "host/a//b",                          // empty component
            "host/a/../b",                        // dots as a component
            "host/-a",                            // leading separator
            "host/a:",                            // empty tag
            "host/a:-x",                          // bad tag start
            "host:0/a",                           // port 0
            "host:99999/a",                       // port too large
            "ho_st/a",                            // bad host
            "[zz]:5000/a",                        // bad IPv6
            "host/a@sha256:abc",                  // short digest
            "host/a b",                           // space
            &format!("host/{}", "a".repeat(600)), // too long
        ] {
            assert!(Reference::parse(s).is_err(), "{s}");
        }
    }
}
