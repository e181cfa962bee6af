#!/usr/bin/env bash
# bench-overlay.sh: Kimberley overlays (kimberlize diff / dekimberlize) side by
# side with xdelta3 and zstd --patch-from on generated image pairs:
#   M1: memory pair (default 1 GiB), D1: sparse disk pair (default 4 GiB).
# Writes raw per-run results as TSV under the work dir and rewrites the
# <!-- bench-overlay:begin/end --> section of BENCHMARKS.md.
#
# Environment (all optional):
#   RUNS=3            runs per operation
#   QUICK=1           64M memory, 256M disk, 1 run; data under $BENCH_DIR/quick and
#                     the Markdown goes to $BENCH_DIR/quick/BENCHMARKS.md (unless BENCH_MD)
#   BENCH_DIR=DIR     work dir (default: <repo>/bench-out)
#   BENCH_MD=FILE     Markdown file to update (default: <repo>/BENCHMARKS.md)
#   MEM_SIZE=1G DISK_SIZE=4G SEED=1   dataset parameters
#   DATASETS="M1 D1"  which datasets to run
#   PEERS_ONLY=1      skip Kimberley (no build of kimberlize/dekimberlize)
#   CMD_TIMEOUT=7200  seconds before any one measured command is killed
#   NO_INSTALL=1      never call apt-get
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

# The exact command, for the report.
cmd_env=""
for v in QUICK RUNS BENCH_DIR BENCH_MD MEM_SIZE DISK_SIZE SEED DATASETS PEERS_ONLY CMD_TIMEOUT NO_INSTALL; do
    if [[ -n ${!v+x} ]]; then cmd_env+="$v=${!v} "; fi
done
BENCH_CMD="${cmd_env}scripts/bench-overlay.sh${*:+ $*}"

QUICK=${QUICK:-0}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out}
if [[ $QUICK == 1 ]]; then
    MEM_SIZE=${MEM_SIZE:-64M}
    DISK_SIZE=${DISK_SIZE:-256M}
    RUNS=${RUNS:-1}
    BENCH_DIR=$BENCH_DIR/quick
    BENCH_MD=${BENCH_MD:-$BENCH_DIR/BENCHMARKS.md}
else
    MEM_SIZE=${MEM_SIZE:-1G}
    DISK_SIZE=${DISK_SIZE:-4G}
    RUNS=${RUNS:-3}
    BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
fi
SEED=${SEED:-1}
DATASETS=${DATASETS:-M1 D1}
PEERS_ONLY=${PEERS_ONLY:-0}
CMD_TIMEOUT=${CMD_TIMEOUT:-7200}
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
GEN=$REL/kimberley-bench
KIMB=$REL/kimberlize
DEKIMB=$REL/dekimberlize
RSS_TARGET_KIB=$((256 * 1024))

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------
# Dependencies.

