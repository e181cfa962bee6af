//! `manifest.json`: pure parsing, validation and encoding.

use serde::{Deserialize, Serialize};

use crate::digest::{self, Digest};

/// The `format` value every manifest carries.
pub const FORMAT: &str = "kimberley-vmdir";
/// The manifest version this build writes and reads.
pub const VERSION: u32 = 1;
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Most disks a VMDIR may have.
pub const MAX_DISKS: usize = 64;
/// Largest component (1 TiB).
pub const MAX_COMPONENT_SIZE: u64 = 1 << 40;
/// Largest state blob (64 MiB).
pub const MAX_STATE_SIZE: u64 = 64 << 20;
/// Longest VM name.
pub const MAX_NAME: usize = 255;

/// What a component is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// Guest memory (exactly one, first).
    Memory,
    /// A raw disk (zero or more, after memory).
    Disk,
    /// The opaque vCPU + device state (at most one, last).
    State,
}

impl Kind {
    /// The code used in binary formats.
    pub fn code(self) -> u8 {
        match self {
            Kind::Memory => 1,
            Kind::Disk => 2,
            Kind::State => 3,
        }
    }

    /// Inverse of [`Kind::code`].
    pub fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::Memory),
            2 => Some(Kind::Disk),
            3 => Some(Kind::State),
            _ => None,
        }
    }
}

/// One component file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Component {
    /// What it is.
    pub kind: Kind,
    /// Logical size in bytes (the file may be sparse).
    pub size: u64,
    /// Component digest (see `digest`).
    pub digest: Digest,
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// A human-readable name.
    pub name: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Components in canonical order: memory, disks, state.
    pub components: Vec<Component>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawManifest {
    format: String,
    version: u32,
    name: String,
    memory_size: u64,
    vcpus: u32,
    components: Vec<RawComponent>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    kind: Kind,
    file: String,
    size: u64,
    blake3: String,
}

/// Why a manifest was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    /// Over [`MAX_MANIFEST_BYTES`].
    #[error("manifest is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    /// Not JSON of the right shape.
    #[error("manifest is not valid: {0}")]
    Syntax(String),
    /// Another format or version.
    #[error("not a {FORMAT} version {VERSION} manifest (format {0:?}, version {1})")]
    Version(String, u32),
    /// A rule of FORMAT.md is broken.
    #[error("manifest: {0}")]
    Rule(String),
}

impl Manifest {
    /// The file name of component `i` (fixed by kind and position).
    pub fn file_name(&self, i: usize) -> String {
        file_name_for(&self.components, i)
    }

    /// The memory size.
    pub fn memory_size(&self) -> u64 {
        self.components[0].size
    }

    /// The state component, if any.
    pub fn state_index(&self) -> Option<usize> {
        self.components.iter().position(|c| c.kind == Kind::State)
    }

    /// Indices of the disks, in order.
    pub fn disk_indices(&self) -> Vec<usize> {
        (0..self.components.len())
            .filter(|&i| self.components[i].kind == Kind::Disk)
            .collect()
    }

    /// The identity of the VM this manifest describes: a hash of vCPU count
    /// and every component's kind, size and digest (not the name).
    pub fn identity(&self) -> Digest {
        let mut h = blake3::Hasher::new_derive_key("kimberley 2026 vm identity v1");
        h.update(&self.vcpus.to_le_bytes());
        h.update(&(self.components.len() as u32).to_le_bytes());
        for c in &self.components {
            h.update(&[c.kind.code()]);
            h.update(&c.size.to_le_bytes());
            h.update(&c.digest);
        }
        *h.finalize().as_bytes()
    }

    /// Checks the structural rules of FORMAT.md.
    pub fn validate(&self) -> Result<(), ManifestError> {
        let rule = |s: String| Err(ManifestError::Rule(s));
        if self.name.is_empty()
            || self.name.len() > MAX_NAME
            || self.name.chars().any(char::is_control)
        {
            return rule(format!(
                "name must be 1-{MAX_NAME} bytes without control characters"
            ));
        }
        if self.vcpus == 0 || self.vcpus > 255 {
            return rule("vcpus must be 1-255".into());
        }
        let n = self.components.len();
        if n == 0 || self.components[0].kind != Kind::Memory {
            return rule("the first component must be the memory".into());
        }
        if self.components[0].size == 0 || !self.components[0].size.is_multiple_of(4096) {
            return rule("the memory size must be a non-zero multiple of 4096".into());
        }
        let mut disks = 0;
        for (i, c) in self.components.iter().enumerate().skip(1) {
            match c.kind {
                Kind::Memory => return rule("more than one memory component".into()),
                Kind::Disk => {
                    if self.components[..i].iter().any(|p| p.kind == Kind::State) {
                        return rule("the state component must come last".into());
                    }
                    disks += 1;
                }
                Kind::State => {
                    if i != n - 1 {
                        return rule("the state component must come last".into());
                    }
                    if c.size > MAX_STATE_SIZE {
                        return rule(format!("state blob larger than {MAX_STATE_SIZE} bytes"));
                    }
                }
            }
        }
        if disks > MAX_DISKS {
            return rule(format!("more than {MAX_DISKS} disks"));
        }
        if let Some(c) = self.components.iter().find(|c| c.size > MAX_COMPONENT_SIZE) {
            return rule(format!("{:?} component larger than 1 TiB", c.kind));
        }
        Ok(())
    }

