//! The OCI image manifest of an overlay chain: media types, descriptors,
//! the chain config and the annotations read from each overlay's header
//! (docs/FORMAT.md, section 17). Pure: encoding, decoding and checks.

use std::collections::BTreeMap;

use kimberley_formats::crypto::keys::KeyMaterial;
use kimberley_formats::digest::hex;
use kimberley_formats::overlay::header::{Header, HEADER_LEN};
use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{Error, Result};

/// The manifest's own media type (an OCI image manifest).
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// `artifactType` of an overlay chain.
pub const ARTIFACT_TYPE: &str = "application/vnd.kimberley.chain.v1";
/// Media type of the chain config blob.
pub const CONFIG_MEDIA_TYPE: &str = "application/vnd.kimberley.chain.config.v1+json";
/// Media type of each layer: one overlay, byte for byte.
pub const LAYER_MEDIA_TYPE: &str = "application/vnd.kimberley.overlay.v1";

/// Layer annotation: the overlay's `overlay_id` (32 hex digits).
pub const ANN_ID: &str = "org.kimberley.overlay.id";
/// Layer annotation: its `parent_id` (absent for an overlay on a base VM).
pub const ANN_PARENT: &str = "org.kimberley.overlay.parent";
/// Layer annotation: its `depth` (decimal).
pub const ANN_DEPTH: &str = "org.kimberley.overlay.depth";
/// Layer annotation: its header's `base_id` (64 hex digits).
pub const ANN_BASE: &str = "org.kimberley.overlay.base";
/// Layer annotation: its header's `result_id` (64 hex digits).
pub const ANN_RESULT: &str = "org.kimberley.overlay.result";
/// Layer annotation: `none`, `key` or `passphrase`.
pub const ANN_PROTECTION: &str = "org.kimberley.overlay.protection";
/// Manifest annotation: the first layer's `base_id`.
pub const ANN_CHAIN_BASE: &str = "org.kimberley.chain.base";
/// Manifest annotation: the last layer's `result_id`.
pub const ANN_CHAIN_RESULT: &str = "org.kimberley.chain.result";
/// Manifest annotation: the layers' total size in bytes (decimal).
pub const ANN_CHAIN_SIZE: &str = "org.kimberley.chain.size";

/// The largest manifest this client reads or writes (the distribution
/// spec's recommended minimum that registries accept).
pub const MAX_MANIFEST_LEN: usize = 4 << 20;
/// The most layers a chain may have.
pub const MAX_LAYERS: usize = 1024;

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// An OCI image manifest (the members this project writes and reads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// The chain config blob: what the chain applies to and produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainConfig {
    /// 1.
    pub version: u32,
    /// The first overlay's `base_id` (hex).
    pub base: String,
    /// The last overlay's `result_id` (hex).
    pub result: String,
    /// The number of layers.
    pub layers: u32,
}

/// What a layer's annotations say about its overlay (read from its
/// header without the key).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerInfo {
    pub digest: Digest,
    pub size: u64,
    pub overlay_id: [u8; 16],
    pub parent_id: Option<[u8; 16]>,
    pub depth: u32,
    pub base_id: [u8; 32],
    pub result_id: [u8; 32],
    pub protection: &'static str,
}

fn protection_name(p: &KeyMaterial) -> &'static str {
    match p {
        KeyMaterial::None => "none",
        KeyMaterial::KeyFile => "key",
        KeyMaterial::Passphrase(_) => "passphrase",
    }
}

