#!/usr/bin/env bash
# bench-early.sh: issue 11's early-start row of BENCHMARKS.md. A microVM
# launch VM (1 GiB memory and disk; the synthesis row's 200 MiB of data
# plus a 4 MiB region its resume script reads) is built with
# `kimberlize build --early-start`, then synthesised RUNS times through a
# pipe limited to RATE bytes/s with `dekimberlize --run --early-start`, and
# FULL_RUNS times without --early-start for comparison. Reports the overlay
# bytes read at the guest's first instruction (target <= 15 %), the first
# answer to the resume script's checksum (<= 0.2 x transfer time) and the
# committed VMDIR (<= 1.1 x transfer time); replaces the
# <!-- bench-early:begin/end --> section of BENCHMARKS.md.
#
# Environment (all optional):
#   RUNS=5 FULL_RUNS=2   runs with and without --early-start
#   RATE=12500000        pipe limit in bytes/s (100 Mbit/s)
#   BENCH_DIR=DIR        work dir parent (default: <repo>/bench-out); work in DIR/early
#   BENCH_MD=FILE        Markdown file to update (default: <repo>/BENCHMARKS.md)
#   NO_BUILD=1           use the release binaries already built
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cmd_env=""
for v in RUNS FULL_RUNS RATE BENCH_DIR BENCH_MD NO_BUILD; do
    if [[ -n ${!v+x} ]]; then cmd_env+="$v=${!v} "; fi
done
RUNS=${RUNS:-5} FULL_RUNS=${FULL_RUNS:-2} RATE=${RATE:-12500000}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out}
BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
WORK=$BENCH_DIR/early
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
K=$REL/kimberlize D=$REL/dekimberlize
HELPER=$ROOT/scripts/bench/early.py
log() { printf '[bench-early %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

command -v pv >/dev/null || die "pv is needed (apt-get install pv)"
if [[ ${NO_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release --locked -q -p kimberlize -p dekimberlize)
fi
load=$(cut -d' ' -f1-3 /proc/loadavg)
rm -rf "$WORK" && mkdir -p "$WORK" && cd "$WORK"
"$K" keygen -o key.key
"$K" base -o base --memory 1G --disk 1G -q
cat >install.txt <<'SCRIPT'
fill t 120M 3 text
fill r 60M 4 random
fill hot 4M 6 text
disk-write 0 20M 5
checksum hot
SCRIPT
printf 'counter start\nchecksum hot\nsleep 10\ncounter\n' >resume.txt
printf 'checksum hot\n' >check.txt
log "building the launch VM and its early-start overlay"
"$K" build --base base --install install.txt --resume resume.txt -k key.key -o early.ovl \
    --early-start --working-set-out ws.txt --stats-json build.json -q 2>build.console ||
    { cat build.console >&2; die "build failed"; }
want=$(grep '^checksum hot' build.console | head -n1)
bytes=$(stat -c %s early.ovl)
log "overlay: $bytes bytes, working set $(($(wc -l <ws.txt) - 1)) pages"
: >results.jsonl
one() {
    rm -rf out
    sync
    python3 "$HELPER" run "$D" base early.ovl key.key out ctl.sock stats.json "$RATE" check.txt "$@" >>results.jsonl
    got=$(tail -n1 results.jsonl | python3 -c 'import json,sys; print(json.load(sys.stdin)["output"].splitlines()[0])')
    [[ $got == "$want" ]] || die "the guest's checksum differs: '$got' vs '$want'"
}
for i in $(seq 1 "$RUNS"); do log "early run $i"; one; done
for i in $(seq 1 "$FULL_RUNS"); do log "full-apply run $i"; one --no-early; done
rm -rf out
sec=$(mktemp)
python3 "$HELPER" report results.jsonl "$bytes" "$RATE" "${cmd_env}scripts/bench-early.sh" "$load" \
    "$(date -u '+%Y-%m-%d %H:%M UTC')" "$(pv --version | head -n1 | cut -d" " -f1-2)" >"$sec"
cat "$sec"
python3 "$ROOT/scripts/bench/update-section.py" bench-early "$BENCH_MD" "$sec"
rm -f "$sec"