install_deps() {
    local need=() p sudo="" have_all=1
    command -v xdelta3 >/dev/null || need+=(xdelta3)
    command -v zstd >/dev/null || need+=(zstd)
    [[ -x /usr/bin/time ]] || need+=(time)
    command -v cmp >/dev/null || need+=(diffutils)
    command -v timeout >/dev/null || need+=(coreutils)
    ((${#need[@]} == 0)) && return 0
    [[ ${NO_INSTALL:-0} == 1 ]] && die "missing ${need[*]} and NO_INSTALL=1"
    command -v apt-get >/dev/null || die "missing ${need[*]}; no apt-get here: install them by hand"
    [[ $(id -u) -ne 0 ]] && sudo=sudo
    for p in "${need[@]}"; do
        apt-cache policy "$p" 2>/dev/null | grep -q 'Candidate: [0-9]' || have_all=0
    done
    log "installing ${need[*]}"
    if ((have_all)) && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}"; then
        return 0
    fi
    $sudo apt-get update
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y "${need[@]}"
}

install_deps
command -v cargo >/dev/null || die "cargo not found (install Rust from https://rustup.rs)"

# ---------------------------------------------------------------------------
# Build.

log "building (release)"
if [[ $PEERS_ONLY == 1 ]]; then
    (cd "$ROOT" && cargo build --release -p kimberley-bench)
else
    (cd "$ROOT" && cargo build --release -p kimberlize -p dekimberlize -p kimberley-bench)
fi
[[ -x $GEN ]] || die "$GEN missing after build"

KIMB_Q=() KIMB_STATS=0 DEKIMB_Q=() DEKIMB_STATS=0
if [[ $PEERS_ONLY != 1 ]]; then
    [[ -x $KIMB && -x $DEKIMB ]] || die "kimberlize/dekimberlize missing after build"
    h=$("$KIMB" diff --help 2>&1) || die "kimberlize diff --help failed: $h"
    for f in --base --launch --key-file --no-encrypt; do
        grep -q -- "$f" <<<"$h" || die "kimberlize diff has no $f flag yet"
    done
    grep -q -- '--stats-json' <<<"$h" && KIMB_STATS=1
    grep -qE -- '(^|[ ,])-q\b|--quiet' <<<"$h" && KIMB_Q=(-q)
    h=$("$DEKIMB" --help 2>&1) || die "dekimberlize --help failed: $h"
    grep -q -- '--stats-json' <<<"$h" && DEKIMB_STATS=1
    grep -qE -- '(^|[ ,])-q\b|--quiet' <<<"$h" && DEKIMB_Q=(-q)
fi

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
STAMP=$(date +%Y%m%d-%H%M%S)
TSV=$BENCH_DIR/results-$STAMP.tsv
LOGDIR=$BENCH_DIR/logs-$STAMP
mkdir -p "$LOGDIR"
printf 'dataset\ttool\top\trun\tstatus\twall_s\tcpu_s\tmaxrss_kib\tout_bytes\tload1\tnote\n' >"$TSV"
ln -sfn "$(basename "$TSV")" "$BENCH_DIR/results.tsv"

KEY=$BENCH_DIR/overlay.key
if [[ $PEERS_ONLY != 1 && ! -s $KEY ]]; then
    "$KIMB" keygen -o "$KEY" || die "kimberlize keygen -o $KEY failed"
fi

# ---------------------------------------------------------------------------
# Measurement helpers.

bin_id() { md5sum <"$1" | cut -c1-16; }

# Sum of the apparent sizes of a file, or of the *.raw files of a directory.
out_size() {
    local p=$1
    if [[ -f $p ]]; then
        stat -c %s "$p"
    elif [[ -d $p ]]; then
        find "$p" -maxdepth 1 -name '*.raw' -printf '%s\n' | awk '{ s += $1 } END { printf "%.0f\n", s }'
    else
        echo 0
    fi
}

# A one-line summary of a stderr file (tabs and newlines flattened).
err_summary() {
    grep -v '^[[:space:]]*$' "$1" 2>/dev/null | grep -v '^Command exited with' | tail -n 3 |
        tr '\t\n' '  ' | sed 's/  */ /g; s/ $//' | cut -c1-300
}

# measure NAME CMD... : runs CMD under GNU time and timeout; sets M_RC,
# M_WALL, M_CPU (user + system seconds), M_RSS, M_LOAD (1-minute load
# average just before), M_ERR (stderr file). Never fails.
measure() {
    local name=$1
    shift
    local tf=$LOGDIR/$name.time
    M_ERR=$LOGDIR/$name.err
    M_RC=0
    M_LOAD=$(cut -d' ' -f1 /proc/loadavg)
    printf '%q ' "$@" >"$LOGDIR/$name.cmd"
    echo >>"$LOGDIR/$name.cmd"
    /usr/bin/time -o "$tf" -f '%e %M %U %S' timeout "$CMD_TIMEOUT" "$@" >"$LOGDIR/$name.out" 2>"$M_ERR" || M_RC=$?
    local user sys
    read -r M_WALL M_RSS user sys < <(tail -n 1 "$tf") || true
    M_CPU=$(awk -v u="${user:-x}" -v s="${sys:-x}" 'BEGIN { if (u ~ /^[0-9.]+$/ && s ~ /^[0-9.]+$/) printf "%.2f", u + s; else print "NA" }')
    [[ ${M_WALL:-} =~ ^[0-9.]+$ ]] || M_WALL=NA
    [[ ${M_RSS:-} =~ ^[0-9]+$ ]] || M_RSS=NA
}

# record DS TOOL OP RUN STATUS OUT_BYTES NOTE
record() {
    local note=${7//$'\t'/ }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$M_WALL" "$M_CPU" "$M_RSS" "$6" "$M_LOAD" "$note" >>"$TSV"
    log "$1 $2 $3 #$4: $5 ${M_WALL}s (cpu ${M_CPU}s) ${M_RSS}KiB out=$6 load=$M_LOAD${note:+ ($note)}"
}

record_skip() { # DS TOOL OP RUN NOTE
    M_WALL=NA M_CPU=NA M_RSS=NA M_LOAD=NA
    record "$1" "$2" "$3" "$4" skipped 0 "$5"
}

# Run, time and record one command whose output is a file or directory.
# run_op DS TOOL OP RUN OUTPATH CMD...
run_op() {
    local ds=$1 tool=$2 op=$3 run=$4 out=$5 status note=""
    shift 5
    rm -rf "$out"
    local name="$ds.$tool.$op.$run"
    measure "${name//[^A-Za-z0-9.-]/_}" "$@"
    if ((M_RC == 0)); then
        status=ok
    else
        status=fail
        note="exit $M_RC: $(err_summary "$M_ERR")"
        ((M_RC == 124)) && note="killed after ${CMD_TIMEOUT}s (timeout)"
    fi
    OP_STATUS=$status OP_NOTE=$note
    OP_SIZE=$(out_size "$out")
}

# verify_eq A B: cmp two files; sets OP_STATUS/OP_NOTE on mismatch.
verify_eq() {
    local msg
    if ! msg=$(cmp "$1" "$2" 2>&1); then
        OP_STATUS=WRONG
        OP_NOTE="${OP_NOTE:+$OP_NOTE; }output differs from launch: ${msg//$'\n'/ }"
    fi
}

# ---------------------------------------------------------------------------
# Datasets.

declare -A DS_DESC DS_LAUNCH_BYTES DS_KIMB_OK DS_KIMB_NOTE DS_GEN

prepare() {
    local ds=$1 dir=$BENCH_DIR/$1 kind size stamp istamp img
    case $ds in
    M1) kind=memory size=$MEM_SIZE img=memory.raw ;;
    D1) kind=disk size=$DISK_SIZE img=disk0.raw ;;
    *) die "unknown dataset $ds" ;;
    esac
    mkdir -p "$dir/out"
    stamp="$kind $size $SEED $(bin_id "$GEN")"
    if [[ -f $dir/gen.stamp && $(cat "$dir/gen.stamp") == "$stamp" && -f $dir/base.raw && -f $dir/launch.raw ]]; then
        log "$ds: reusing generated images ($dir)"
    else
        rm -f "$dir/gen.stamp" "$dir/import.stamp"
        log "$ds: generating $kind pair, size $size, seed $SEED"
        "$GEN" "$kind" --base "$dir/base.raw" --launch "$dir/launch.raw" --size "$size" --seed "$SEED" | tee "$dir/gen.txt"
        echo "$stamp" >"$dir/gen.stamp"
    fi
    DS_GEN[$ds]=$(cat "$dir/gen.txt")
    DS_DESC[$ds]="$kind pair, $(numfmt --to=iec-i --suffix=B "$(stat -c %s "$dir/launch.raw")") per image, seed $SEED"
    DS_LAUNCH_BYTES[$ds]=$(stat -c %s "$dir/launch.raw")
    DS_KIMB_OK[$ds]=1
    DS_KIMB_NOTE[$ds]=""
    [[ $PEERS_ONLY == 1 ]] && {
        DS_KIMB_OK[$ds]=0
        DS_KIMB_NOTE[$ds]="PEERS_ONLY=1"
        return 0
    }

    if [[ $ds == D1 ]]; then
        truncate -s 0 "$dir/empty.mem"
        truncate -s 4K "$dir/empty.mem"
    fi
    istamp="$stamp $(bin_id "$KIMB")"
    if [[ -f $dir/import.stamp && $(cat "$dir/import.stamp") == "$istamp" && -d $dir/base.vm && -d $dir/launch.vm ]]; then
        log "$ds: reusing imported VMDIRs"
    else
        local side args out
        for side in base launch; do
            rm -rf "$dir/$side.vm"
            if [[ $ds == M1 ]]; then
                args=(--memory "$dir/$side.raw")
            else
                args=(--memory "$dir/empty.mem" --disk "$dir/$side.raw")
            fi
            log "$ds: kimberlize import -o $dir/$side.vm ${args[*]}"
            if ! out=$("$KIMB" import -o "$dir/$side.vm" "${args[@]}" 2>&1); then
                DS_KIMB_OK[$ds]=0
                DS_KIMB_NOTE[$ds]="import failed: kimberlize import -o $side.vm ${args[*]}: ${out//$'\n'/ }"
                log "$ds: ${DS_KIMB_NOTE[$ds]}"
                return 0
            fi
            if ! cmp -s "$dir/$side.raw" "$dir/$side.vm/$img"; then
                DS_KIMB_OK[$ds]=0
                DS_KIMB_NOTE[$ds]="import of $side.raw: $side.vm/$img differs from the raw image"
                log "$ds: ${DS_KIMB_NOTE[$ds]}"
                return 0
            fi
        done
        echo "$istamp" >"$dir/import.stamp"
    fi
    DS_LAUNCH_BYTES[$ds]=$(out_size "$dir/launch.vm")
}