fn unhex<const N: usize>(what: &str, s: &str) -> Result<[u8; N]> {
    let bad = || Error::Manifest(format!("{what}: not {} hex digits", 2 * N));
    if s.len() != 2 * N || !s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err(bad());
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

impl LayerInfo {
    /// Reads an overlay's header (its first [`HEADER_LEN`] bytes or
    /// fewer; the MAC is not checked: that needs the key) for the blob
    /// `digest` of `size` bytes.
    pub fn from_header(name: &str, header: &[u8], digest: Digest, size: u64) -> Result<LayerInfo> {
        let h = Header::decode(&header[..header.len().min(HEADER_LEN)])
            .map_err(|e| Error::Chain(format!("{name}: {e}")))?;
        Ok(LayerInfo {
            digest,
            size,
            overlay_id: h.overlay_id,
            parent_id: h.has_parent().then_some(h.parent_id),
            depth: h.depth,
            base_id: h.base_id,
            result_id: h.result_id,
            protection: protection_name(&h.protection),
        })
    }

    /// The layer's descriptor with its annotations.
    pub fn descriptor(&self) -> Descriptor {
        let mut a = BTreeMap::new();
        a.insert(ANN_ID.into(), hex(&self.overlay_id));
        if let Some(p) = &self.parent_id {
            a.insert(ANN_PARENT.into(), hex(p));
        }
        a.insert(ANN_DEPTH.into(), self.depth.to_string());
        a.insert(ANN_BASE.into(), hex(&self.base_id));
        a.insert(ANN_RESULT.into(), hex(&self.result_id));
        a.insert(ANN_PROTECTION.into(), self.protection.into());
        Descriptor {
            media_type: LAYER_MEDIA_TYPE.into(),
            digest: self.digest,
            size: self.size,
            annotations: a,
        }
    }

    /// Reads a layer descriptor's annotations back.
    pub fn from_descriptor(d: &Descriptor) -> Result<LayerInfo> {
        if d.media_type != LAYER_MEDIA_TYPE {
            return Err(Error::Manifest(format!(
                "layer {} has media type {:?}, not {LAYER_MEDIA_TYPE}",
                d.digest, d.media_type
            )));
        }
        let get = |k: &str| {
            d.annotations
                .get(k)
                .ok_or_else(|| Error::Manifest(format!("layer {} has no {k} annotation", d.digest)))
        };
        let protection = match get(ANN_PROTECTION)?.as_str() {
            "none" => "none",
            "key" => "key",
            "passphrase" => "passphrase",
            other => {
                return Err(Error::Manifest(format!(
                    "layer {}: unknown protection {other:?}",
                    d.digest
                )))
            }
        };
        let depth: u32 = get(ANN_DEPTH)?
            .parse()
            .map_err(|_| Error::Manifest(format!("layer {}: bad depth", d.digest)))?;
        let parent_id = d
            .annotations
            .get(ANN_PARENT)
            .map(|p| unhex::<16>(ANN_PARENT, p))
            .transpose()?;
        if parent_id.is_some() != (depth > 0) {
            return Err(Error::Manifest(format!(
                "layer {}: depth {depth} does not agree with its parent annotation",
                d.digest
            )));
        }
        Ok(LayerInfo {
            digest: d.digest,
            size: d.size,
            overlay_id: unhex(ANN_ID, get(ANN_ID)?)?,
            parent_id,
            depth,
            base_id: unhex(ANN_BASE, get(ANN_BASE)?)?,
            result_id: unhex(ANN_RESULT, get(ANN_RESULT)?)?,
            protection,
        })
    }
}

/// Checks that `layers` form a chain in order: each next overlay names the
/// one before as its parent, one level deeper (and, for unencrypted
/// overlays, whose identities are plain, applies to its result).
pub fn check_chain(layers: &[LayerInfo]) -> Result<()> {
    if layers.is_empty() {
        return Err(Error::Chain("a chain needs at least one overlay".into()));
    }
    if layers.len() > MAX_LAYERS {
        return Err(Error::Chain(format!("more than {MAX_LAYERS} overlays")));
    }
    for (i, w) in layers.windows(2).enumerate() {
        let (a, b) = (&w[0], &w[1]);
        if b.parent_id != Some(a.overlay_id) || b.depth != a.depth.wrapping_add(1) {
            return Err(Error::Chain(format!(
                "overlay {} is not the child of overlay {} (out of chain order, or a missing link)",
                i + 2,
                i + 1
            )));
        }
        if a.protection == "none" && b.protection == "none" && b.base_id != a.result_id {
            return Err(Error::Chain(format!(
                "overlay {} does not apply to the result of overlay {}",
                i + 2,
                i + 1
            )));
        }
    }
    Ok(())
}

impl ChainConfig {
    /// The config of a checked chain.
    pub fn of(layers: &[LayerInfo]) -> ChainConfig {
        ChainConfig {
            version: 1,
            base: hex(&layers[0].base_id),
            result: hex(&layers[layers.len() - 1].result_id),
            layers: layers.len() as u32,
        }
    }

    /// Its canonical bytes (compact JSON, members in the order above).
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain struct encodes")
    }
}

impl Manifest {
    /// The manifest of `layers` (checked with [`check_chain`]) with the
    /// config blob `config` (its encoded bytes).
    pub fn for_chain(layers: &[LayerInfo], config: &[u8]) -> Result<Manifest> {
        check_chain(layers)?;
        let first = &layers[0];
        let last = &layers[layers.len() - 1];
        let mut a = BTreeMap::new();
        a.insert(ANN_CHAIN_BASE.into(), hex(&first.base_id));
        a.insert(ANN_CHAIN_RESULT.into(), hex(&last.result_id));
        a.insert(
            ANN_CHAIN_SIZE.into(),
            layers.iter().map(|l| l.size).sum::<u64>().to_string(),
        );
        Ok(Manifest {
            schema_version: 2,
            media_type: Some(MANIFEST_MEDIA_TYPE.into()),
            artifact_type: Some(ARTIFACT_TYPE.into()),
            config: Descriptor {
                media_type: CONFIG_MEDIA_TYPE.into(),
                digest: Digest::of(config),
                size: config.len() as u64,
                annotations: BTreeMap::new(),
            },
            layers: layers.iter().map(LayerInfo::descriptor).collect(),
            annotations: a,
        })
    }

