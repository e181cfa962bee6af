//! Segment bodies: the launch manifest (first) and the index (last). Data
//! segment bodies are sequences of [`super::record`]s.

use super::Pos;
use crate::error::{Error, Result};
use crate::le::Reader;
use crate::vmdir::{Component, Kind};

/// Largest decompressed segment body a reader accepts.
pub const MAX_BODY: usize = 16 << 20;
/// Target size of a data segment body (the reference encoder's default;
/// FORMAT.md section 12.2 says why 4 MiB).
pub const TARGET_BODY: usize = 4 << 20;

fn corrupt(what: &str) -> Error {
    Error::Corrupt(format!("bad {what} segment"))
}

/// The first segment: what the overlay produces, and what it applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestSegment {
    /// Launch VM name.
    pub name: String,
    /// Launch vCPU count.
    pub vcpus: u32,
    /// Launch components (the result of applying the overlay).
    pub launch: Vec<Component>,
    /// Components of the VM the overlay applies to.
    pub base: Vec<Component>,
}

fn put_components(b: &mut Vec<u8>, cs: &[Component]) {
    b.extend_from_slice(&(cs.len() as u16).to_le_bytes());
    for c in cs {
        b.push(c.kind.code());
        b.extend_from_slice(&c.size.to_le_bytes());
        b.extend_from_slice(&c.digest);
    }
}

fn get_components(c: &mut Reader<'_>) -> Result<Vec<Component>> {
    let n = c.u16().map_err(|_| corrupt("manifest"))?;
    if usize::from(n) > crate::vmdir::manifest::MAX_COMPONENTS {
        return Err(corrupt("manifest"));
    }
    let mut out = Vec::with_capacity(n.into());
    for _ in 0..n {
        let kind = c
            .u8()
            .ok()
            .and_then(Kind::from_code)
            .ok_or_else(|| corrupt("manifest"))?;
        let size = c.u64().map_err(|_| corrupt("manifest"))?;
        let digest = c.array().map_err(|_| corrupt("manifest"))?;
        out.push(Component {
            kind,
            size,
            digest,
            trimmed: false,
        });
    }
    Ok(out)
}

impl ManifestSegment {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(self.name.len() as u16).to_le_bytes());
        b.extend_from_slice(self.name.as_bytes());
        b.extend_from_slice(&self.vcpus.to_le_bytes());
        put_components(&mut b, &self.launch);
        put_components(&mut b, &self.base);
        b
    }

    /// Decodes and validates the body (both component lists must form
    /// valid manifests).
    pub fn decode(body: &[u8]) -> Result<ManifestSegment> {
        let mut c = Reader::new(body, "manifest segment");
        let n = c.u16().map_err(|_| corrupt("manifest"))?;
        let name = c
            .take(n.into())
            .ok()
            .and_then(|s| std::str::from_utf8(s).ok())
            .ok_or_else(|| corrupt("manifest"))?
            .to_string();
        let vcpus = c.u32().map_err(|_| corrupt("manifest"))?;
        let launch = get_components(&mut c)?;
        let base = get_components(&mut c)?;
        if c.remaining() != 0 {
            return Err(corrupt("manifest"));
        }
        let seg = ManifestSegment {
            name,
            vcpus,
            launch,
            base,
        };
        seg.launch_manifest()
            .validate_detached()
            .map_err(|e| Error::Corrupt(format!("launch manifest: {e}")))?;
        let mut b = seg.launch_manifest();
        b.components = seg.base.clone();
        b.validate_detached()
            .map_err(|e| Error::Corrupt(format!("base manifest: {e}")))?;
        Ok(seg)
    }

    /// The launch VMDIR manifest (without a machine description: a launch
    /// VM has its base's, see `apply`).
    pub fn launch_manifest(&self) -> crate::vmdir::Manifest {
        crate::vmdir::Manifest {
            name: self.name.clone(),
            vcpus: self.vcpus,
            components: self.launch.clone(),
            machine: None,
        }
    }
}

/// Chunk counts by how they were encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ChunkStats {
    /// Equal to the base at the same offset (not in the overlay).
    pub unchanged: u64,
    /// All zero.
    pub zero: u64,
    /// Copied from the base.
    pub ref_base: u64,
    /// Copied from earlier in the overlay.
    pub ref_self: u64,
    /// Patched from the base chunk at the same offset.
    pub delta: u64,
    /// Given in full.
    pub literal: u64,
}

impl ChunkStats {
    fn fields(&self) -> [u64; 6] {
        [
            self.unchanged,
            self.zero,
            self.ref_base,
            self.ref_self,
            self.delta,
            self.literal,
        ]
    }
    /// Sum of all (saturating: decoded statistics are untrusted).
    pub fn total(&self) -> u64 {
        self.fields().iter().fold(0u64, |a, &b| a.saturating_add(b))
    }
    /// Adds another.
    pub fn add(&mut self, o: &ChunkStats) {
        self.unchanged = self.unchanged.saturating_add(o.unchanged);
        self.zero = self.zero.saturating_add(o.zero);
        self.ref_base = self.ref_base.saturating_add(o.ref_base);
        self.ref_self = self.ref_self.saturating_add(o.ref_self);
        self.delta = self.delta.saturating_add(o.delta);
        self.literal = self.literal.saturating_add(o.literal);
    }
}