bench_dataset() {
    local ds=$1 dir=$BENCH_DIR/$1 o r img stats=()
    o=$dir/out
    img=memory.raw
    [[ $ds == D1 ]] && img=disk0.raw
    local kok=${DS_KIMB_OK[$ds]} zstd_enc_ok
    for ((r = 1; r <= RUNS; r++)); do
        log "$ds: round $r/$RUNS"
        # --- encoders
        if ((kok)); then
            stats=()
            ((KIMB_STATS)) && stats=(--stats-json "$o/diff-stats.$r.json")
            run_op "$ds" kimberlize diff "$r" "$o/k.ovl" \
                "$KIMB" diff --base "$dir/base.vm" --launch "$dir/launch.vm" -o "$o/k.ovl" --key-file "$KEY" "${stats[@]}" "${KIMB_Q[@]}"
            record "$ds" kimberlize diff "$r" "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"
        else
            record_skip "$ds" kimberlize diff "$r" "${DS_KIMB_NOTE[$ds]}"
        fi
        run_op "$ds" xdelta3 encode "$r" "$o/x.xd3" xdelta3 -e -f -s "$dir/base.raw" "$dir/launch.raw" "$o/x.xd3"
        record "$ds" xdelta3 encode "$r" "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"
        run_op "$ds" zstd encode "$r" "$o/z.zst" \
            zstd -f -q -T0 --long=31 --patch-from="$dir/base.raw" "$dir/launch.raw" -o "$o/z.zst"
        zstd_enc_ok=0
        if [[ $OP_STATUS == fail ]] && grep -qiE "larger than|can't handle|too large" "$M_ERR"; then
            OP_STATUS=refused
            OP_NOTE=$(err_summary "$M_ERR")
        elif [[ $OP_STATUS == ok ]]; then
            zstd_enc_ok=1
        fi
        record "$ds" zstd encode "$r" "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"

        # --- decoders (each verified against the launch image)
        if ((kok)) && [[ -s $o/k.ovl ]]; then
            stats=()
            ((DEKIMB_STATS)) && stats=(--stats-json "$o/apply-stats.$r.json")
            run_op "$ds" dekimberlize apply "$r" "$o/k.vm" \
                "$DEKIMB" --base "$dir/base.vm" -i "$o/k.ovl" -o "$o/k.vm" --key-file "$KEY" "${stats[@]}" "${DEKIMB_Q[@]}"
            if [[ $OP_STATUS == ok ]]; then
                verify_eq "$o/k.vm/$img" "$dir/launch.raw"
                [[ $ds == D1 ]] && verify_eq "$o/k.vm/memory.raw" "$dir/empty.mem"
            fi
            record "$ds" dekimberlize apply "$r" "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"
            rm -rf "$o/k.vm"
            # The same without fsync: what the peers' decoders do (they
            # write through the page cache and never sync), so this row is
            # the like-for-like comparison and shows the pipeline's speed.
            run_op "$ds" dekimberlize "apply --no-sync" "$r" "$o/k.vm" \
                "$DEKIMB" --base "$dir/base.vm" -i "$o/k.ovl" -o "$o/k.vm" --key-file "$KEY" --no-sync "${DEKIMB_Q[@]}"
            if [[ $OP_STATUS == ok ]]; then
                verify_eq "$o/k.vm/$img" "$dir/launch.raw"
            fi
            record "$ds" dekimberlize "apply --no-sync" "$r" "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"
            rm -rf "$o/k.vm"
            sync
        else
            record_skip "$ds" dekimberlize apply "$r" "${DS_KIMB_NOTE[$ds]:-no overlay from kimberlize diff}"
        fi
        if [[ -s $o/x.xd3 ]]; then
            run_op "$ds" xdelta3 decode "$r" "$o/x.raw" xdelta3 -d -f -s "$dir/base.raw" "$o/x.xd3" "$o/x.raw"
            [[ $OP_STATUS == ok ]] && verify_eq "$o/x.raw" "$dir/launch.raw"
            record "$ds" xdelta3 decode "$r" "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"
            rm -f "$o/x.raw"
        else
            record_skip "$ds" xdelta3 decode "$r" "no xdelta3 output"
        fi
        if ((zstd_enc_ok)); then
            run_op "$ds" zstd decode "$r" "$o/z.raw" \
                zstd -d -f -q --long=31 --patch-from="$dir/base.raw" "$o/z.zst" -o "$o/z.raw"
            [[ $OP_STATUS == ok ]] && verify_eq "$o/z.raw" "$dir/launch.raw"
            record "$ds" zstd decode "$r" "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"
            rm -f "$o/z.raw"
        else
            record_skip "$ds" zstd decode "$r" "no zstd output (encoder refused or failed)"
        fi
    done

    # Size-only comparison: unencrypted overlay.
    if ((kok)); then
        run_op "$ds" kimberlize "diff --no-encrypt" 1 "$o/k-plain.ovl" \
            "$KIMB" diff --base "$dir/base.vm" --launch "$dir/launch.vm" -o "$o/k-plain.ovl" --no-encrypt "${KIMB_Q[@]}"
        record "$ds" kimberlize "diff --no-encrypt" 1 "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"
    else
        record_skip "$ds" kimberlize "diff --no-encrypt" 1 "${DS_KIMB_NOTE[$ds]}"
    fi
    # I/O reference: how fast this machine writes the launch image at all.
    run_op "$ds" cp "copy launch (I/O reference)" 1 "$o/cp.raw" cp --sparse=always "$dir/launch.raw" "$o/cp.raw"
    record "$ds" cp "copy launch (I/O reference)" 1 "$OP_STATUS" "$OP_SIZE" "$OP_NOTE"
    rm -f "$o/cp.raw"
}

