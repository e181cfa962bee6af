#!/usr/bin/env bash
# bench-ram.sh: Kimberley overlays of guest RAM alone, side by side with
# xdelta3 and zstd --patch-from, on two memory images of one guest (e.g.
# idle, and after launching an application):
#
#   scripts/bench-ram.sh BASE_MEMORY LAUNCH_MEMORY
#
# Imports each image alone into a VMDIR (`kimberlize import --memory`),
# then per run: kimberlize diff at the default options and at each of
# LEVELS (3: the pre-revision-5 default level; 19: the smallest), dekimberlize
# (durable and --no-sync), xdelta3 -e/-d, zstd --patch-from at levels 3
# and 19, every decoded image compared with the launch image (cmp). Writes
# raw results as TSV under the work dir and rewrites the
# <!-- bench-ram:begin/end --> section of BENCHMARKS.md (medians over runs,
# ratios to the peers, the issue-10 targets).
#
# Environment (all optional):
#   RUNS=3            runs per operation (xdelta3 and zstd -19 take minutes each)
#   BENCH_DIR=DIR     work dir (default: <repo>/bench-out/ram)
#   BENCH_MD=FILE     Markdown file to update (default: <repo>/BENCHMARKS.md)
#   LABEL=TEXT        what the images are, for the report
#   NO_BUILD=1        use the release binaries as they are
#   ZSTD19=0          skip zstd --patch-from -19
#   LEVELS="3 19"     the other zstd levels kimberlize diff is measured at
#   KIMB_BEFORE=FILE  also time another kimberlize build (e.g. an older
#                     commit's release binary) with its default options
#   CMD_TIMEOUT=3600  seconds before any one measured command is killed
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help || $# -ne 2 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [[ $# -eq 2 ]] && exit 0
    exit 2
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BASE_IMG=$(realpath "$1")
LAUNCH_IMG=$(realpath "$2")
[[ -f $BASE_IMG && -f $LAUNCH_IMG ]] || { echo "error: $1 and $2 must be files" >&2; exit 2; }

cmd_env=""
for v in RUNS BENCH_DIR BENCH_MD LABEL NO_BUILD ZSTD19 LEVELS CMD_TIMEOUT KIMB_BEFORE; do
    if [[ -n ${!v+x} ]]; then cmd_env+="$v=${!v@Q} "; fi
done
BENCH_CMD="${cmd_env}scripts/bench-ram.sh $1 $2"

RUNS=${RUNS:-3}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out/ram}
BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
LABEL=${LABEL:-$(basename "$(dirname "$BASE_IMG")")/$(basename "$BASE_IMG") → $(basename "$(dirname "$LAUNCH_IMG")")/$(basename "$LAUNCH_IMG")}
ZSTD19=${ZSTD19:-1}
LEVELS=${LEVELS:-3 19}
CMD_TIMEOUT=${CMD_TIMEOUT:-3600}
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
KIMB=$REL/kimberlize
DEKIMB=$REL/dekimberlize

