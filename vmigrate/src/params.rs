//! The `params` of the control socket's `migrate` request: one serde type,
//! unknown fields refused, every field checked before anything connects.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// What `vmigrate send` asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Params {
    /// Receiver address (host:port).
    pub to: String,
    /// Key file: an absolute path to a regular file.
    pub key_file: PathBuf,
    /// Downtime target, milliseconds.
    pub downtime_ms: u64,
    /// Cap on bytes per second on the wire.
    #[serde(default)]
    pub max_bandwidth: Option<u64>,
    /// Most pre-copy rounds after round 0.
    pub max_rounds: u32,
    /// Limit for the whole migration, milliseconds.
    pub timeout_ms: u64,
    /// Disks are on storage both hosts share: do not copy them.
    #[serde(default)]
    pub shared_disk: bool,
}

impl Params {
    /// To the request's JSON.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).expect("plain data serialises")
    }

    /// From the request's JSON, checked (see [`Params::check`]).
    pub fn from_json(v: &Value) -> Result<Params> {
        let p = Params::deserialize(v).map_err(|e| anyhow::anyhow!("migrate: {e}"))?;
        p.check()?;
        Ok(p)
    }

    /// Refuses what the process serving the socket must not act on: a
    /// key file that is not an absolute path to a regular file (the server
    /// reads it with its own rights; a relative path would be resolved
    /// against its directory, not the client's), zero limits.
    pub fn check(&self) -> Result<()> {
        if !self.key_file.is_absolute() {
            bail!(
                "migrate: key_file must be an absolute path, not {}",
                self.key_file.display()
            );
        }
        match std::fs::symlink_metadata(&self.key_file) {
            Ok(m) if m.file_type().is_file() => {}
            Ok(_) => bail!(
                "migrate: key_file {} is not a regular file",
                self.key_file.display()
            ),
            Err(e) => bail!("migrate: key_file {}: {e}", self.key_file.display()),
        }
        if self.to.is_empty() {
            bail!("migrate: no receiver address");
        }
        if self.max_bandwidth == Some(0) || self.timeout_ms == 0 {
            bail!("migrate: max_bandwidth and timeout_ms must be positive");
        }
        Ok(())
    }

    /// The downtime target.
    pub fn downtime(&self) -> Duration {
        Duration::from_millis(self.downtime_ms)
    }

    /// The overall limit.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn good(key: &std::path::Path) -> Value {
        json!({"to": "127.0.0.1:1", "key_file": key, "downtime_ms": 50,
               "max_bandwidth": null, "max_rounds": 30, "timeout_ms": 1000,
               "shared_disk": false})
    }

    #[test]
    fn refuses_unknown_fields_relative_and_odd_key_files() {
        let t = tempfile::tempdir().unwrap();
        let key = t.path().join("k");
        std::fs::write(&key, [0u8; 32]).unwrap();
        let p = Params::from_json(&good(&key)).unwrap();
        assert_eq!(Params::from_json(&p.to_json()).unwrap(), p);

        let mut v = good(&key);
        v["extra"] = json!(1);
        assert!(Params::from_json(&v).is_err());
        let mut v = good(&key);
        v["key_file"] = json!("k");
        assert!(Params::from_json(&v).is_err());
        let mut v = good(&key);
        v["key_file"] = json!(t.path());
        assert!(Params::from_json(&v).is_err(), "a directory");
        let link = t.path().join("l");
        std::os::unix::fs::symlink(&key, &link).unwrap();
        let mut v = good(&key);
        v["key_file"] = json!(link);
        assert!(Params::from_json(&v).is_err(), "a symlink");
        let mut v = good(&key);
        v["downtime_ms"] = json!("50");
        assert!(Params::from_json(&v).is_err());
        let mut v = good(&key);
        v.as_object_mut().unwrap().remove("to");
        assert!(Params::from_json(&v).is_err());
    }
}
