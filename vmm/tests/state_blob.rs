//! The state blob decoder on hostile input (no KVM needed): mutations of
//! valid blobs written by the real encoder (testdata/vectors/state) must
//! give `Ok` or `Err` from `validate_state`, never a panic, and no
//! allocation the input size does not justify (every length is checked
//! against its cap before anything is allocated from it).

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::path::Path;

use kimberley_vmm::persist::{seal, HEADER_LEN};
use kimberley_vmm::validate_state;

/// The system allocator, recording the largest single request made by the
/// current thread.
struct Recording;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // try_with: the thread-local may already be gone while a thread exits.
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the
// GlobalAlloc contract; `note` neither allocates nor unwinds.
unsafe impl GlobalAlloc for Recording {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: same layout, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Recording = Recording;

fn vector(name: &str) -> Vec<u8> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../testdata/vectors/state")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Counts of what `check` saw.
#[derive(Default, Debug)]
struct Seen {
    ok: usize,
    err: usize,
}

/// Runs `validate_state` on `blob`: it must return (a panic fails the
/// test), and its largest single allocation must stay within what the
/// input size explains (decoded structures are about as large as their
/// encoding; a vector may double while it grows).
fn check(blob: &[u8], seen: &mut Seen) -> bool {
    LARGEST.with(|l| l.set(0));
    let ok = validate_state(blob).is_ok();
    let largest = LARGEST.with(|l| l.get());
    let limit = 2 * blob.len() + (64 << 10);
    assert!(
        largest <= limit,
        "validate_state of {} bytes allocated {largest} bytes at once",
        blob.len()
    );
    if ok {
        seen.ok += 1;
    } else {
        seen.err += 1;
    }
    ok
}

fn mutate_all(name: &str) -> Seen {
    let blob = vector(name);
    let mut seen = Seen::default();
    assert!(check(&blob, &mut seen), "{name} must validate");
    let body = &blob[HEADER_LEN..];

    // Every strict prefix of the blob, and of the body resealed, is refused
    // (a body holds exactly the sections its counts announce).
    for n in 0..blob.len() {
        assert!(!check(&blob[..n], &mut seen), "{name}: prefix {n} accepted");
    }
    for n in 0..body.len() {
        assert!(
            !check(&seal(&body[..n]), &mut seen),
            "{name}: body prefix {n} accepted"
        );
    }
    // Trailing bytes, sealed or not, are refused.
    let mut long = blob.clone();
    long.push(0);
    assert!(!check(&long, &mut seen));
    assert!(!check(&seal(&[body, &[0][..]].concat()), &mut seen));

    // A huge or wrong body length in the header is refused.
    for len in [u64::MAX, 1 << 40, (64 << 20) + 1, body.len() as u64 + 1] {
        let mut b = blob.clone();
        b[16..24].copy_from_slice(&len.to_le_bytes());
        assert!(!check(&b, &mut seen), "{name}: body length {len} accepted");
    }

    // Bit flips: without resealing the checksum refuses each of them; with
    // the checksum recomputed they reach the sections.
    let mut b = blob.clone();
    for i in (0..blob.len()).step_by(3) {
        let bit = 1 << (i % 8);
        b[i] ^= bit;
        assert!(!check(&b, &mut seen), "{name}: flip at {i} accepted");
        b[i] ^= bit;
    }
    let mut b = body.to_vec();
    for i in 0..body.len() {
        let bit = 1 << (i % 8);
        b[i] ^= bit;
        check(&seal(&b), &mut seen);
        b[i] ^= bit;
    }

    // Every 4-byte window of the body set to large or boundary values:
    // this hits every u32 count and length (sections, byte strings, CPUID
    // entries, MSRs, vCPUs, disks) with values over and just over its cap.
    let values = [
        u32::MAX,
        0x8000_0000,
        (16 << 20) + 1,
        (64 << 10) + 1,
        body.len() as u32 + 1,
        1025,
        257,
        65,
        9,
        0,
    ];
    let mut b = body.to_vec();
    for i in 0..body.len().saturating_sub(3) {
        let orig: [u8; 4] = b[i..i + 4].try_into().unwrap();
        for v in values {
            b[i..i + 4].copy_from_slice(&v.to_le_bytes());
            check(&seal(&b), &mut seen);
        }
        b[i..i + 4].copy_from_slice(&orig);
    }
    // And every 8-byte window to u64::MAX (memory and disk sizes, ring
    // addresses).
    for i in 0..body.len().saturating_sub(7) {
        let orig: [u8; 8] = b[i..i + 8].try_into().unwrap();
        b[i..i + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        check(&seal(&b), &mut seen);
        b[i..i + 8].copy_from_slice(&orig);
    }
    seen
}

#[test]
fn mutated_real_blob_is_refused_or_accepted_without_panic() {
    let seen = mutate_all("vm-v1.bin");
    // Flips inside raw register copies are valid states; flips in counts,
    // tags and lengths are not: both outcomes must have happened.
    assert!(seen.ok > 1000 && seen.err > 1000, "{seen:?}");
}

#[test]
fn mutated_pattern_blob_is_refused_or_accepted_without_panic() {
    let seen = mutate_all("pattern-v1.bin");
    assert!(seen.ok > 1000 && seen.err > 1000, "{seen:?}");
}
