#!/usr/bin/env bash
# bench-make.sh: the Makefile rows of BENCHMARKS.md (issue 15), measured
# with examples/layers/Makefile and the microVM's test guest:
#   1. a no-op `make` over the three layers (base, OS layer, application
#      layer) once they are built (target <= 50 ms, median of RUNS)
#   2. `build --base BASE --parent os.ovl` of the application layer against
#      `build --base OS-VM` (a base that already contains the parent: the
#      OS layer's launch VM), same scripts and key
#      (target: ratio of the medians <= 1.1)
# Replaces the <!-- bench-make:begin/end --> section of BENCHMARKS.md
# (appended if absent; nothing else is touched).
#
# Environment (all optional):
#   RUNS=21          runs per measurement
#   BIN=DIR          where kimberlize is (default: <repo>/target/release)
#   NO_BUILD=1       skip `cargo build --release --locked -p kimberlize`
#   BENCH_DIR=DIR    work dir parent (default: <repo>/bench-out); work in DIR/make
#   BENCH_MD=FILE    Markdown file to update (default: <repo>/BENCHMARKS.md)
# The machine should be otherwise idle (the section records the load
# average at start and end).
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
(($# == 0)) || { echo "usage: [ENV=...] $0   (see --help)" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
RUNS=${RUNS:-21}
BIN=${BIN:-$ROOT/target/release}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out}
BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
EX=$ROOT/examples/layers
if [[ -z ${NO_BUILD:-} ]]; then
    (cd "$ROOT" && cargo build --release --locked -p kimberlize)
fi
K=$BIN/kimberlize
[[ -x $K ]] || { echo "error: $K is missing (build it, or set BIN)" >&2; exit 1; }

W=$BENCH_DIR/make
rm -rf "$W"
mkdir -p "$W"
cd "$W"
load0=$(cut -d' ' -f1-3 /proc/loadavg)
MAKE=(make -f "$EX/Makefile" "KIMBERLIZE=$K" "SCRIPTS=$EX")

now_ns() { date +%s%N; }
# median of the numbers on stdin, one a line
median() { sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
minmax() { sort -n | awk 'NR==1{lo=$1} {hi=$1} END {print lo " – " hi}'; }

# 1. no-op make
"${MAKE[@]}" >/dev/null 2>&1
"${MAKE[@]}" -q || { echo "error: make -q is false after make" >&2; exit 1; }
: >noop.ms
for _ in $(seq "$RUNS"); do
    t=$(now_ns)
    "${MAKE[@]}" >/dev/null
    echo $(( ($(now_ns) - t) / 1000 )) >>noop.ms   # microseconds
done
noop_us=$(median <noop.ms)

# 2. build --parent against build on a base containing the parent
"$K" build -q --progress none -k overlay.key --base base \
    --install "$EX/os-install.txt" --resume "$EX/os-resume.txt" \
    --launch-out os-vm
app=(--install "$EX/app-install.txt" --resume "$EX/app-resume.txt" -k overlay.key
     -q --progress none --force)
: >parent.ms
: >parents.ms
: >direct.ms
for _ in $(seq "$RUNS"); do
    # alternated, so drift in the machine's load hits both alike
    t=$(now_ns)
    "$K" build --base base --parent os.ovl "${app[@]}" -o p.ovl --stats-json p.json
    echo $(( ($(now_ns) - t) / 1000 )) >>parent.ms
    python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(j.get("parents_ms", j.get("build", {}).get("parents_ms")))' p.json >>parents.ms
    t=$(now_ns)
    "$K" build --base os-vm "${app[@]}" -o d.ovl
    echo $(( ($(now_ns) - t) / 1000 )) >>direct.ms
done
par_us=$(median <parent.ms)
apply_ms=$(median <parents.ms)
dir_us=$(median <direct.ms)
ratio=$(awk -v a="$par_us" -v b="$dir_us" 'BEGIN {printf "%.2f", a / b}')
load1=$(cut -d' ' -f1-3 /proc/loadavg)

ms() { awk -v u="$1" 'BEGIN {printf "%.1f ms", u / 1000}'; }
mm() { minmax <"$1" | awk '{printf "%.1f ms – %.1f ms", $1 / 1000, $3 / 1000}'; }
verdict() { awk -v v="$1" -v lim="$2" 'BEGIN {print (v <= lim) ? "**PASS**" : "**MISS**"}'; }
noop_ms=$(awk -v u="$noop_us" 'BEGIN {printf "%.2f", u / 1000}')
stamp=$(date -u '+%Y-%m-%d %H:%M UTC')
section=$(cat <<MD
<!-- bench-make:begin -->
## Makefile-driven layers (\`scripts/bench-make.sh\`)

Measured by \`scripts/bench-make.sh\` on $stamp: $(nproc) cores, Linux $(uname -r), binaries from \`${BIN#"$ROOT"/}\`.
$RUNS runs per measurement (median, min – max). Load average at start / end: $load0 / $load1.$(awk -v l="${load0%% *}" -v n="$(nproc)" 'BEGIN {if (l > n) printf " **The machine was not quiet** (load above its %d cores: other jobs were building), so the times are noisy.", n}')
Layers: examples/layers/Makefile (base 64M memory, 256M disk; OS layer 16 MiB of memory and 8 MiB of disk; application layer 20 MiB and 12 MiB on top).

| measurement | median | min – max | target | ratio | result |
|---|---|---|---|---|---|
| 1. no-op \`make\` over the three layers (all up to date) | $(ms "$noop_us") | $(mm noop.ms) | ≤ 50 ms | $(awk -v a="$noop_ms" 'BEGIN {printf "%.2f", a / 50}') | $(verdict "$noop_ms" 50) |
| 2a. \`build --base base --parent os.ovl\` (application layer) | $(ms "$par_us") | $(mm parent.ms) | — | — | — |
| 2b. \`build --base os-vm\` (a base that contains the parent) | $(ms "$dir_us") | $(mm direct.ms) | — | — | — |
| 2. build --parent / build on the parent's launch VM | $ratio | — | ≤ 1.1 | $ratio | $(verdict "$ratio" 1.1) |

Row 2 is the cost of \`--parent\`: 2a applies os.ovl in memory over the base's files (\`apply::patch\`: decoded, checked against the launch digests, nothing written out; median $apply_ms ms of each build, its \`parents_ms\`), resumes that VM with the changed pages written into its copy-on-write memory and the changed blocks into its disk copy, and diffs against the same base-plus-changes; 2b resumes a directory that already holds that VM. Everything after the resume is the same work, so the difference of the medians is what applying the parent costs.
<!-- bench-make:end -->
MD
)
cd "$ROOT"
python3 - "$BENCH_MD" "$section" <<'PY'
import sys, re
path, section = sys.argv[1], sys.argv[2]
try:
    text = open(path).read()
except FileNotFoundError:
    text = ""
pat = re.compile(r"<!-- bench-make:begin -->.*?<!-- bench-make:end -->", re.S)
text = pat.sub(lambda m: section, text) if pat.search(text) else text.rstrip("\n") + "\n\n" + section + "\n"
open(path, "w").write(text)
PY
echo "$section"
rm -rf "$W"