    /// Parses and validates `manifest.json` bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge);
        }
        // Check format and version before the exact shape, so a future
        // version gets a version error rather than a syntax error.
        // Parsed with duplicate member names refused: a plain `Value` keeps
        // the last of two equal names, so two readers could disagree on
        // what a manifest says.
        let Unique(loose) =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        if !loose.is_object() {
            return Err(ManifestError::Syntax("not a JSON object".into()));
        }
        let format = loose
            .get("format")
            .and_then(|v| v.as_str())
            .unwrap_or_default();
        let version = loose.get("version").and_then(|v| v.as_u64()).unwrap_or(0);
        if format != FORMAT || version != u64::from(VERSION) {
            return Err(ManifestError::Version(
                format.to_string(),
                version.min(u32::MAX as u64) as u32,
            ));
        }
        // Serde also reads a struct from an array of its fields; the format
        // says objects.
        if let Some(cs) = loose.get("components").and_then(|c| c.as_array()) {
            if let Some(i) = cs.iter().position(|c| !c.is_object()) {
                return Err(ManifestError::Syntax(format!(
                    "component {i} is not a JSON object"
                )));
            }
        }
        let raw: RawManifest =
            serde_json::from_value(loose).map_err(|e| ManifestError::Syntax(e.to_string()))?;
        let mut components = Vec::with_capacity(raw.components.len().min(MAX_DISKS + 2));
        for rc in &raw.components {
            let digest = digest::from_hex(&rc.blake3)
                .ok_or_else(|| ManifestError::Rule(format!("bad blake3 digest {:?}", rc.blake3)))?;
            components.push(Component {
                kind: rc.kind,
                size: rc.size,
                digest,
            });
            if components.len() > MAX_DISKS + 2 {
                return Err(ManifestError::Rule("too many components".into()));
            }
        }
        let m = Manifest {
            name: raw.name,
            vcpus: raw.vcpus,
            components,
        };
        m.validate()?;
        for (i, rc) in raw.components.iter().enumerate() {
            if rc.file != m.file_name(i) {
                return Err(ManifestError::Rule(format!(
                    "component {i} must be stored in {:?}, not {:?}",
                    m.file_name(i),
                    rc.file
                )));
            }
        }
        if raw.memory_size != m.memory_size() {
            return Err(ManifestError::Rule(
                "memory_size differs from the memory component's size".into(),
            ));
        }
        Ok(m)
    }

    /// Encodes as pretty JSON with a final newline.
    pub fn encode(&self) -> Vec<u8> {
        let raw = RawManifest {
            format: FORMAT.into(),
            version: VERSION,
            name: self.name.clone(),
            memory_size: self.memory_size(),
            vcpus: self.vcpus,
            components: self
                .components
                .iter()
                .enumerate()
                .map(|(i, c)| RawComponent {
                    kind: c.kind,
                    file: self.file_name(i),
                    size: c.size,
                    blake3: digest::hex(&c.digest),
                })
                .collect(),
        };
        let mut v = serde_json::to_vec_pretty(&raw).expect("manifest serialises");
        v.push(b'\n');
        v
    }
}

/// A JSON value, parsed like [`serde_json::Value`] except that an object
/// repeating a member name is refused.
struct Unique(serde_json::Value);

impl<'de> Deserialize<'de> for Unique {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueVisitor).map(Unique)
    }
}

struct UniqueVisitor;

