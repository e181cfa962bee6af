#!/usr/bin/env bash
# bench-vm.sh: the microVM rows of BENCHMARKS.md, measured with the release
# kimberlize / dekimberlize and the project's KVM test guest:
#   1. `kimberlize base -o DIR --memory 256M --disk 1G` wall time (target < 1 s)
#   2. resume of a synthesised 1 GiB guest (512 MiB filled): restore to first
#      guest instruction (target < 50 ms), restore to first answer, VmRSS of
#      dekimberlize when the control socket appears (target: far below the guest
#      memory, here < 10 %), and the time `{"cmd":"stop"}` takes to suspend back
#   3. synthesis of a 200 MiB-of-data overlay through a 100 Mbit/s pipe
#      (`pv -L 12500000 app.ovl | dekimberlize ...`) against the unlimited
#      `dekimberlize -i app.ovl`, durable and --no-sync
#      (target: durable limited time <= 1.1 x overlay bytes / 12.5 MB/s)
# Each measurement runs RUNS times; the report gives median, min - max and
# PASS/MISS with the ratio, and replaces the <!-- bench-vm:begin/end -->
# section of BENCHMARKS.md (appended if absent; nothing else is touched).
# Raw results: $BENCH_DIR/vm/results-STAMP.tsv, logs next to it.
#
# Environment (all optional):
#   RUNS=5            runs per measurement
#   QUICK=1           256M guest, about 40 MiB of overlay data, 1 run; data under
#                     $BENCH_DIR/vm/quick and the Markdown goes to
#                     $BENCH_DIR/vm/quick/BENCHMARKS.md (unless BENCH_MD)
#   BENCH_DIR=DIR     work dir parent (default: <repo>/bench-out); work is in DIR/vm
#   BENCH_MD=FILE     Markdown file to update (default: <repo>/BENCHMARKS.md)
#   RATE=12500000     pipe rate limit in bytes/s for row 3 (100 Mbit/s)
#   NO_INSTALL=1      never call apt-get
#   NO_BUILD=1        skip `cargo build --release --locked` (use the binaries in target/release)
# The machine should be otherwise idle for numbers worth keeping (check
# /proc/loadavg first); the section records the load average.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
(($# == 0)) || { echo "usage: [ENV=...] $0   (see --help)" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
HELPER=$ROOT/scripts/bench/vm.py

cmd_env=""
for v in QUICK RUNS BENCH_DIR BENCH_MD RATE NO_INSTALL NO_BUILD; do
    if [[ -n ${!v+x} ]]; then cmd_env+="$v=${!v} "; fi
done
BENCH_CMD="${cmd_env}scripts/bench-vm.sh"

QUICK=${QUICK:-0}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out}
RATE=${RATE:-12500000}
R1_MEM=256M R1_DISK=1G
if [[ $QUICK == 1 ]]; then
    RUNS=${RUNS:-1}
    WORK=$BENCH_DIR/vm/quick
    BENCH_MD=${BENCH_MD:-$WORK/BENCHMARKS.md}
    VM_MEM=256M VM_MEM_BYTES=$((256 << 20)) VM_DISK=256M
    R2_FILL=(32M 32M) R3_FILL=(24M 12M 4M)
else
    RUNS=${RUNS:-5}
    WORK=$BENCH_DIR/vm
    BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
    VM_MEM=1G VM_MEM_BYTES=$((1 << 30)) VM_DISK=1G
    R2_FILL=(256M 256M) R3_FILL=(120M 60M 20M)
fi
[[ $RUNS =~ ^[1-9][0-9]*$ ]] || { echo "RUNS must be a positive integer" >&2; exit 2; }
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
K=$REL/kimberlize
D=$REL/dekimberlize
GTIME=/usr/bin/time

log() { printf '[bench-vm %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
now_us() { echo "${EPOCHREALTIME/./}"; }

# ---------------------------------------------------------------------------
# Dependencies.

install_deps() {
    local need=() sudo=""
    command -v pv >/dev/null || need+=(pv)
    [[ -x $GTIME ]] || need+=(time)
    command -v python3 >/dev/null || need+=(python3)
    ((${#need[@]} == 0)) && return 0
    [[ ${NO_INSTALL:-0} == 1 ]] && die "missing ${need[*]} and NO_INSTALL=1"
    command -v apt-get >/dev/null || die "missing ${need[*]}; no apt-get here: install them by hand"
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    log "installing ${need[*]}"
    if ! DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}" >&2; then
        $sudo apt-get update >&2
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}" >&2
    fi
}
install_deps
command -v cargo >/dev/null || die "cargo not found (install Rust from https://rustup.rs)"
[[ -r /dev/kvm && -w /dev/kvm ]] || die "no usable /dev/kvm"

if [[ ${NO_BUILD:-0} == 1 ]]; then
    log "NO_BUILD=1: using the existing $K and $D"
else
    log "building (release)"
    (cd "$ROOT" && cargo build --release --locked -p kimberlize -p dekimberlize) ||
        die "cargo build --release --locked failed (Cargo.lock out of date with a Cargo.toml?)"
fi
[[ -x $K && -x $D ]] || die "kimberlize/dekimberlize missing after build"

# ---------------------------------------------------------------------------
# Setup.

mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
STAMP=$(date +%Y%m%d-%H%M%S)
TSV=$WORK/results-$STAMP.tsv
LOGS=$WORK/logs-$STAMP
mkdir -p "$LOGS"
cd "$WORK"
rm -rf r1-base base r2.ovl r3.ovl out r2.sock key.key ./*.txt
: >"$TSV"
meta() { printf 'meta\t0\t%s\t%s\n' "$1" "$2" >>"$TSV"; }
put() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$TSV"; }
jget() { python3 "$HELPER" get "$@"; }
# sync this file system only, so that one run's writeback does not land in the next
settle() { sync -f "$WORK"; }

meta date "$(date -u '+%Y-%m-%d %H:%M UTC')"
meta nproc "$(nproc)"
meta cpu "$(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
meta mem "$(awk '/^MemTotal/ {printf "%.0f GiB", $2 / 1048576}' /proc/meminfo)"
meta kernel "$(uname -r)"
meta command "$BENCH_CMD"
meta runs "$RUNS"
meta quick "$QUICK"
meta rate "$RATE"
meta load_start "$(cut -d' ' -f1-3 /proc/loadavg)"
log "work dir $WORK, $RUNS run(s), load $(cut -d' ' -f1-3 /proc/loadavg)"

"$K" keygen -o key.key

# ---------------------------------------------------------------------------
# Row 1: kimberlize base.

meta r1_memory "$R1_MEM"
meta r1_disk "$R1_DISK"
for run in $(seq 1 "$RUNS"); do
    rm -rf r1-base
    settle
    t0=$(now_us)
    "$GTIME" -o "$LOGS/r1-$run.time" -f '%M' "$K" base -o r1-base --memory "$R1_MEM" --disk "$R1_DISK" \
        >"$LOGS/r1-$run.out" 2>&1 || { cat "$LOGS/r1-$run.out" >&2; die "kimberlize base failed (run $run)"; }
    t1=$(now_us)
    ms=$(((t1 - t0) / 1000))
    put base "$run" wall_ms "$(awk -v us=$((t1 - t0)) 'BEGIN {printf "%.1f", us / 1000}')"
    put base "$run" maxrss_kib "$(tail -n1 "$LOGS/r1-$run.time")"
    log "row 1 run $run: kimberlize base in $ms ms"
done
rm -rf r1-base

# ---------------------------------------------------------------------------
# The base shared by rows 2 and 3.

log "base: --memory $VM_MEM --disk $VM_DISK"
"$K" base -o base --memory "$VM_MEM" --disk "$VM_DISK" >"$LOGS/base.out" 2>&1 ||
    { cat "$LOGS/base.out" >&2; die "kimberlize base failed"; }
printf 'counter start\nsleep 10\ncounter\nprint ready\n' >resume.txt

# ---------------------------------------------------------------------------
# Row 2: resume of a synthesised guest.

cat >r2-install.txt <<EOF
fill a ${R2_FILL[0]} 1 text
fill b ${R2_FILL[1]} 2 random
checksum a
checksum b
EOF
log "row 2: building the overlay (${R2_FILL[0]} text + ${R2_FILL[1]} random)"
"$K" build --base base --install r2-install.txt --resume resume.txt -k key.key -o r2.ovl \
    --stats-json "$LOGS/r2-build.json" -q 2>"$LOGS/r2-build.console" ||
    { cat "$LOGS/r2-build.console" >&2; die "kimberlize build (row 2) failed"; }
want=$(grep -E '^checksum [ab] ' "$LOGS/r2-build.console" | sort)
[[ $(wc -l <<<"$want") == 2 ]] || die "row 2: no checksums in the build console ($LOGS/r2-build.console)"
meta r2_guest_mem "$VM_MEM"
meta vm_disk "$VM_DISK"
meta r2_guest_mem_bytes "$VM_MEM_BYTES"
meta r2_fill "${R2_FILL[0]} text + ${R2_FILL[1]} random"
meta r2_overlay_bytes "$(stat -c %s r2.ovl)"

for run in $(seq 1 "$RUNS"); do
    rm -rf out r2.sock
    settle
    python3 "$HELPER" resume --dek "$D" --base base --ovl r2.ovl --key key.key --out out \
        --sock r2.sock --stats "$LOGS/r2-$run.json" --console "$LOGS/r2-$run.console" \
        --stderr "$LOGS/r2-$run.err" --check $'checksum a\nchecksum b\n' >"$LOGS/r2-$run.res" ||
        die "row 2 run $run failed (see $LOGS/r2-$run.*)"
    res=$LOGS/r2-$run.res
    got=$(jget "$res" 'd["check_output"]' | sort)
    [[ $got == "$want" ]] || die "row 2 run $run: guest checksums after resume differ: '$got' vs '$want'"
    [[ $(jget "$res" 'd["ready"]') == True ]] || die "row 2 run $run: guest not ready after resume"
    s=$LOGS/r2-$run.json
    put resume "$run" restore_to_first_instruction_ms "$(jget "$s" 'd["times"]["restore_to_first_instruction_ms"]')"
    put resume "$run" restore_to_answer_ms "$(jget "$s" 'd["times"]["first_answer_ms"] - d["times"]["restore_start_ms"]')"
    put resume "$run" synth_total_ms "$(jget "$s" 'd["times"]["total_ms"]')"
    put resume "$run" vmrss_kib "$(jget "$res" 'd["vmrss_kib"]')"
    put resume "$run" vmhwm_kib "$(jget "$res" 'd["vmhwm_kib"]')"
    put resume "$run" stop_to_exit_ms "$(jget "$res" 'd["stop_to_exit_ms"]')"
    log "row 2 run $run: first instruction $(jget "$s" 'd["times"]["restore_to_first_instruction_ms"]') ms," \
        "VmRSS $(jget "$res" 'd["vmrss_kib"]') KiB, stop $(jget "$res" 'd["stop_to_exit_ms"]') ms"
done
rm -rf out

# ---------------------------------------------------------------------------
# Row 3: synthesis through a rate-limited pipe.

cat >r3-install.txt <<EOF
fill t ${R3_FILL[0]} 3 text
fill r ${R3_FILL[1]} 4 random
disk-write 0 ${R3_FILL[2]} 5
EOF
log "row 3: building the overlay (${R3_FILL[0]} text + ${R3_FILL[1]} random + ${R3_FILL[2]} disk)"
"$K" build --base base --install r3-install.txt --resume resume.txt -k key.key -o r3.ovl \
    --stats-json "$LOGS/r3-build.json" -q 2>"$LOGS/r3-build.console" ||
    { cat "$LOGS/r3-build.console" >&2; die "kimberlize build (row 3) failed"; }
ovl_bytes=$(stat -c %s r3.ovl)
meta r3_overlay_bytes "$ovl_bytes"
meta r3_guest "--memory $VM_MEM --disk $VM_DISK"
meta r3_fill "${R3_FILL[0]} text + ${R3_FILL[1]} random in memory, ${R3_FILL[2]} random on disk"
log "row 3: overlay $ovl_bytes bytes, $(awk -v b="$ovl_bytes" -v r="$RATE" 'BEGIN {printf "%.2f", b / r}') s at the limit"

# one synthesis: $1 = limited|unlimited, $2 = sync|nosync, $3 = run
synth() {
    local mode=$1 sync=$2 run=$3 tag="r3-$1-$2-$3" flags=(-q) t0 t1
    [[ $sync == nosync ]] && flags+=(--no-sync)
    rm -rf out
    settle
    t0=$(now_us)
    if [[ $mode == limited ]]; then
        pv -q -L "$RATE" r3.ovl | "$GTIME" -o "$LOGS/$tag.time" -f '%M' \
            "$D" --base base -k key.key -o out --stats-json "$LOGS/$tag.json" "${flags[@]}" \
            2>"$LOGS/$tag.err" || die "row 3 $tag: dekimberlize failed: $(cat "$LOGS/$tag.err")"
    else
        "$GTIME" -o "$LOGS/$tag.time" -f '%M' \
            "$D" --base base -i r3.ovl -k key.key -o out --stats-json "$LOGS/$tag.json" "${flags[@]}" \
            2>"$LOGS/$tag.err" || die "row 3 $tag: dekimberlize failed: $(cat "$LOGS/$tag.err")"
    fi
    t1=$(now_us)
    [[ -f out/manifest.json ]] || die "row 3 $tag: no out/manifest.json after synthesis"
    put pipe "$run" "${mode}_${sync}_ms" "$(awk -v us=$((t1 - t0)) 'BEGIN {printf "%.1f", us / 1000}')"
    if [[ $mode == limited && $sync == sync ]]; then
        for k in receive_ms apply_ms total_ms; do
            put pipe "$run" "lim_$k" "$(jget "$LOGS/$tag.json" "d['times']['$k']")"
        done
        put pipe "$run" lim_maxrss_kib "$(tail -n1 "$LOGS/$tag.time")"
    fi
    log "row 3 run $run: $mode $sync in $(((t1 - t0) / 1000)) ms"
}
for run in $(seq 1 "$RUNS"); do
    synth limited sync "$run"
    synth limited nosync "$run"
    synth unlimited sync "$run"
    synth unlimited nosync "$run"
done
rm -rf out

meta load_end "$(cut -d' ' -f1-3 /proc/loadavg)"

# ---------------------------------------------------------------------------
# Report.

SECTION=$LOGS/section.md
python3 "$HELPER" report "$TSV" "$SECTION" >/dev/null
cp "$TSV" "$WORK/results.tsv"

mkdir -p "$(dirname "$BENCH_MD")"
if [[ ! -f $BENCH_MD && $QUICK == 1 && -f $ROOT/BENCHMARKS.md ]]; then
    cp "$ROOT/BENCHMARKS.md" "$BENCH_MD" # exercise the in-place rewrite on a copy
fi
python3 "$ROOT/scripts/bench/update-section.py" bench-vm "$BENCH_MD" "$SECTION" || die "cannot update $BENCH_MD"
cat "$SECTION"
log "raw results: $TSV; report: $BENCH_MD"