    /// Its canonical bytes (compact JSON): what is pushed and what its
    /// digest is computed over.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("plain struct encodes")
    }

    /// Parses and checks a manifest: an OCI image manifest of an overlay
    /// chain whose layers' annotations form a chain.
    pub fn decode(bytes: &[u8]) -> Result<Manifest> {
        if bytes.len() > MAX_MANIFEST_LEN {
            return Err(Error::Manifest(format!(
                "larger than {MAX_MANIFEST_LEN} bytes"
            )));
        }
        let m: Manifest =
            serde_json::from_slice(bytes).map_err(|e| Error::Manifest(e.to_string()))?;
        if m.schema_version != 2 {
            return Err(Error::Manifest(format!(
                "schemaVersion {} (expected 2)",
                m.schema_version
            )));
        }
        if let Some(t) = &m.media_type {
            if t != MANIFEST_MEDIA_TYPE {
                return Err(Error::Manifest(format!("media type {t:?}")));
            }
        }
        if m.config.media_type != CONFIG_MEDIA_TYPE {
            return Err(Error::Manifest(format!(
                "config media type {:?}: not an overlay chain",
                m.config.media_type
            )));
        }
        if m.layers.len() > MAX_LAYERS {
            return Err(Error::Manifest(format!("more than {MAX_LAYERS} layers")));
        }
        check_chain(&m.chain()?)?;
        Ok(m)
    }

    /// The layers' annotations, in chain order.
    pub fn chain(&self) -> Result<Vec<LayerInfo>> {
        self.layers.iter().map(LayerInfo::from_descriptor).collect()
    }

    /// The layers' total size.
    pub fn total_size(&self) -> u64 {
        self.layers
            .iter()
            .map(|l| l.size)
            .fold(0, u64::saturating_add)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Vec<LayerInfo> {
        let l1 = LayerInfo {
            digest: Digest::of(b"layer one"),
            size: 9,
            overlay_id: [1; 16],
            parent_id: None,
            depth: 0,
            base_id: [0xb0; 32],
            result_id: [0xb1; 32],
            protection: "key",
        };
        let l2 = LayerInfo {
            digest: Digest::of(b"layer two"),
            size: 9,
            overlay_id: [2; 16],
            parent_id: Some([1; 16]),
            depth: 1,
            base_id: [0xc1; 32],
            result_id: [0xc2; 32],
            protection: "key",
        };
        vec![l1, l2]
    }

    fn testdata(name: &str) -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../testdata/oci")
            .join(name)
    }

    /// The golden manifest of docs/FORMAT.md section 17: encoding gives
    /// exactly its bytes, and decoding it gives the chain back.
    #[test]
    fn golden_manifest() {
        let layers = sample();
        let config = ChainConfig::of(&layers).encode();
        let m = Manifest::for_chain(&layers, &config).unwrap();
        let golden_config = std::fs::read(testdata("config.json")).unwrap();
        let golden = std::fs::read(testdata("manifest.json")).unwrap();
        // The files end with a newline; the blobs do not.
        assert_eq!(config, golden_config.trim_ascii_end());
        assert_eq!(
            String::from_utf8(m.encode()).unwrap(),
            String::from_utf8(golden.trim_ascii_end().to_vec()).unwrap()
        );
        let back = Manifest::decode(golden.trim_ascii_end()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.chain().unwrap(), layers);
        assert_eq!(back.total_size(), 18);
    }

    #[test]
    fn refuses_broken_chains() {
        let mut l = sample();
        l.swap(0, 1);
        assert!(matches!(check_chain(&l), Err(Error::Chain(_))));
        let mut l = sample();
        l[1].parent_id = Some([9; 16]);
        assert!(check_chain(&l).is_err());
        let mut l = sample();
        l[1].depth = 2;
        assert!(check_chain(&l).is_err());
        // Unencrypted identities are plain: the link is checked too.
        let mut l = sample();
        for x in &mut l {
            x.protection = "none";
        }
        assert!(check_chain(&l).is_err());
        l[1].base_id = l[0].result_id;
        check_chain(&l).unwrap();
        assert!(check_chain(&[]).is_err());
    }

    #[test]
    fn refuses_foreign_manifests() {
        let layers = sample();
        let config = ChainConfig::of(&layers).encode();
        let good = Manifest::for_chain(&layers, &config).unwrap();
        let mut m = good.clone();
        m.config.media_type = "application/vnd.oci.image.config.v1+json".into();
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = good.clone();
        m.layers[0].media_type = "application/vnd.oci.image.layer.v1.tar".into();
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = good.clone();
        m.layers[1].annotations.remove(ANN_PARENT);
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = good.clone();
        m.layers.swap(0, 1);
        assert!(Manifest::decode(&m.encode()).is_err());
        let mut m = good;
        m.schema_version = 1;
        assert!(Manifest::decode(&m.encode()).is_err());
        assert!(Manifest::decode(b"{").is_err());
        assert!(Manifest::decode(&vec![b' '; MAX_MANIFEST_LEN + 1]).is_err());
    }
}
