//! The coverage map of version-2 overlays and the working-set file
//! (FORMAT.md sections 10.5 and 12.5). The first byte picks: 0 the map
//! decoder (what decodes re-encodes to the same bytes; queries and spans
//! never panic), 1 the working-set parser (what parses encodes and
//! re-parses equal, without repeats), 2 the map decoder followed by the
//! coverage check of record bodies, each taken at the lengths its map
//! entry lists (never panics).
#![no_main]

use kimberley_formats::overlay::map::{Coverage, CoverageMap, Location};
use kimberley_formats::overlay::record::{self, Geometry};
use kimberley_formats::working_set;
use libfuzzer_sys::fuzz_target;

/// Launch sizes from the front of the input: 1 to 4 components of up to
/// 16 MiB (so that ranges can be valid).
fn launch(b: &[u8]) -> (Vec<u64>, &[u8]) {
    let n = usize::from(b.first().copied().unwrap_or(0) % 4) + 1;
    let mut sizes = Vec::new();
    let mut rest = b.get(1..).unwrap_or(&[]);
    for _ in 0..n {
        let mut v = 0u64;
        for i in 0..3 {
            v |= u64::from(rest.first().copied().unwrap_or(0)) << (8 * i);
            rest = rest.get(1..).unwrap_or(&[]);
        }
        sizes.push(v);
    }
    (sizes, rest)
}

fn map(b: &[u8]) {
    let (sizes, body) = launch(b);
    let Ok(m) = CoverageMap::decode(body, &sizes, 16) else { return };
    assert_eq!(m.encode(), body, "coverage map round trip");
    for r in &m.ranges {
        assert_ne!(m.locate(r.comp, r.start), Location::Unchanged);
        let _ = m.locate(r.comp, r.start + u64::from(r.count));
    }
    for s in 0..m.segments.len() as u32 + 1 {
        let _ = m.segment_span(s, u64::from(u32::MAX));
    }
}

fn ws(b: &[u8]) {
    let Ok(w) = working_set::parse(b) else { return };
    let mut seen = std::collections::HashSet::new();
    assert!(w.iter().all(|p| seen.insert(*p)), "repeats removed");
    assert_eq!(working_set::parse(&working_set::encode(&w)), Ok(w));
}

fn coverage(b: &[u8]) {
    let (sizes, rest) = launch(b);
    let Some((&k, rest)) = rest.split_first() else { return };
    let cut = usize::from(k).min(rest.len()) * 4;
    let (mb, recs) = rest.split_at(cut.min(rest.len()));
    let Ok(m) = CoverageMap::decode(mb, &sizes, 16) else { return };
    let geo = Geometry {
        launch: sizes.clone(),
        base: sizes,
    };
    let mut c = Coverage::new(&m);
    for (i, body) in recs.split(|&x| x == 0xff).enumerate() {
        let Ok(rs) = record::parse(body, &geo, None) else { return };
        // The lengths as the map lists them (a frame is not built here),
        // so that the record checks are reached.
        let (frame_len, body_len) = m
            .segments
            .get(i)
            .map_or((0, body.len()), |s| (u64::from(s.frame_len), s.body_len as usize));
        if c.segment(frame_len, body_len, &rs).is_err() {
            return;
        }
    }
    let _ = c.finish();
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, b)) = data.split_first() else { return };
    match sel % 3 {
        0 => map(b),
        1 => ws(b),
        _ => coverage(b),
    }
});