for ds in $DATASETS; do
    prepare "$ds"
done
for ds in $DATASETS; do
    bench_dataset "$ds"
done

# ---------------------------------------------------------------------------
# Statistics.

# stat FN DS TOOL OP COL: FN in med|min|max over rows with status ok.
stat_of() {
    awk -F'\t' -v d="$2" -v t="$3" -v o="$4" -v c="$5" \
        'NR > 1 && $1 == d && $2 == t && $3 == o && $5 == "ok" && $c != "NA" { print $c }' "$TSV" |
        sort -g | awk -v fn="$1" -f "$ROOT/scripts/bench/pick.awk"
}
# Status summary of a row group: "ok", or e.g. "refused" / "fail" with the first note.
notes_of() {
    awk -F'\t' -v d="$1" -v t="$2" -v o="$3" \
        'NR > 1 && $1 == d && $2 == t && $3 == o {
            n++; if ($5 == "ok") ok++; else if (!bad) bad = $5 (($11 != "") ? ": " $11 : "")
        }
        END {
            if (n == 0) exit
            if (ok == n) print ""
            else if (ok == 0) print bad
            else printf "%d/%d runs not ok; %s\n", n - ok, n, bad
        }' "$TSV"
}
load_summary() {
    awk -F'\t' -v n="$(nproc)" 'NR > 1 && $10 != "NA" { v[++k] = $10 }
        END {
            if (k == 0) { print "not measured"; exit }
            for (i = 1; i <= k; i++) { s += v[i]; if (v[i] > m) m = v[i] }
            printf "1-minute load average before each measured command: mean %.1f, max %.1f on %d CPUs", s / k, m, n
            if (m > n) printf " (other work was running on this machine: wall times are inflated; CPU times less so)"
            print ""
        }' "$TSV"
}
calc() { awk "BEGIN { x = $1; print x }"; }
human() { # bytes -> MiB/GiB text
    [[ $1 == NA || -z $1 ]] && { echo "–"; return; }
    awk -v b="$1" 'BEGIN {
        if (b >= 1073741824) printf "%.2f GiB", b / 1073741824
        else if (b >= 1048576) printf "%.1f MiB", b / 1048576
        else if (b >= 1024) printf "%.1f KiB", b / 1024
        else printf "%d B", b }'
}
secs() { [[ $1 == NA ]] && echo "–" || awk -v s="$1" 'BEGIN { printf "%.2f s", s }'; }
rss() { [[ $1 == NA ]] && echo "–" || awk -v k="$1" 'BEGIN { printf "%.0f MiB", k / 1024 }'; }