/// One data segment, as listed in the index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    /// The segment's STREAM counter (its frame number).
    pub counter: u64,
    /// Offset of its frame header from the start of the overlay.
    pub offset: u64,
    /// Frame length (frame header + sealed segment).
    pub frame_len: u32,
    /// Decompressed body length.
    pub body_len: u32,
    /// Position of its first record.
    pub first: Pos,
    /// Position just after its last record's run.
    pub end: Pos,
    /// Number of records.
    pub records: u32,
}

/// The last segment: where every data segment is, for out-of-order reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Index {
    /// Data segments in stream order.
    pub entries: Vec<IndexEntry>,
    /// Totals over the whole overlay.
    pub stats: ChunkStats,
}

const ENTRY_LEN: usize = 8 + 8 + 4 + 4 + 9 + 9 + 4;

impl Index {
    /// Encodes the body.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(4 + 48 + self.entries.len() * ENTRY_LEN);
        for v in self.stats.fields() {
            b.extend_from_slice(&v.to_le_bytes());
        }
        b.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            b.extend_from_slice(&e.counter.to_le_bytes());
            b.extend_from_slice(&e.offset.to_le_bytes());
            b.extend_from_slice(&e.frame_len.to_le_bytes());
            b.extend_from_slice(&e.body_len.to_le_bytes());
            for p in [e.first, e.end] {
                b.push(p.0);
                b.extend_from_slice(&p.1.to_le_bytes());
            }
            b.extend_from_slice(&e.records.to_le_bytes());
        }
        b
    }

    /// Decodes and checks ordering (a version-1 index).
    pub fn decode(body: &[u8]) -> Result<Index> {
        Self::decode_with(body, 0)
    }

    /// Decodes and checks ordering, except of the first `ws` entries
    /// (the working-set segments of a version-2 overlay, whose positions
    /// follow first-touch order: FORMAT.md section 10.4).
    pub fn decode_with(body: &[u8], ws: usize) -> Result<Index> {
        let mut c = Reader::new(body, "index segment");
        let mut f = [0u64; 6];
        for v in &mut f {
            *v = c.u64().map_err(|_| corrupt("index"))?;
        }
        let stats = ChunkStats {
            unchanged: f[0],
            zero: f[1],
            ref_base: f[2],
            ref_self: f[3],
            delta: f[4],
            literal: f[5],
        };
        let n = c.u32().map_err(|_| corrupt("index"))? as usize;
        if n.checked_mul(ENTRY_LEN) != Some(c.remaining()) {
            return Err(corrupt("index"));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let mut get = || -> Result<IndexEntry, crate::le::LeError> {
                Ok(IndexEntry {
                    counter: c.u64()?,
                    offset: c.u64()?,
                    frame_len: c.u32()?,
                    body_len: c.u32()?,
                    first: (c.u8()?, c.u64()?),
                    end: (c.u8()?, c.u64()?),
                    records: c.u32()?,
                })
            };
            let e = get().map_err(|_| corrupt("index"))?;
            if let Some(p) = entries.last() {
                let p: &IndexEntry = p;
                let next_offset = p.offset.checked_add(u64::from(p.frame_len));
                let ordered = entries.len() > ws;
                if Some(e.counter) != p.counter.checked_add(1)
                    || next_offset.is_none_or(|o| e.offset < o)
                    || (ordered && e.first < p.end)
                {
                    return Err(corrupt("index"));
                }
            }
            if e.end <= e.first {
                return Err(corrupt("index"));
            }
            entries.push(e);
        }
        Ok(Index { entries, stats })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manifest_round_trip() {
        let c = |kind, size| Component {
            kind,
            size,
            digest: [size as u8; 32],
            trimmed: false,
        };
        let m = ManifestSegment {
            name: "x".into(),
            vcpus: 2,
            launch: vec![
                c(Kind::Memory, 8192),
                c(Kind::Disk, 4096),
                c(Kind::State, 5),
            ],
            base: vec![c(Kind::Memory, 8192)],
        };
        assert_eq!(ManifestSegment::decode(&m.encode()).unwrap(), m);
        let mut b = m.encode();
        b.push(0);
        assert!(ManifestSegment::decode(&b).is_err());
    }

    #[test]
    fn index_round_trip() {
        let e = |k: u64| IndexEntry {
            counter: k,
            offset: 200 + k * 100,
            frame_len: 90,
            body_len: 1000,
            first: (0, k * 10),
            end: (0, k * 10 + 5),
            records: 3,
        };
        let ix = Index {
            entries: vec![e(1), e(2)],
            stats: ChunkStats {
                zero: 4,
                ..Default::default()
            },
        };
        assert_eq!(Index::decode(&ix.encode()).unwrap(), ix);
        let bad = Index {
            entries: vec![e(2), e(1)],
            ..ix
        };
        assert!(Index::decode(&bad.encode()).is_err());
    }
}
