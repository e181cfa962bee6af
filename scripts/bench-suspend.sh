#!/usr/bin/env bash
# bench-suspend.sh: suspending a resumed microVM that changed little of its
# memory (issue 11: write only the pages dirtied since the restore),
# measured with `vmm/examples/suspend.rs`: a 1 GiB guest whose memory is
# almost all data is restored copy-on-write from its VMDIR, writes 8 MiB of
# fresh data and is suspended (`{"cmd":"stop"}` does `save_in_place`):
#   - back into its own directory, once the memory file's block hashes
#     (computed in the background after the restore) are ready, and right
#     after its writes (the suspend then hashes what is left itself);
#   - into a new directory (`save_into`).
# Each suspended VM is resumed and its regions' checksums compared, and the
# directory's digests verified, inside the example. "Before" is the same
# example built from BEFORE_REV (default: the merge base with main) with the code of that
# revision; the target is 100 ms plus the changed bytes at disk speed (the
# example writes and fsyncs that many bytes to measure it).
# Replaces the <!-- bench-suspend:begin/end --> section of BENCHMARKS.md.
#
# Environment (all optional):
#   RUNS=5          runs (each runs before and after once, alternating)
#   MEMORY_MIB=1024 guest memory; DIRTY_MIB=8 what the guest writes
#   BEFORE_REV=REV  the revision measured as "before" (default: where HEAD left main)
#   BENCH_DIR=DIR   work dir parent (default: <repo>/bench-out)
#   BENCH_MD=FILE   Markdown file to update (default: <repo>/BENCHMARKS.md)
#   NO_BUILD=1      use the binaries already built in BENCH_DIR/suspend
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
(($# == 0)) || { echo "usage: [ENV=...] $0   (see --help)" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-5}
MEMORY_MIB=${MEMORY_MIB:-1024}
DIRTY_MIB=${DIRTY_MIB:-8}
BEFORE_REV=${BEFORE_REV:-$(git -C "$ROOT" merge-base HEAD main)}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out}
BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
WORK=$BENCH_DIR/suspend
mkdir -p "$WORK"
AFTER=$WORK/suspend-after
BEFORE=$WORK/suspend-before
if [[ -z ${NO_BUILD:-} ]]; then
    (cd "$ROOT" && cargo build --release --locked -p kimberley-vmm --example suspend)
    cp "$ROOT/target/release/examples/suspend" "$AFTER"
    # The same example on the code of BEFORE_REV, without what that code
    # lacks (between the example's before:skip markers).
    SRC=$WORK/before-src
    rm -rf "$SRC"
    mkdir -p "$SRC"
    git -C "$ROOT" archive "$BEFORE_REV" | tar -x -C "$SRC"
    sed '/before:skip-begin/,/before:skip-end/d; s|^// before:use ||' \
        "$ROOT/vmm/examples/suspend.rs" >"$SRC/vmm/examples/suspend.rs"
    # A target directory of its own: cargo names the workspace crates'
    # artifacts alike in both trees and would mix them up in one.
    (cd "$SRC" && CARGO_TARGET_DIR=$WORK/before-target cargo build --release --locked -p kimberley-vmm --example suspend)
    cp "$WORK/before-target/release/examples/suspend" "$BEFORE"
fi
[[ -x $AFTER && -x $BEFORE ]] || { echo "error: $AFTER or $BEFORE is missing (unset NO_BUILD)" >&2; exit 1; }

LOAD0=$(cut -d' ' -f1-3 /proc/loadavg)
RAW=$WORK/results-$(date -u +%Y%m%d-%H%M%S).jsonl
: >"$RAW"
for ((r = 1; r <= RUNS; r++)); do
    BEFORE=1 "$BEFORE" "$MEMORY_MIB" "$DIRTY_MIB" "$WORK" | sed 's/^{/{"code":"before",/' >>"$RAW"
    "$AFTER" "$MEMORY_MIB" "$DIRTY_MIB" "$WORK" | sed 's/^{/{"code":"after",/' >>"$RAW"
done
LOAD1=$(cut -d' ' -f1-3 /proc/loadavg)

SECTION=$WORK/section.md
python3 - "$RAW" "$SECTION" "$RUNS" "$MEMORY_MIB" "$DIRTY_MIB" "$LOAD0" "$LOAD1" "$BEFORE_REV" \
    "$(git -C "$ROOT" rev-parse --short "$BEFORE_REV" 2>/dev/null || echo unknown)" \
    "$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)" "$(nproc)" "$(uname -r)" <<'PY'
import json, statistics, sys, datetime
raw, out, runs, mem, dirty, load0, load1, brev, bsha, rev, cpus, kernel = sys.argv[1:]
rows = [json.loads(l) for l in open(raw) if l.strip()]
def col(code, mode, key):
    return [r[key] for r in rows if r["code"] == code and r["mode"] == mode and r.get(key) is not None]
med = statistics.median
def cell(xs, fmt):
    return f"{fmt(med(xs))} ({fmt(min(xs))} – {fmt(max(xs))})" if xs else "—"
ms = lambda v: f"{v:.0f} ms"
mib = lambda b: f"{b / 2**20:.1f} MiB"
verdict = lambda ok: "**PASS**" if ok else "**MISS**"
busy = max(float(load0.split()[0]), float(load1.split()[0])) > int(cpus) * 0.5
disk = col("after", "disk", "write_fsync_ms") + col("before", "disk", "write_fsync_ms")
target = 100 + med(disk)
def row(name, mode, target_cell=True):
    b, a = col("before", mode, "suspend_ms"), col("after", mode, "suspend_ms")
    t = f"≤ {target:.0f} ms" if target_cell else "—"
    v = verdict(med(a) <= target) if target_cell and a else "—"
    return f"| {name} | {cell(b, ms)} | {cell(a, ms)} | {t} | {v} |"
lines = [
    "<!-- bench-suspend:begin -->",
    "## Suspending a resumed VM (`scripts/bench-suspend.sh`)",
    "",
    f"Measured by `scripts/bench-suspend.sh` on {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC "
    f"(repo {rev}; before: {brev}, {bsha}): {cpus} CPUs, Linux {kernel}, ext4, "
    f"`vmm/examples/suspend.rs` in release builds ({runs} runs each, alternating; median, min – max). "
    f"Load average at start / end: {load0} / {load1}"
    + (". **The machine was not quiet** (other builds ran): times are noisy." if busy else "."),
    f"A {mem} MiB microVM guest, its memory almost all data, is restored copy-on-write from its VMDIR, "
    f"writes {dirty} MiB of fresh data (changed since the restore: {cell(col('after', 'in_place', 'changed_bytes'), mib)}, "
    "from `/proc/self/pagemap`) and is suspended. Every suspended VM was resumed and its regions' checksums "
    "matched, and its VMDIR's digests verified. Target: 100 ms plus the changed bytes at disk speed "
    f"({dirty} MiB written and fsynced: {cell(disk, ms)}).",
    "",
    "| suspend | before | after | target | result |",
    "|---|---|---|---|---|",
    row("in place (`{\"cmd\":\"stop\"}`), the memory file's hashes ready", "in_place"),
    row("in place, right after the guest's writes", "in_place_early", True),
    row("into a new directory (`save_into`)", "elsewhere", False),
    "",
    "After a restore the memory file's block hashes come from the directory's `memory.blocks` "
    "(FORMAT.md section 5.8, written by the suspend that made it) at once; without one, a background "
    "thread (nice 19) hashes the file and a suspend before it is done hashes the rest itself, on all "
    f"cores (the hashes were there {cell(col('after', 'in_place', 'hashed_ms'), ms)} after the restore "
    "started: when the check ran, after the guest's writes). Into a new directory on ext4 (no reflinks) "
    "the whole memory is still written and fsynced; only the read-back hashing is saved. Before has no "
    "early row: the old code does the same work whenever the stop comes, so its in-place cell applies.",
    "<!-- bench-suspend:end -->",
]
open(out, "w").write("\n".join(lines) + "\n")
PY
python3 "$ROOT/scripts/bench/update-section.py" bench-suspend "$BENCH_MD" "$SECTION"
echo "bench-suspend: $BENCH_MD updated (raw: $RAW)"