ROWS=(
    "kimberlize|diff|kimberlize diff (encrypted)"
    "kimberlize|diff --no-encrypt|kimberlize diff --no-encrypt (size only, 1 run)"
    "dekimberlize|apply|dekimberlize (verified with cmp)"
    "dekimberlize|apply --no-sync|dekimberlize --no-sync (no fsync, like the peers; verified)"
    "xdelta3|encode|xdelta3 -e"
    "xdelta3|decode|xdelta3 -d (verified)"
    "zstd|encode|zstd --patch-from"
    "zstd|decode|zstd -d --patch-from (verified)"
    "cp|copy launch (I/O reference)|cp --sparse=always launch (I/O reference, 1 run)"
)

TARGETS=""
add_target() { # DATASET TARGET MEASURED RESULT
    TARGETS+="| $1 | $2 | $3 | $4 |"$'\n'
}

evaluate() {
    local ds=$1 k_size x_size z_size peer kd xd ze da launch thr v m
    k_size=$(stat_of med "$ds" kimberlize diff 9)
    x_size=$(stat_of med "$ds" xdelta3 encode 9)
    z_size=$(stat_of med "$ds" zstd encode 9)
    peer=NA
    for v in $x_size $z_size; do
        [[ $v == NA ]] && continue
        if [[ $peer == NA ]] || (($(calc "$v < $peer"))); then peer=$v; fi
    done
    if [[ $k_size == NA || $peer == NA ]]; then
        add_target "$ds" "overlay size ≤ min(xdelta3, zstd)" "overlay $(human "$k_size"), peers' min $(human "$peer")" "N/A (missing result)"
    else
        m=$(calc "$k_size / $peer")
        if (($(calc "$k_size <= $peer"))); then
            v="PASS ($(awk -v m="$m" 'BEGIN { printf "%.2fx the peer size, %.1f%% smaller", m, (1 - m) * 100 }'))"
        else
            v="MISS ($(awk -v m="$m" 'BEGIN { printf "%.2fx the peer size, %.1f%% too large", m, (m - 1) * 100 }'))"
        fi
        add_target "$ds" "overlay size ≤ min(xdelta3, zstd)" "overlay $(human "$k_size") vs $(human "$peer")" "$v"
    fi

    kd=$(stat_of med "$ds" kimberlize diff 6)
    xd=$(stat_of med "$ds" xdelta3 encode 6)
    ze=$(stat_of med "$ds" zstd encode 6)
    if [[ $kd == NA || $xd == NA ]]; then
        add_target "$ds" "kimberlize diff ≥ 5x faster than xdelta3" "diff $(secs "$kd"), xdelta3 $(secs "$xd")" "N/A (missing result)"
    else
        m=$(awk -v a="$xd" -v b="$kd" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 1e9 }')
        if (($(calc "$m >= 5"))); then v="PASS (${m}x, $(calc "int($m / 5 * 100 + 0.5) / 100")x the goal)"; else v="MISS (${m}x, short by $(calc "int((5 / $m) * 100 + 0.5) / 100")x)"; fi
        add_target "$ds" "kimberlize diff ≥ 5x faster than xdelta3" "diff $(secs "$kd") vs $(secs "$xd") → ${m}x" "$v"
    fi
    if [[ $kd == NA ]]; then
        add_target "$ds" "kimberlize diff faster than zstd --patch-from" "diff –" "N/A (missing result)"
    elif [[ $ze == NA ]]; then
        add_target "$ds" "kimberlize diff faster than zstd --patch-from" "diff $(secs "$kd"); zstd: $(notes_of "$ds" zstd encode)" "N/A (zstd did not produce a patch)"
    else
        m=$(awk -v a="$ze" -v b="$kd" 'BEGIN { printf "%.2f", (b > 0) ? a / b : 1e9 }')
        if (($(calc "$kd < $ze"))); then v="PASS (${m}x faster)"; else v="MISS (${m}x: zstd is $(calc "int($kd / $ze * 100 + 0.5) / 100")x faster)"; fi
        add_target "$ds" "kimberlize diff faster than zstd --patch-from" "diff $(secs "$kd") vs $(secs "$ze")" "$v"
    fi

    da=$(stat_of med "$ds" dekimberlize apply 6)
    launch=${DS_LAUNCH_BYTES[$ds]}
    if [[ $da == NA ]]; then
        add_target "$ds" "dekimberlize ≥ 1 GiB/s of launch image" "–" "N/A (missing result)"
    else
        thr=$(awk -v b="$launch" -v s="$da" 'BEGIN { printf "%.2f", (s > 0) ? b / s / 1073741824 : 1e9 }')
        if (($(calc "$thr >= 1"))); then v="PASS (${thr}x the goal)"; else v="MISS (short by $(calc "int(1 / $thr * 100 + 0.5) / 100")x)"; fi
        add_target "$ds" "dekimberlize ≥ 1 GiB/s of launch image" "$(human "$launch") in $(secs "$da") → ${thr} GiB/s" "$v"
    fi
    dn=$(stat_of med "$ds" dekimberlize "apply --no-sync" 6)
    if [[ $dn != NA ]]; then
        thr=$(awk -v b="$launch" -v s="$dn" 'BEGIN { printf "%.2f", (s > 0) ? b / s / 1073741824 : 1e9 }')
        add_target "$ds" "(context) dekimberlize --no-sync, no fsync like the peers' decoders" "$(human "$launch") in $(secs "$dn") → ${thr} GiB/s" "informational: the target row above is the durable run"
    fi

    if [[ $ds == D1 ]]; then
        local tool op
        for tool in "kimberlize|diff" "dekimberlize|apply"; do
            op=${tool#*|}
            tool=${tool%|*}
            m=$(stat_of max "$ds" "$tool" "$op" 8)
            if [[ $m == NA ]]; then
                add_target "$ds" "$tool peak RSS ≤ 256 MiB" "–" "N/A (missing result)"
            elif ((m <= RSS_TARGET_KIB)); then
                add_target "$ds" "$tool peak RSS ≤ 256 MiB" "$(rss "$m")" "PASS ($(calc "int($m / $RSS_TARGET_KIB * 1000 + 0.5) / 10")% of the budget)"
            else
                add_target "$ds" "$tool peak RSS ≤ 256 MiB" "$(rss "$m")" "MISS ($(calc "int($m / $RSS_TARGET_KIB * 100 + 0.5) / 100")x the budget)"
            fi
        done
    fi
}

# ---------------------------------------------------------------------------
# Report.

SECTION=$BENCH_DIR/section-$STAMP.md
{
    echo "<!-- bench-overlay:begin -->"
    echo "## VM overlays: Kimberley vs xdelta3 and zstd --patch-from"
    echo
    echo "_Written by \`scripts/bench-overlay.sh\`; rerun it rather than editing this section._"
    echo
    echo "- Machine: $(nproc) CPUs (nproc), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r), work dir on $(df -T "$BENCH_DIR" | awk 'NR == 2 { print $2 }')"
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Command: \`$BENCH_CMD\` (repo $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "not a git checkout")$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ", with uncommitted changes"))"
    echo "- Versions: $(rustc --version 2>/dev/null | cut -d' ' -f1-2), xdelta3 $(xdelta3 -V 2>&1 | head -n1 | grep -oE '[0-9]+\.[0-9.]+[a-z0-9]*' | head -n1), zstd $(zstd --version | grep -oE 'v[0-9.]+')"
    echo "- Load: $(load_summary)"
    echo "- Method: $RUNS run(s) per operation, rounds interleaved across tools, warm page cache, all cores; wall time, CPU time (user + system) and peak RSS from GNU \`/usr/bin/time -f '%e %M %U %S'\`; median and min–max of wall time over runs, median CPU time, peak RSS is the maximum over runs. Every decoded image is compared with the launch image using \`cmp\`. Raw results: \`$(basename "$TSV")\` in the work dir."
    echo "- Peers: \`xdelta3 -e -f -s BASE LAUNCH OUT\` (defaults: level 3, 64 MiB source window) and \`xdelta3 -d -f -s BASE OUT LAUNCH\`; \`zstd -f -q -T0 --long=31 --patch-from=BASE LAUNCH -o OUT\` (level 3) and \`zstd -d -f -q --long=31 --patch-from=BASE OUT -o LAUNCH\`. Peers read the raw images; Kimberley reads VMDIRs made with \`kimberlize import\` (same bytes)."
    echo
    for ds in $DATASETS; do
        echo "### $ds: ${DS_DESC[$ds]}"
        echo
        echo "Generator: \`${DS_GEN[$ds]}\`"
        echo
        echo "| tool | operation | median time | min–max | CPU time | output size | peak RSS | notes |"
        echo "|---|---|---|---|---|---|---|---|"
        for row in "${ROWS[@]}"; do
            IFS='|' read -r tool op label <<<"$row"
            n=$(awk -F'\t' -v d="$ds" -v t="$tool" -v o="$op" 'NR > 1 && $1 == d && $2 == t && $3 == o' "$TSV" | wc -l)
            ((n == 0)) && continue
            med=$(stat_of med "$ds" "$tool" "$op" 6)
            lo=$(stat_of min "$ds" "$tool" "$op" 6)
            hi=$(stat_of max "$ds" "$tool" "$op" 6)
            cpu=$(stat_of med "$ds" "$tool" "$op" 7)
            size=$(stat_of med "$ds" "$tool" "$op" 9)
            peak=$(stat_of max "$ds" "$tool" "$op" 8)
            note=$(notes_of "$ds" "$tool" "$op")
            range="–"
            [[ $lo != NA ]] && range="$(awk -v a="$lo" -v b="$hi" 'BEGIN { printf "%.2f–%.2f s", a, b }')"
            if [[ $op == decode || $op == apply || $op == copy* ]]; then
                sz="$(human "$size") image"
                [[ $med != NA ]] && note="${note:+$note; }$(awk -v b="${DS_LAUNCH_BYTES[$ds]}" -v s="$med" 'BEGIN { printf "%.2f GiB/s of launch image", (s > 0) ? b / s / 1073741824 : 0 }')"
            else
                sz=$(human "$size")
            fi
            [[ $size == NA ]] && sz="–"
            echo "| $label | $op | $(secs "$med") | $range | $(secs "$cpu") | $sz | $(rss "$peak") | ${note//|/\\|} |"
        done
        echo
    done
    for ds in $DATASETS; do evaluate "$ds"; done
    echo "### Targets"
    echo
    echo "| dataset | target | measured | result |"
    echo "|---|---|---|---|"
    printf '%s' "$TARGETS"
    echo "<!-- bench-overlay:end -->"
} >"$SECTION"

mkdir -p "$(dirname "$BENCH_MD")"
if [[ ! -f $BENCH_MD && $QUICK == 1 && -f $ROOT/BENCHMARKS.md ]]; then
    cp "$ROOT/BENCHMARKS.md" "$BENCH_MD" # exercise the in-place rewrite on a copy
fi
python3 "$ROOT/scripts/bench/update-section.py" bench-overlay "$BENCH_MD" "$SECTION" || die "cannot update $BENCH_MD"
cp "$SECTION" "$BENCH_DIR/section.md"
log "results: $TSV"
log "report: $BENCH_MD"
cat "$SECTION"
