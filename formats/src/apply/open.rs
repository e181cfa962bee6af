//! Opening an overlay: header, keys, MAC, manifest segment; chain checks.

use std::io::Read;

use super::Input;
use crate::crypto::keys::{commit_id, OverlayKeys, Secret};
use crate::crypto::{reader_keys, sealer_for, ReadPolicy, Sealer};
use crate::digest::short_id as short;
use crate::error::{Error, Result};
use crate::overlay::frame::SegmentKind;
use crate::overlay::header::Header;
use crate::overlay::io::FrameReader;
use crate::overlay::map::{CoverageMap, Location, SegmentSpan};
use crate::overlay::record::Geometry;
use crate::overlay::segment::ManifestSegment;
use crate::vmdir::VmDir;

/// An overlay whose header authenticated and whose manifest was read; the
/// reader is positioned at the first data segment.
pub struct Opened {
    /// Name for messages.
    pub name: String,
    /// The header.
    pub header: Header,
    /// Opens segments.
    pub sealer: Sealer,
    /// The manifest segment.
    pub manifest: ManifestSegment,
    /// The keys (None for an unencrypted overlay).
    pub keys: Option<OverlayKeys>,
    /// The coverage map (version 2; FORMAT.md section 10.5).
    pub map: Option<CoverageMap>,
    /// Offset of the first data segment (just after the map, or the
    /// manifest in version 1): [`CoverageMap::segment_span`]'s base.
    pub data_start: u64,
    /// The rest of the stream.
    pub reader: FrameReader<Box<dyn Read + Send>>,
}

impl std::fmt::Debug for Opened {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Opened({})", self.name)
    }
}

fn named(name: &str, e: Error) -> Error {
    match e {
        Error::Truncated(s) => Error::Truncated(format!("{name}: {s}")),
        Error::Corrupt(s) => Error::Corrupt(format!("{name}: {s}")),
        Error::Auth(s) => Error::Auth(format!("{name}: {s}")),
        Error::Key(s) => Error::Key(format!("{name}: {s}")),
        Error::Usage(s) => Error::Usage(format!("{name}: {s}")),
        Error::Io { context, source } => Error::Io {
            context: format!("{name}: {context}"),
            source,
        },
        Error::Empty => Error::Truncated(format!("{name} is empty")),
        Error::NotAnOverlay => {
            Error::Corrupt(format!("{name} is not a Kimberley overlay (bad magic)"))
        }
        other => other,
    }
}

impl Opened {
    /// Reads the header, derives keys under `policy` (refusing, before any
    /// key derivation, an unencrypted overlay when a secret is given and
    /// Argon2id costs over the caps), checks the MAC and reads the manifest
    /// segment.
    pub fn open(input: Input, secret: Option<&Secret>, policy: &ReadPolicy) -> Result<Opened> {
        let name = input.name;
        Self::open_inner(&name, input.reader, secret, policy).map_err(|e| named(&name, e))
    }

    fn open_inner(
        name: &str,
        reader: Box<dyn Read + Send>,
        secret: Option<&Secret>,
        policy: &ReadPolicy,
    ) -> Result<Opened> {
        let mut reader = FrameReader::new(reader);
        let (header, _) = reader.header()?;
        let keys = reader_keys(&header, secret, policy)?;
        header.verify_mac(keys.as_ref())?;
        let sealer = sealer_for(&header, keys.as_ref());
        let frame = reader
            .next_frame()?
            .ok_or_else(|| Error::Truncated("no manifest segment".into()))?;
        if frame.header.kind != SegmentKind::Manifest {
            return Err(Error::Corrupt("first segment is not the manifest".into()));
        }
        let body = frame.open(&sealer)?;
        let manifest = ManifestSegment::decode(&body)?;
        if commit_id(keys.as_ref(), &manifest.launch_manifest().identity()) != header.result_id {
            return Err(Error::Corrupt(
                "manifest does not match the header's result identity".into(),
            ));
        }
        let map = if header.has_map() {
            let frame = reader
                .next_frame()?
                .ok_or_else(|| Error::Truncated("no coverage map segment".into()))?;
            if frame.header.kind != SegmentKind::Map {
                return Err(Error::Corrupt(
                    "second segment of a version-2 overlay is not the coverage map".into(),
                ));
            }
            let body = frame.open(&sealer)?;
            let launch: Vec<u64> = manifest.launch.iter().map(|c| c.size).collect();
            Some(CoverageMap::decode(&body, &launch, sealer.overhead())?)
        } else {
            None
        };
        Ok(Opened {
            name: name.to_string(),
            header,
            sealer,
            manifest,
            keys,
            map,
            data_start: reader.bytes_read,
            reader,
        })
    }

    /// Where chunk `chunk` of launch component `comp` comes from, once
    /// the coverage map has been read: `None` for a version-1 overlay
    /// (no map: nothing is known before the index).
    pub fn locate(&self, comp: u8, chunk: u64) -> Option<Location> {
        self.map.as_ref().map(|m| m.locate(comp, chunk))
    }

    /// Data segment `s`'s counter, offset and frame length, for a reader
    /// that seeks (version 2).
    pub fn segment_span(&self, s: u32) -> Option<SegmentSpan> {
        self.map.as_ref()?.segment_span(s, self.data_start)
    }

    /// The identity of the VM this overlay produces.
    pub fn result_identity(&self) -> [u8; 32] {
        self.manifest.launch_manifest().identity()
    }

    /// True when this overlay applies to a VM of identity `id`.
    pub fn applies_to(&self, id: &[u8; 32]) -> bool {
        commit_id(self.keys.as_ref(), id) == self.header.base_id
    }

    /// Component sizes records are checked against.
    pub fn geometry(&self) -> Geometry {
        Geometry {
            launch: self.manifest.launch.iter().map(|c| c.size).collect(),
            base: self.manifest.base.iter().map(|c| c.size).collect(),
        }
    }
}

/// Checks that `chain` applies to `base` in this order, with no missing
/// link, before anything is written.
pub fn check_chain(base: &VmDir, chain: &[Opened]) -> Result<()> {
    let first = &chain[0];
    if !first.applies_to(&base.identity()) {
        return Err(if first.header.has_parent() {
            Error::Chain(format!(
                "{} is layer {} and needs its parent overlay {} applied first",
                first.name,
                first.header.depth,
                short(&first.header.parent_id)
            ))
        } else {
            Error::WrongBase(format!(
                "{} was made from another base VM, not from {} (identity {})",
                first.name,
                base.path.display(),
                short(&base.identity())
            ))
        });
    }
    if first.manifest.base != base.manifest.components {
        return Err(Error::Corrupt(format!(
            "{}: base components disagree with the header",
            first.name
        )));
    }
    for w in chain.windows(2) {
        let (a, b) = (&w[0], &w[1]);
        if b.header.parent_id != a.header.overlay_id
            || !b.applies_to(&a.result_identity())
            || b.header.depth != a.header.depth + 1
        {
            return Err(Error::Chain(if b.header.has_parent() {
                format!(
                    "{} must follow overlay {}, but follows {} ({}); give the overlays in chain order",
                    b.name,
                    short(&b.header.parent_id),
                    a.name,
                    short(&a.header.overlay_id)
                )
            } else {
                format!("{} applies to a base VM, not on top of {}", b.name, a.name)
            }));
        }
        if b.manifest.base != a.manifest.launch {
            return Err(Error::Corrupt(format!(
                "{}: base components disagree with the header",
                b.name
            )));
        }
    }
    Ok(())
}