impl<'de> serde::de::Visitor<'de> for UniqueVisitor {
    type Value = serde_json::Value;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_i64<E>(self, v: i64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_u64<E>(self, v: u64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_f64<E>(self, v: f64) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(v.into())
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(serde_json::Value::Null)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut v = Vec::new();
        while let Some(Unique(x)) = seq.next_element()? {
            v.push(x);
        }
        Ok(v.into())
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut obj = serde_json::Map::new();
        while let Some(k) = map.next_key::<String>()? {
            let Unique(v) = map.next_value()?;
            if obj.contains_key(&k) {
                return Err(serde::de::Error::custom(format!("duplicate member {k:?}")));
            }
            obj.insert(k, v);
        }
        Ok(obj.into())
    }
}

fn file_name_for(components: &[Component], i: usize) -> String {
    let disk = components[..i]
        .iter()
        .filter(|c| c.kind == Kind::Disk)
        .count();
    file_name(components[i].kind, disk)
}

/// The canonical file name of a component of `kind` (FORMAT.md §5.1):
/// `memory.raw`, `disk{disk}.raw` (`disk` is the ordinal among the disks,
/// from 0; ignored for the other kinds) or `state.bin`. Every VMDIR file
/// name comes from here or from [`Manifest::file_name`].
pub fn file_name(kind: Kind, disk: usize) -> String {
    match kind {
        Kind::Memory => "memory.raw".into(),
        Kind::State => "state.bin".into(),
        Kind::Disk => format!("disk{disk}.raw"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            name: "demo".into(),
            vcpus: 1,
            components: vec![
                Component {
                    kind: Kind::Memory,
                    size: 8192,
                    digest: [1; 32],
                },
                Component {
                    kind: Kind::Disk,
                    size: 4096,
                    digest: [2; 32],
                },
                Component {
                    kind: Kind::State,
                    size: 10,
                    digest: [3; 32],
                },
            ],
        }
    }

    #[test]
    fn round_trip() {
        let m = sample();
        let bytes = m.encode();
        assert_eq!(Manifest::parse(&bytes).unwrap(), m);
        assert_eq!(m.file_name(1), "disk0.raw");
        assert_eq!(m.file_name(2), file_name(Kind::State, 0));
        assert_eq!(file_name(Kind::Disk, 12), "disk12.raw");
        assert_eq!(file_name(Kind::Memory, 3), "memory.raw");
    }

    #[test]
    fn refuses_bad_manifests() {
        let good = String::from_utf8(sample().encode()).unwrap();
        for (from, to) in [
            ("\"version\": 1", "\"version\": 2"),
            ("disk0.raw", "../etc/passwd"),
            ("\"vcpus\": 1", "\"vcpus\": 0"),
            ("\"memory_size\": 8192", "\"memory_size\": 1"),
            ("\"kind\": \"state\"", "\"kind\": \"memory\""),
        ] {
            let bad = good.replace(from, to);
            assert_ne!(bad, good);
            assert!(Manifest::parse(bad.as_bytes()).is_err(), "accepted {to}");
        }
        assert!(Manifest::parse(b"").is_err());
        assert!(Manifest::parse(&vec![b' '; MAX_MANIFEST_BYTES + 1]).is_err());
    }

    #[test]
    fn refuses_duplicate_members() {
        let good = String::from_utf8(sample().encode()).unwrap();
        assert!(Manifest::parse(good.as_bytes()).is_ok());
        let mut accepted = Vec::new();
        for (from, to) in [
            // Top level: a second `name` after the first (the last would win).
            (
                "\"name\": \"demo\",",
                "\"name\": \"demo\",\n  \"name\": \"other\",",
            ),
            // Top level: `vcpus` twice with the same value.
            ("\"vcpus\": 1,", "\"vcpus\": 1,\n  \"vcpus\": 1,"),
            // Inside a component: a second `size`.
            ("\"size\": 4096,", "\"size\": 4096,\n      \"size\": 8192,"),
            // Inside a component: a second `blake3`.
            (
                "\"file\": \"memory.raw\",",
                "\"file\": \"memory.raw\",\n      \"blake3\": \"00\",",
            ),
        ] {
            let bad = good.replacen(from, to, 1);
            assert_ne!(bad, good);
            match Manifest::parse(bad.as_bytes()) {
                Err(ManifestError::Syntax(e)) if e.contains("duplicate") => {}
                other => accepted.push(format!("{to:?}: {other:?}")),
            }
        }
        assert!(
            accepted.is_empty(),
            "duplicated members not refused: {accepted:#?}"
        );
    }

    #[test]
    fn refuses_components_that_are_not_objects() {
        let m = sample();
        let hex = |i: usize| digest::hex(&m.components[i].digest);
        let bad = format!(
            r#"{{"format": "kimberley-vmdir", "version": 1, "name": "demo", "memory_size": 8192,
                "vcpus": 1, "components": [["memory", "memory.raw", 8192, "{}"]]}}"#,
            hex(0)
        );
        assert!(
            Manifest::parse(bad.as_bytes()).is_err(),
            "accepted an array as a component"
        );
        let bad = format!(
            r#"["kimberley-vmdir", 1, "demo", 8192, 1, [["memory", "memory.raw", 8192, "{}"]]]"#,
            hex(0)
        );
        assert!(
            Manifest::parse(bad.as_bytes()).is_err(),
            "accepted an array as a manifest"
        );
    }

    #[test]
    fn identity_ignores_name_but_not_content() {
        let a = sample();
        let mut b = sample();
        b.name = "other".into();
        assert_eq!(a.identity(), b.identity());
        b.components[1].digest[0] ^= 1;
        assert_ne!(a.identity(), b.identity());
    }
}