log() { printf '[bench-ram %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for t in xdelta3 zstd cmp timeout; do command -v $t >/dev/null || die "$t is missing"; done
[[ -x /usr/bin/time ]] || die "GNU time (/usr/bin/time) is missing"
if [[ ${NO_BUILD:-0} != 1 ]]; then
    log "building (release)"
    (cd "$ROOT" && cargo build --release -p kimberlize -p dekimberlize)
fi
[[ -x $KIMB && -x $DEKIMB ]] || die "release kimberlize/dekimberlize missing"

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
STAMP=$(date +%Y%m%d-%H%M%S)
TSV=$BENCH_DIR/results-$STAMP.tsv
LOGDIR=$BENCH_DIR/logs-$STAMP
O=$BENCH_DIR/out
mkdir -p "$LOGDIR" "$O"
printf 'tool\top\trun\tstatus\twall_s\tcpu_s\tmaxrss_kib\tout_bytes\tload1\tnote\n' >"$TSV"
KEY=$BENCH_DIR/overlay.key
[[ -s $KEY ]] || "$KIMB" keygen -o "$KEY"

# measure NAME CMD...: sets M_RC M_WALL M_CPU M_RSS M_LOAD M_ERR; never fails.
measure() {
    local name=${1//[^A-Za-z0-9.-]/_} tf user sys
    shift
    tf=$LOGDIR/$name.time M_ERR=$LOGDIR/$name.err M_RC=0
    M_LOAD=$(cut -d' ' -f1 /proc/loadavg)
    /usr/bin/time -o "$tf" -f '%e %M %U %S' timeout "$CMD_TIMEOUT" "$@" >"$LOGDIR/$name.out" 2>"$M_ERR" || M_RC=$?
    read -r M_WALL M_RSS user sys < <(tail -n 1 "$tf") || true
    M_CPU=$(awk -v u="${user:-x}" -v s="${sys:-x}" 'BEGIN { if (u ~ /^[0-9.]+$/ && s ~ /^[0-9.]+$/) printf "%.2f", u + s; else print "NA" }')
    [[ ${M_WALL:-} =~ ^[0-9.]+$ ]] || M_WALL=NA
    [[ ${M_RSS:-} =~ ^[0-9]+$ ]] || M_RSS=NA
}

# op TOOL OP RUN OUT [VERIFY_FILE] -- CMD...: measures, checks, records.
op() {
    local tool=$1 what=$2 run=$3 out=$4 check=$5 status=ok note="" size=0 msg
    shift 6
    rm -rf "$out"
    measure "$tool.$what.$run" "$@"
    if ((M_RC != 0)); then
        status=fail
        note="exit $M_RC: $(grep -v '^Command exited' "$M_ERR" | tail -n 2 | tr '\t\n' '  ' | cut -c1-200)"
    elif [[ -n $check ]] && ! msg=$(cmp "$check" "$LAUNCH_IMG" 2>&1); then
        status=WRONG
        note="output differs from the launch image: ${msg//$'\n'/ }"
    fi
    if [[ -f $out ]]; then size=$(stat -c %s "$out"); fi
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$tool" "$what" "$run" "$status" "$M_WALL" "$M_CPU" "$M_RSS" "$size" "$M_LOAD" "$note" >>"$TSV"
    log "$tool $what #$run: $status ${M_WALL}s (cpu ${M_CPU}s) ${M_RSS}KiB out=$size${note:+ ($note)}"
}

log "importing the images"
for side in base launch; do
    img=$BASE_IMG
    [[ $side == launch ]] && img=$LAUNCH_IMG
    rm -rf "$BENCH_DIR/$side.vm"
    "$KIMB" import -o "$BENCH_DIR/$side.vm" --memory "$img" >/dev/null
done

for r in $(seq 1 "$RUNS"); do
    op kimberlize diff "$r" "$O/k.ovl" "" -- \
        "$KIMB" diff --base "$BENCH_DIR/base.vm" --launch "$BENCH_DIR/launch.vm" -o "$O/k.ovl" --key-file "$KEY" -q --stats-json "$LOGDIR/diff-stats.json"
    if [[ -n ${KIMB_BEFORE:-} ]]; then
        op kimberlize "diff (KIMB_BEFORE)" "$r" "$O/kb.ovl" "" -- \
            "$KIMB_BEFORE" diff --base "$BENCH_DIR/base.vm" --launch "$BENCH_DIR/launch.vm" -o "$O/kb.ovl" --key-file "$KEY" -q
    fi
    for lv in $LEVELS; do
        op kimberlize "diff --level $lv" "$r" "$O/k$lv.ovl" "" -- \
            "$KIMB" diff --base "$BENCH_DIR/base.vm" --launch "$BENCH_DIR/launch.vm" -o "$O/k$lv.ovl" --key-file "$KEY" --level "$lv" -q
    done
    op dekimberlize apply "$r" "$O/k.vm/memory.raw" "$O/k.vm/memory.raw" -- \
        "$DEKIMB" --base "$BENCH_DIR/base.vm" -i "$O/k.ovl" -o "$O/k.vm" --key-file "$KEY" -q
    rm -rf "$O/k.vm"
    op dekimberlize "apply --no-sync" "$r" "$O/k.vm/memory.raw" "$O/k.vm/memory.raw" -- \
        "$DEKIMB" --base "$BENCH_DIR/base.vm" -i "$O/k.ovl" -o "$O/k.vm" --key-file "$KEY" --no-sync -q
    rm -rf "$O/k.vm"
    op xdelta3 encode "$r" "$O/x.xd3" "" -- xdelta3 -e -f -s "$BASE_IMG" "$LAUNCH_IMG" "$O/x.xd3"
    op xdelta3 decode "$r" "$O/x.raw" "$O/x.raw" -- xdelta3 -d -f -s "$BASE_IMG" "$O/x.xd3" "$O/x.raw"
    rm -f "$O/x.raw"
    op zstd "encode -3" "$r" "$O/z.zst" "" -- \
        zstd -f -q -T0 --long=31 --patch-from="$BASE_IMG" "$LAUNCH_IMG" -o "$O/z.zst"
    op zstd "decode -3" "$r" "$O/z.raw" "$O/z.raw" -- \
        zstd -d -f -q --long=31 --patch-from="$BASE_IMG" "$O/z.zst" -o "$O/z.raw"
    rm -f "$O/z.raw"
    if [[ $ZSTD19 == 1 ]]; then
        op zstd "encode -19" "$r" "$O/z19.zst" "" -- \
            zstd -19 -f -q -T0 --long=31 --patch-from="$BASE_IMG" "$LAUNCH_IMG" -o "$O/z19.zst"
    fi
done

# ---------------------------------------------------------------------------
# Report.

# stat FN TOOL OP COL: FN in med|min|max over the rows with status ok.
stat_of() {
    awk -F'\t' -v t="$2" -v o="$3" -v c="$4" 'NR > 1 && $1 == t && $2 == o && $4 == "ok" && $c != "NA" { print $c }' "$TSV" |
        sort -g | awk -v fn="$1" -f "$ROOT/scripts/bench/pick.awk"
}
notes_of() {
    awk -F'\t' -v t="$1" -v o="$2" 'NR > 1 && $1 == t && $2 == o && $4 != "ok" { print $4 ": " $10; exit }' "$TSV"
}
mb() { [[ $1 == NA ]] && echo "–" || awk -v b="$1" 'BEGIN { printf "%.1f MB", b / 1e6 }'; }
secs() { [[ $1 == NA ]] && echo "–" || awk -v s="$1" 'BEGIN { printf "%.2f s", s }'; }
ratio() { [[ $1 == NA || $2 == NA ]] && echo "–" || awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", (b > 0) ? a / b : 0 }'; }

LAUNCH_BYTES=$(stat -c %s "$LAUNCH_IMG")
kd=$(stat_of med kimberlize diff 8)
xd=$(stat_of med xdelta3 encode 8)
zd=$(stat_of med zstd "encode -3" 8)
peer=NA
for v in $xd $zd; do
    [[ $v == NA ]] && continue
    if [[ $peer == NA ]] || awk -v a="$v" -v b="$peer" 'BEGIN { exit !(a < b) }'; then peer=$v; fi
done
chunks=$(python3 -c 'import json, sys; c = json.load(open(sys.argv[1]))["chunks"]; print(", ".join(f"{k} {v}" for k, v in c.items()))' "$LOGDIR/diff-stats.json" 2>/dev/null || true)

ROWS=(
    "kimberlize|diff|kimberlize diff (defaults, encrypted)"
    "kimberlize|diff (KIMB_BEFORE)|kimberlize diff of KIMB_BEFORE (its defaults)"
    "dekimberlize|apply|dekimberlize (durable; verified)"
    "dekimberlize|apply --no-sync|dekimberlize --no-sync (verified)"
    "xdelta3|encode|xdelta3 -e -s BASE"
    "xdelta3|decode|xdelta3 -d (verified)"
    "zstd|encode -3|zstd --patch-from --long=31 -T0 (level 3)"
    "zstd|decode -3|zstd -d --patch-from (verified)"
    "zstd|encode -19|zstd -19 --patch-from --long=31 -T0"
)

at=1
for lv in $LEVELS; do
    case $lv in
        3) label="kimberlize diff --level 3 (the previous default level)" ;;
        *) label="kimberlize diff --level $lv" ;;
    esac
    ROWS=("${ROWS[@]:0:at}" "kimberlize|diff --level $lv|$label" "${ROWS[@]:at}")
    at=$((at + 1))
done

SECTION=$BENCH_DIR/section-$STAMP.md
{
    echo "<!-- bench-ram:begin -->"
    echo "## Guest RAM alone: Kimberley vs xdelta3 and zstd --patch-from"
    echo
    echo "_Written by \`scripts/bench-ram.sh\`; rerun it rather than editing this section._"
    echo
    echo "- Images: $LABEL, $(awk -v b="$LAUNCH_BYTES" 'BEGIN { printf "%.0f MiB", b / 1048576 }') each"
    echo "- Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), Linux $(uname -r); $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Command: \`$BENCH_CMD\` (repo $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ", with uncommitted changes"))"
    echo "- Versions: xdelta3 $(xdelta3 -V 2>&1 | head -n1 | grep -oE '[0-9]+\.[0-9.]+[a-z0-9]*' | head -n1), zstd $(zstd --version | grep -oE 'v[0-9.]+')"
    echo "- Method: $RUNS run(s) per operation, rounds interleaved, warm page cache; median wall time (min–max), median CPU time (user + system), peak RSS (max) from GNU time. 1-minute load average before the commands: $(awk -F'\t' 'NR > 1 && $9 != "NA" { s += $9; n++; if ($9 > m) m = $9 } END { if (n) printf "mean %.1f, max %.1f", s / n, m; else print "–" }' "$TSV") on $(nproc) CPUs (above the CPU count, wall times are inflated by other work). Raw results: \`$(basename "$TSV")\`."
    [[ -n $chunks ]] && echo "- Kimberley's chunk decisions (4 KiB launch chunks): $chunks"
    [[ -n ${KIMB_BEFORE:-} ]] && echo "- KIMB_BEFORE: \`$KIMB_BEFORE\` ($("$KIMB_BEFORE" --version 2>/dev/null | head -n1))"
    echo
    echo "| tool | operation | median time | min–max | CPU time | output | × best peer | peak RSS | notes |"
    echo "|---|---|---|---|---|---|---|---|---|"
    for row in "${ROWS[@]}"; do
        IFS='|' read -r tool what label <<<"$row"
        n=$(awk -F'\t' -v t="$tool" -v o="$what" 'NR > 1 && $1 == t && $2 == o' "$TSV" | wc -l)
        ((n == 0)) && continue
        med=$(stat_of med "$tool" "$what" 5)
        lo=$(stat_of min "$tool" "$what" 5)
        hi=$(stat_of max "$tool" "$what" 5)
        cpu=$(stat_of med "$tool" "$what" 6)
        rss=$(stat_of max "$tool" "$what" 7)
        size=$(stat_of med "$tool" "$what" 8)
        range="–"
        [[ $lo != NA ]] && range="$(secs "$lo")–$(secs "$hi")"
        if [[ $what == decode* || $what == apply* ]]; then
            out="image"
            x="–"
        else
            out=$(mb "$size")
            x=$(ratio "$size" "$peer")
        fi
        r="–"
        [[ $rss != NA ]] && r=$(awk -v k="$rss" 'BEGIN { printf "%.0f MiB", k / 1024 }')
        echo "| $label | $what | $(secs "$med") | $range | $(secs "$cpu") | $out | $x | $r | $(notes_of "$tool" "$what") |"
    done
    echo
    echo "### Targets (issue 10)"
    echo
    echo "| target | measured | result |"
    echo "|---|---|---|"
    if [[ $kd != NA && $peer != NA ]]; then
        m=$(ratio "$kd" "$peer")
        v=$(awk -v m="$m" 'BEGIN { print (m <= 0.9) ? "PASS" : "MISS" }')
        echo "| overlay ≤ 0.9 × min(xdelta3, zstd --patch-from) | $(mb "$kd") vs $(mb "$peer") → ${m} × | $v |"
    else
        echo "| overlay ≤ 0.9 × min(xdelta3, zstd --patch-from) | missing results | N/A |"
    fi
    kt=$(stat_of med kimberlize diff 5)
    xt=$(stat_of med xdelta3 encode 5)
    kc=$(stat_of med kimberlize diff 6)
    xc=$(stat_of med xdelta3 encode 6)
    if [[ $kt != NA && $xt != NA ]]; then
        m=$(ratio "$xt" "$kt")
        v=$(awk -v m="$m" 'BEGIN { print (m >= 10) ? "PASS" : "MISS" }')
        echo "| diff ≥ 10 × faster than xdelta3 (wall) | $(secs "$kt") vs $(secs "$xt") → ${m} × (CPU: $(secs "$kc") vs $(secs "$xc") → $(ratio "$xc" "$kc") ×) | $v |"
    fi
    # The same two targets for each other level (the default is the one
    # above): what a user who asks for a smaller overlay gets.
    for lv in $LEVELS; do
        ks=$(stat_of med kimberlize "diff --level $lv" 8)
        kt=$(stat_of med kimberlize "diff --level $lv" 5)
        [[ $ks == NA || $peer == NA ]] && continue
        m=$(ratio "$ks" "$peer")
        v=$(awk -v m="$m" 'BEGIN { print (m <= 0.9) ? "PASS" : "MISS" }')
        echo "| --level $lv: overlay ≤ 0.9 × min(xdelta3, zstd --patch-from) | $(mb "$ks") vs $(mb "$peer") → ${m} × | $v |"
        if [[ $kt != NA && $xt != NA ]]; then
            m=$(ratio "$xt" "$kt")
            v=$(awk -v m="$m" 'BEGIN { print (m >= 10) ? "PASS" : "MISS" }')
            echo "| --level $lv: diff ≥ 10 × faster than xdelta3 (wall) | $(secs "$kt") vs $(secs "$xt") → ${m} × | $v |"
        fi
    done
    echo "<!-- bench-ram:end -->"
} >"$SECTION"

python3 "$ROOT/scripts/bench/update-section.py" bench-ram "$BENCH_MD" "$SECTION" || die "cannot update $BENCH_MD"
log "results: $TSV"
cat "$SECTION"
