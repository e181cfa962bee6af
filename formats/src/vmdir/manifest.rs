//! `manifest.json`: pure parsing, validation and encoding.

use serde::{Deserialize, Serialize};

use super::machine::MachineSpec;
use crate::digest::{self, Digest};

/// The `format` value every manifest carries.
pub const FORMAT: &str = "kimberley-vmdir";
/// The manifest version of VM directories without a machine description
/// (the microVM's).
pub const VERSION: u32 = 1;
/// The manifest version of VM directories with one (`machine`).
pub const VERSION_MACHINE: u32 = 2;
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST_BYTES: usize = 1 << 20;
/// Most disks a VMDIR may have.
pub const MAX_DISKS: usize = 64;
/// Most components a VMDIR may have: memory, the disks, kernel, initrd
/// and state.
pub const MAX_COMPONENTS: usize = MAX_DISKS + 4;
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
    /// The kernel a machine booted (at most one, after the disks; version
    /// 2 only).
    Kernel,
    /// Its initial RAM disk (at most one, after the kernel; version 2
    /// only).
    Initrd,
}

impl Kind {
    /// The code used in binary formats.
    pub fn code(self) -> u8 {
        match self {
            Kind::Memory => 1,
            Kind::Disk => 2,
            Kind::State => 3,
            Kind::Kernel => 4,
            Kind::Initrd => 5,
        }
    }

