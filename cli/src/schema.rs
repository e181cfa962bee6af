//! JSON outputs: each carries `"schema": N`, the version of its keys (docs/JSON.md).

use anyhow::{bail, Result};
use serde::Serialize;
use serde_json::Value;

/// The JSON documents the tools write (docs/JSON.md has a section for each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonOutput {
    /// `kimberlize inspect OVL --json`.
    InspectOverlay,
    /// `kimberlize inspect VMDIR --json`.
    InspectVmdir,
    /// `kimberlize diff --stats-json`.
    DiffStats,
    /// `kimberlize build --stats-json`.
    BuildStats,
    /// `dekimberlize --stats-json` (with `--run`, also the resume times).
    ApplyStats,
    /// `vmigrate send --stats-json`.
    SendStats,
    /// `vmigrate recv --stats-json`.
    RecvStats,
    /// `kimberlize offload --json`.
    Offload,
}

impl JsonOutput {
    /// The version of this output's keys: raised when a key is removed or
    /// changes meaning (adding a key keeps it).
    pub const fn version(self) -> u32 {
        match self {
            JsonOutput::InspectOverlay
            | JsonOutput::InspectVmdir
            | JsonOutput::DiffStats
            | JsonOutput::BuildStats
            | JsonOutput::ApplyStats
            | JsonOutput::SendStats
            | JsonOutput::RecvStats
            | JsonOutput::Offload => 1,
        }
    }
}

/// `value` as JSON with `"schema": N` added (it must serialise to an object).
pub fn versioned<T: Serialize + ?Sized>(kind: JsonOutput, value: &T) -> Result<Value> {
    let mut v = serde_json::to_value(value)?;
    let Some(m) = v.as_object_mut() else {
        bail!("the {kind:?} output is not a JSON object");
    };
    m.insert("schema".into(), kind.version().into());
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_version_to_objects_only() {
        let v = versioned(JsonOutput::DiffStats, &serde_json::json!({"a": 1})).unwrap();
        assert_eq!(v, serde_json::json!({"a": 1, "schema": 1}));
        assert!(versioned(JsonOutput::DiffStats, &[1, 2]).is_err());
    }
}