    /// Inverse of [`Kind::code`].
    pub fn from_code(c: u8) -> Option<Kind> {
        match c {
            1 => Some(Kind::Memory),
            2 => Some(Kind::Disk),
            3 => Some(Kind::State),
            4 => Some(Kind::Kernel),
            5 => Some(Kind::Initrd),
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
    /// A disk whose free file-system blocks were made holes when it was
    /// imported (FORMAT.md 5.2 `trimmed`); its digest is of those bytes.
    pub trimmed: bool,
}

/// A validated manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// A human-readable name.
    pub name: String,
    /// vCPU count.
    pub vcpus: u32,
    /// Components in canonical order: memory, disks, kernel, initrd,
    /// state.
    pub components: Vec<Component>,
    /// What runs it, for backends other than the microVM (version 2).
    pub machine: Option<Box<MachineSpec>>,
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    machine: Option<MachineSpec>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawComponent {
    kind: Kind,
    file: String,
    size: u64,
    blake3: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    trimmed: Option<bool>,
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
    #[error("not a {FORMAT} version {VERSION} or {VERSION_MACHINE} manifest (format {0:?}, version {1})")]
    Version(String, u32),
    /// A rule of FORMAT.md is broken.
    #[error("manifest: {0}")]
    Rule(String),
}

/// The sum of the components' sizes: what a VM (or an overlay's launch
/// VM) holds, in bytes.
pub fn total_size(components: &[Component]) -> u64 {
    components.iter().map(|c| c.size).sum()
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

    /// Checks the structural rules of FORMAT.md, for a component list
    /// that travels without its machine description (an overlay's
    /// manifest segment: the machine comes from the base VM directory), so
    /// a kernel or initrd needs none here.
    pub fn validate_detached(&self) -> Result<(), ManifestError> {
        self.check(true)
    }

    /// Checks the structural rules of FORMAT.md.
    pub fn validate(&self) -> Result<(), ManifestError> {
        self.check(false)
    }

    /// The rules; `detached`: the machine description travels apart.
    fn check(&self, detached: bool) -> Result<(), ManifestError> {
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
        // Canonical order: memory, disks, kernel, initrd, state; each
        // later kind only after every earlier one.
        let rank = |k: Kind| match k {
            Kind::Memory => 0,
            Kind::Disk => 1,
            Kind::Kernel => 2,
            Kind::Initrd => 3,
            Kind::State => 4,
        };
        let mut disks = 0;
        for (i, c) in self.components.iter().enumerate().skip(1) {
            let prev = self.components[i - 1].kind;
            match c.kind {
                Kind::Memory => return rule("more than one memory component".into()),
                Kind::Disk => disks += 1,
                Kind::State if c.size > MAX_STATE_SIZE => {
                    return rule(format!("state blob larger than {MAX_STATE_SIZE} bytes"));
                }
                _ => {}
            }
            if rank(c.kind) < rank(prev) || (rank(c.kind) == rank(prev) && c.kind != Kind::Disk) {
                return rule(
                    "components must be in the order memory, disks, kernel, initrd, state, with at most one of each but disks"
                        .into(),
                );
            }
        }
        match &self.machine {
            Some(m) => m.validate().map_err(ManifestError::Rule)?,
            None if detached => {}
            None => {
                if let Some(c) = self
                    .components
                    .iter()
                    .find(|c| matches!(c.kind, Kind::Kernel | Kind::Initrd))
                {
                    return rule(format!(
                        "a {:?} component needs a machine description (version {VERSION_MACHINE})",
                        c.kind
                    ));
                }
            }
        }
        if let Some(c) = self
            .components
            .iter()
            .find(|c| c.trimmed && c.kind != Kind::Disk)
        {
            return rule(format!("a {:?} component cannot be trimmed", c.kind));
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
        if format != FORMAT
            || (version != u64::from(VERSION) && version != u64::from(VERSION_MACHINE))
        {
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
        let mut components = Vec::with_capacity(raw.components.len().min(MAX_COMPONENTS));
        for rc in &raw.components {
            let digest = digest::from_hex(&rc.blake3)
                .ok_or_else(|| ManifestError::Rule(format!("bad blake3 digest {:?}", rc.blake3)))?;
            // Present only as true: one spelling per manifest.
            if rc.trimmed == Some(false) {
                return Err(ManifestError::Rule(
                    "trimmed is written only as true".into(),
                ));
            }
            let trimmed = rc.trimmed == Some(true);
            components.push(Component {
                kind: rc.kind,
                size: rc.size,
                digest,
                trimmed,
            });
            if components.len() > MAX_COMPONENTS {
                return Err(ManifestError::Rule("too many components".into()));
            }
        }
        // Version 2 exactly when a machine is described.
        if raw.machine.is_some() != (raw.version == VERSION_MACHINE) {
            return Err(ManifestError::Rule(format!(
                "a version {VERSION_MACHINE} manifest has a machine description, a version {VERSION} one has none"
            )));
        }
        let m = Manifest {
            name: raw.name,
            vcpus: raw.vcpus,
            components,
            machine: raw.machine.map(Box::new),
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
            version: if self.machine.is_some() {
                VERSION_MACHINE
            } else {
                VERSION
            },
            machine: self.machine.as_deref().cloned(),
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
                    trimmed: c.trimmed.then_some(true),
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
/// from 0; ignored for the other kinds), `kernel`, `initrd` or
/// `state.bin`. Every VMDIR file name comes from here or from
/// [`Manifest::file_name`].
pub fn file_name(kind: Kind, disk: usize) -> String {
    match kind {
        Kind::Memory => "memory.raw".into(),
        Kind::State => "state.bin".into(),
        Kind::Disk => format!("disk{disk}.raw"),
        Kind::Kernel => "kernel".into(),
        Kind::Initrd => "initrd".into(),
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
                    trimmed: false,
                },
                Component {
                    kind: Kind::Disk,
                    size: 4096,
                    digest: [2; 32],
                    trimmed: false,
                },
                Component {
                    kind: Kind::State,
                    size: 10,
                    digest: [3; 32],
                    trimmed: false,
                },
            ],
            machine: None,
        }
    }

    fn qemu_sample() -> Manifest {
        let mut m = sample();
        let state = m.components.pop().unwrap();
        for (kind, d) in [(Kind::Kernel, 4u8), (Kind::Initrd, 5)] {
            m.components.push(Component {
                kind,
                size: 100,
                digest: [d; 32],
                trimmed: false,
            });
        }
        m.components.push(state);
        m.machine = Some(Box::new(MachineSpec {
            backend: "qemu".into(),
            version: "7.2.19".into(),
            machine_type: "pc-i440fx-7.2".into(),
            accel: "tcg".into(),
            cpu: "qemu64".into(),
            cmdline: "console=ttyS0".into(),
            devices: vec!["virtio-blk-pci".into(), "virtio-serial-pci".into()],
        }));
        m
    }

    #[test]
    fn version_2_carries_the_machine_and_boot_files() {
        let m = qemu_sample();
        m.validate().unwrap();
        let enc = m.encode();
        let text = String::from_utf8(enc.clone()).unwrap();
        assert!(text.contains("\"version\": 2"), "{text}");
        assert!(text.contains("\"file\": \"kernel\"") && text.contains("\"file\": \"initrd\""));
        let back = Manifest::parse(&enc).unwrap();
        assert_eq!(back, m);
        // The machine is not part of the identity (a launch VM inherits it).
        let mut other = m.clone();
        other.machine.as_mut().unwrap().accel = "kvm".into();
        assert_eq!(other.identity(), m.identity());
        // A microVM manifest stays version 1, byte for byte.
        assert!(String::from_utf8(sample().encode())
            .unwrap()
            .contains("\"version\": 1"));
    }

    #[test]
    fn version_and_machine_go_together() {
        let v2 = String::from_utf8(qemu_sample().encode()).unwrap();
        // Version 1 with a machine, version 2 without one: refused.
        let v1_with = v2.replace("\"version\": 2", "\"version\": 1");
        assert!(matches!(
            Manifest::parse(v1_with.as_bytes()),
            Err(ManifestError::Rule(_))
        ));
        let mut m = sample();
        m.machine = None;
        let v2_without = String::from_utf8(m.encode())
            .unwrap()
            .replace("\"version\": 1", "\"version\": 2");
        assert!(Manifest::parse(v2_without.as_bytes()).is_err());
        // Version 3 is a version error.
        let v3 = v2.replace("\"version\": 2", "\"version\": 3");
        assert!(matches!(
            Manifest::parse(v3.as_bytes()),
            Err(ManifestError::Version(_, 3))
        ));
        // An unknown machine member is refused.
        let extra = v2.replace("\"cpu\":", "\"gpu\": \"x\", \"cpu\":");
        assert!(Manifest::parse(extra.as_bytes()).is_err());
    }

    #[test]
    fn boot_files_need_a_machine_and_their_place() {
        let mut m = qemu_sample();
        m.machine = None;
        assert!(m.validate().is_err(), "a kernel without a machine");
        assert!(m.validate_detached().is_ok(), "an overlay's own list");
        let mut m = qemu_sample();
        m.components.swap(2, 3); // initrd before kernel
        assert!(m.validate().is_err());
        let mut m = qemu_sample();
        let k = m.components[2].clone();
        m.components.insert(2, k); // two kernels
        assert!(m.validate().is_err());
        let mut m = qemu_sample();
        let d = m.components.remove(1);
        m.components.insert(3, d); // a disk after the kernel
        assert!(m.validate().is_err());
        let mut m = qemu_sample();
        m.machine.as_mut().unwrap().backend = String::new();
        assert!(m.validate().is_err());
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
