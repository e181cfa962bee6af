#!/usr/bin/env bash
# bench-linux.sh: Linux guests under QEMU (issue 8), measured end to end:
#   a. suspend of a busybox Linux guest at 256 MiB and 1 GiB (pause to VMDIR
#      committed, fsync included: `kimberlize base --qemu`'s "suspend N ms");
#   b. resume of a synthesised VMDIR to the guest agent's first answer
#      (`dekimberlize --run --stats-json`: first_answer_ms - restore_start_ms,
#      restore_to_first_instruction_ms) at 256 MiB and 1 GiB;
#   c. applications installed by their Debian packages in the Debian base
#      (1 GiB, init_on_free=1: linux-base.sh's default), one after another
#      from the same base: install time (once), the whole-VM overlay (trim
#      on, the default) against xdelta3 and zstd --patch-from on the same
#      memory and disk files and against the .deb files apt downloaded
#      (their total size, printed by the install script before `apt-get
#      clean`), the overlay once more after `--drop-caches` (a second
#      build from the launch VM that only drops the page cache), diff time
#      against xdelta3's encode, and synthesis through a 100 Mbit/s pipe
#      (`pv -L`) to the agent's first answer. BENCHMARKS.md is rewritten
#      after each application.
# Writes raw rows as TSV under the work dir and rewrites the
# <!-- bench-linux:begin/end --> section of BENCHMARKS.md.
#
# Environment (all optional):
#   RUNS=3            runs per measurement (the app install runs once)
#   PARTS="a b c"     which parts to run
#   APPS=abiword      the Debian packages of part c, one section each
#                     (e.g. APPS="abiword gnumeric gimp"; APP=X is APPS=X)
#   RATE=12500000     pipe rate for the synthesis row in bytes/s (100 Mbit/s)
#   BENCH_DIR=DIR     work dir (default: <repo>/bench-out/linux)
#   BENCH_MD=FILE     Markdown file to update (default: <repo>/BENCHMARKS.md)
#   NO_BUILD=1        use the existing target/release binaries
#   ACCEL=auto        QEMU accelerator (auto|kvm|tcg)
#   REPORT_ONLY=TSV   measure nothing: rewrite the section from this raw file
#   LINUX_ARTIFACTS=DIR  linux-base.sh --artifacts (default: its own cache,
#                     ~/.cache/kimberley/linux)
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
(($# == 0)) || { echo "bench-linux.sh: no arguments (settings are environment variables; --help)" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cmd_env=""
for v in RUNS PARTS APP APPS RATE BENCH_DIR BENCH_MD NO_BUILD ACCEL LINUX_ARTIFACTS REPORT_ONLY; do
    if [[ -n ${!v+x} ]]; then cmd_env+="$v=${!v} "; fi
done
BENCH_CMD="${cmd_env}scripts/bench-linux.sh"

RUNS=${RUNS:-3}
PARTS=${PARTS:-a b c}
APPS=${APPS:-${APP:-abiword}}
APP=
RATE=${RATE:-12500000}
ACCEL=${ACCEL:-auto}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out/linux}
BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
REL=${CARGO_TARGET_DIR:-$ROOT/target}/release
KIMB=$REL/kimberlize
DEKIMB=$REL/dekimberlize

log() { printf '[bench-linux %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

for t in qemu-system-x86_64 python3 pv xdelta3 zstd; do
    command -v "$t" >/dev/null || die "$t not found (apt-get install qemu-system-x86 python3 pv xdelta3 zstd)"
done
[[ -x /usr/bin/time ]] || die "/usr/bin/time not found (apt-get install time)"
if [[ ${NO_BUILD:-0} != 1 && -z ${REPORT_ONLY:-} ]]; then
    log "building (release)"
    (cd "$ROOT" && cargo build --release -p kimberlize -p dekimberlize) || die "cargo build failed"
fi
[[ -x $KIMB && -x $DEKIMB ]] || die "$KIMB or $DEKIMB missing (cargo build --release)"
export KIMBERLIZE=$KIMB

mkdir -p "$BENCH_DIR"
BENCH_DIR=$(cd "$BENCH_DIR" && pwd)
STAMP=$(date +%Y%m%d-%H%M%S)
W=$BENCH_DIR/work-$STAMP
LOGS=$BENCH_DIR/logs-$STAMP
mkdir -p "$W" "$LOGS"
TSV=$BENCH_DIR/results-$STAMP.tsv
if [[ -n ${REPORT_ONLY:-} ]]; then
    TSV=$(realpath "$REPORT_ONLY")
else
    printf 'part\tsubject\tmetric\trun\tvalue\tunit\tload1\tnote\n' >"$TSV"
    ln -sfn "$(basename "$TSV")" "$BENCH_DIR/results.tsv"
fi
KEY=$BENCH_DIR/overlay.key
[[ -s $KEY ]] || "$KIMB" keygen -o "$KEY" >/dev/null || die "kimberlize keygen failed"
# linux-base.sh's cache (kernel, initramfs, Debian root image), shared with
# its other users.
ART=${LINUX_ARTIFACTS:-${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kimberley/linux}
# Cleanup: the work dir holds GiBs of VM images.
cleanup() { rm -rf "$W"; }
trap cleanup EXIT

load1() { cut -d' ' -f1 /proc/loadavg; }
# rec PART SUBJECT METRIC RUN VALUE UNIT [NOTE]
rec() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "$5" "$6" "$(load1)" "${7:-}" >>"$TSV"
    log "$1 $2 $3 #$4: $5 $6${7:+ ($7)}"
}
# json FILE EXPR: a value from a JSON file (EXPR indexes `j`).
json() { python3 -c 'import json,sys; j=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$1" "$2"; }
# ctl SOCK JSON: one request on a control socket; prints the answer.
ctl() {
    python3 - "$1" "$2" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
buf = b""
while not buf.endswith(b"\n"):
    d = s.recv(65536)
    if not d:
        break
    buf += d
print(buf.decode().strip())
EOF
}
# timed NAME CMD...: runs CMD, wall seconds in T_WALL; stdout/stderr to LOGS.
timed() {
    local name=$1
    shift
    printf '%q ' "$@" >"$LOGS/$name.cmd"
    local rc=0
    /usr/bin/time -o "$LOGS/$name.time" -f '%e %M' "$@" >"$LOGS/$name.out" 2>"$LOGS/$name.err" || rc=$?
    read -r T_WALL _ < <(tail -n 1 "$LOGS/$name.time")
    return "$rc"
}

# run_resumed NAME BASE OVL OUT [pv]: dekimberlize --run to the agent's
# first answer, then stop; the stats JSON lands in LOGS/NAME.json.
run_resumed() {
    local name=$1 base=$2 ovl=$3 out=$4 pipe=${5:-} sock=$W/$1.sock j=$LOGS/$1.json pid i
    rm -rf "$out" "$j"
    if [[ $pipe == pv ]]; then
        (pv -q -L "$RATE" "$ovl" | "$DEKIMB" --base "$base" -i - -k "$KEY" -o "$out" --run --control "$sock" \
            --stats-json "$j" >"$LOGS/$name.out" 2>"$LOGS/$name.err") &
    else
        "$DEKIMB" --base "$base" -i "$ovl" -k "$KEY" -o "$out" --run --control "$sock" \
            --stats-json "$j" >"$LOGS/$name.out" 2>"$LOGS/$name.err" &
    fi
    pid=$!
    for ((i = 0; i < 1200; i++)); do
        [[ -s $j ]] && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if [[ ! -s $j ]]; then
        kill "$pid" 2>/dev/null || true
        wait "$pid" || true
        die "$name: dekimberlize --run did not answer: $(tail -n 3 "$LOGS/$name.err" | tr '\n' ' ')"
    fi
    ctl "$sock" '{"cmd":"stop"}' >"$LOGS/$name.stop" || true
    wait "$pid" || die "$name: dekimberlize --run failed after stop: $(tail -n 3 "$LOGS/$name.err" | tr '\n' ' ')"
}

ver_qemu=$(qemu-system-x86_64 --version | head -n1 | grep -oE '[0-9]+\.[0-9.]+[^ ]*' | head -n1)
ver_kernel=
accel_used=

# ---------------------------------------------------------------------------
# a. suspend; b. resume (busybox base).

declare -A BB_BASE
part_ab() {
    local mem r out line
    for mem in 256M 1G; do
        for ((r = 1; r <= RUNS; r++)); do
            out=$W/bb-$mem-$r
            timed "a-$mem-$r" "$ROOT/scripts/linux-base.sh" -o "$out" --busybox --memory "$mem" --accel "$ACCEL" --artifacts "$ART" ||
                die "linux-base.sh --busybox failed: $(tail -n 3 "$LOGS/a-$mem-$r.err" | tr '\n' ' ')"
            line=$(grep 'Linux base VM ready and suspended' "$LOGS/a-$mem-$r.err") || die "no suspend line in $LOGS/a-$mem-$r.err"
            accel_used=$(sed -E 's/.*suspended \(([a-z]+):.*/\1/' <<<"$line")
            rec a "busybox $mem" suspend_ms "$r" "$(sed -E 's/.*suspend ([0-9]+) ms.*/\1/' <<<"$line")" ms
            rec a "busybox $mem" boot_s "$r" "$(sed -E 's/.*boot ([0-9.]+) s.*/\1/' <<<"$line")" s
            [[ $r == 1 ]] || rm -rf "$out"
        done
        BB_BASE[$mem]=$W/bb-$mem-1
    done
    ver_kernel=$(cat "$ART/kernel-release" 2>/dev/null || echo "?")
    [[ " $PARTS " == *" b "* ]] || return 0
    printf 'echo installed > /root/app\n' >"$W/install.sh"
    printf 'nohup sh -c "while :; do sleep 1; done" >/dev/null 2>&1 &\n' >"$W/resume.sh"
    for mem in 256M 1G; do
        local base=${BB_BASE[$mem]} ovl=$W/bb-$mem.ovl
        "$KIMB" build --base "$base" --install "$W/install.sh" --resume "$W/resume.sh" -k "$KEY" -o "$ovl" -q \
            --stats-json "$LOGS/b-build-$mem.json" 2>"$LOGS/b-build-$mem.err" ||
            die "kimberlize build on the busybox base failed: $(tail -n 3 "$LOGS/b-build-$mem.err" | tr '\n' ' ')"
        rec a "busybox $mem" build_suspend_ms 1 "$(json "$LOGS/b-build-$mem.json" 'j["suspend_ms"]')" ms "kimberlize build --stats-json suspend_ms"
        for ((r = 1; r <= RUNS; r++)); do
            run_resumed "b-$mem-$r" "$base" "$ovl" "$W/bb-$mem-run"
            local j=$LOGS/b-$mem-$r.json
            rec b "busybox $mem" restore_to_answer_ms "$r" "$(json "$j" 'j["times"]["first_answer_ms"] - j["times"]["restore_start_ms"]')" ms
            rec b "busybox $mem" restore_to_first_instruction_ms "$r" "$(json "$j" 'j["times"]["restore_to_first_instruction_ms"]')" ms
        done
        rm -rf "$W/bb-$mem-run"
    done
}

# ---------------------------------------------------------------------------
# c. the application in the Debian base.

C_NOTE=""
BASE_C=
part_c() {
    BASE_C=$W/debian-1G
    timed c-base "$ROOT/scripts/linux-base.sh" -o "$BASE_C" --memory 1G --accel "$ACCEL" --artifacts "$ART" ||
        die "linux-base.sh (Debian) failed: $(tail -n 3 "$LOGS/c-base.err" | tr '\n' ' ')"
    rec c "debian 1G" base_s 1 "$T_WALL" s "linux-base.sh -o (root image cached after the first run)"
    accel_used=$(grep -m1 'Linux base VM ready and suspended' "$LOGS/c-base.err" | sed -E 's/.*suspended \(([a-z]+):.*/\1/') || true
    ver_kernel=$(cat "$ART/kernel-release" 2>/dev/null || echo "?")
    for APP in $APPS; do
        part_c_app
        rec meta qemu accel 1 0 - "${accel_used:-$ACCEL}"
        rec meta guest kernel 1 0 - "${ver_kernel:-?}"
        [[ -z $C_NOTE ]] || rec meta "$APP" check 1 0 - "$C_NOTE"
        C_NOTE=
        write_report
    done
}

# part_c_app: $APP in the base $BASE_C (logs under LOGS/c-$APP-*).
part_c_app() {
    local base=$BASE_C launch=$W/debian-launch r L=c-$APP
    rm -rf "$launch" "$launch-dc"
    cat >"$W/app-install.sh" <<EOF
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q $APP
# What apt downloaded (count, bytes), before it is deleted.
echo "kimberley-debs \$(ls /var/cache/apt/archives/*.deb | wc -l) \$(du -cb /var/cache/apt/archives/*.deb | tail -n 1 | cut -f1)"
apt-get clean
EOF
    # The app keeps running headless: AbiWord's command plugin reads
    # commands on stdin (held open by a sleeping writer).
    if [[ $APP == abiword ]]; then
        cat >"$W/app-resume.sh" <<'EOF'
mkfifo /run/abiword.in
nohup sleep 1000000000 >/run/abiword.in 2>/dev/null &
nohup abiword --plugin=AbiCommand </run/abiword.in >/run/abiword.log 2>&1 &
sleep 2
pgrep -x abiword >/dev/null
EOF
    else
        printf 'true\n' >"$W/app-resume.sh"
    fi
    timed "$L-build" "$KIMB" build --base "$base" --install "$W/app-install.sh" --resume "$W/app-resume.sh" --net user \
        --timeout 3600 -k "$KEY" -o "$W/app-build.ovl" --launch-out "$launch" --stats-json "$LOGS/$L-build.json" -q ||
        die "kimberlize build ($APP) failed: $(tail -n 5 "$LOGS/$L-build.err" | tr '\n' ' ')"
    rm -f "$W/app-build.ovl"
    rec c "$APP" install_s 1 "$(json "$LOGS/$L-build.json" 'j["install_ms"] / 1000')" s "apt-get update + install, once"
    rec c "$APP" build_total_s 1 "$T_WALL" s "kimberlize build, once"
    rec c "$APP" build_suspend_ms 1 "$(json "$LOGS/$L-build.json" 'j["suspend_ms"]')" ms
    rec c "$APP" trimmed_bytes 1 "$(json "$LOGS/$L-build.json" '(j.get("reclaim") or {}).get("trimmed_bytes") or "NA"')" B "fstrim in the guest before the suspend"
    local debs
    debs=$(grep -m1 '^kimberley-debs ' "$LOGS/$L-build.err") || die "no kimberley-debs line in $LOGS/$L-build.err"
    rec c "$APP" deb_count 1 "$(cut -d' ' -f2 <<<"$debs")" - "packages downloaded"
    rec c "$APP" deb_bytes 1 "$(cut -d' ' -f3 <<<"$debs")" B ".deb files downloaded (du -cb)"
    local disks=() f comps="memory.raw"
    for f in "$launch"/disk*.raw; do disks+=("${f##*/}"); done
    comps+=" ${disks[*]}"
    local ovl=$W/app.ovl
    for ((r = 1; r <= RUNS; r++)); do
        rm -f "$ovl"
        timed "$L-diff-$r" "$KIMB" diff --base "$base" --launch "$launch" -k "$KEY" -o "$ovl" -q
        rec c "$APP" kimberlize_diff_s "$r" "$T_WALL" s
        rec c "$APP" kimberlize_ovl_bytes "$r" "$(stat -c %s "$ovl")" B
        local xs=0 xt=0 zs=0 zt=0 zok=1 zn=""
        for f in $comps; do
            timed "$L-xd3-$f-$r" xdelta3 -e -f -s "$base/$f" "$launch/$f" "$W/x.xd3" ||
                die "xdelta3 on $f failed: $(tail -n 2 "$LOGS/$L-xd3-$f-$r.err")"
            xs=$((xs + $(stat -c %s "$W/x.xd3")))
            xt=$(awk -v a="$xt" -v b="$T_WALL" 'BEGIN { print a + b }')
            rec c "$APP" "xdelta3_s:$f" "$r" "$T_WALL" s
            rec c "$APP" "xdelta3_bytes:$f" "$r" "$(stat -c %s "$W/x.xd3")" B
            if timed "$L-zstd-$f-$r" zstd -f -q -T0 --long=31 --patch-from="$base/$f" "$launch/$f" -o "$W/z.zst"; then
                zs=$((zs + $(stat -c %s "$W/z.zst")))
                zt=$(awk -v a="$zt" -v b="$T_WALL" 'BEGIN { print a + b }')
                rec c "$APP" "zstd_s:$f" "$r" "$T_WALL" s
                rec c "$APP" "zstd_bytes:$f" "$r" "$(stat -c %s "$W/z.zst")" B
            else
                zok=0
                zn="$f: $(grep -v -e '^Command exited' -e '^[[:space:]]*$' "$LOGS/$L-zstd-$f-$r.err" | tail -n 1 | cut -c1-160)"
                grep -qiE "larger than|can't handle|too large" "$LOGS/$L-zstd-$f-$r.err" && zn="refused: $zn" || zn="failed: $zn"
                rec c "$APP" "zstd_s:$f" "$r" NA s "$zn"
            fi
            rm -f "$W/x.xd3" "$W/z.zst"
        done
        rec c "$APP" xdelta3_total_s "$r" "$xt" s "sum over $comps"
        rec c "$APP" xdelta3_total_bytes "$r" "$xs" B "sum over $comps"
        if ((zok)); then
            rec c "$APP" zstd_total_bytes "$r" "$zs" B "sum over $comps"
            rec c "$APP" zstd_total_s "$r" "$zt" s "sum over $comps"
        else
            rec c "$APP" zstd_total_bytes "$r" NA B "$zn"
        fi
    done
    # The page cache dropped too: a second build from the launch VM that
    # only drops it (--drop-caches) before suspending, diffed against the
    # base.
    printf 'true\n' >"$W/true.sh"
    timed "$L-dc-build" "$KIMB" build --base "$launch" --install "$W/true.sh" --resume "$W/true.sh" --drop-caches \
        --launch-out "$launch-dc" -q ||
        die "kimberlize build --drop-caches ($APP) failed: $(tail -n 5 "$LOGS/$L-dc-build.err" | tr '\n' ' ')"
    timed "$L-dc-diff" "$KIMB" diff --base "$base" --launch "$launch-dc" -k "$KEY" -o "$W/app-dc.ovl" -q ||
        die "kimberlize diff (--drop-caches launch VM) failed"
    rec c "$APP" kimberlize_dc_ovl_bytes 1 "$(stat -c %s "$W/app-dc.ovl")" B "after --drop-caches"
    rm -rf "$launch-dc" "$W/app-dc.ovl"
    # Synthesis at 100 Mbit/s: the overlay through `pv -L RATE` into
    # dekimberlize --run, to the agent's first answer.
    for ((r = 1; r <= RUNS; r++)); do
        run_resumed "$L-synth-$r" "$base" "$ovl" "$W/app-run" pv
        local j=$LOGS/$L-synth-$r.json
        rec c "$APP" synth_to_answer_s "$r" "$(json "$j" 'j["times"]["first_answer_ms"] / 1000')" s "pv -L $RATE | dekimberlize --run"
        rec c "$APP" resume_to_answer_ms "$r" "$(json "$j" 'j["times"]["first_answer_ms"] - j["times"]["restore_start_ms"]')" ms
    done
    # The application is there and runs after the resume.
    run_check "$base" "$ovl"
    rm -rf "$launch" "$ovl" "$W/app-run"
}

# run_check BASE OVL: resume once more and ask the agent.
run_check() {
    local sock=$W/check.sock out=$W/app-check pid i a
    rm -rf "$out"
    "$DEKIMB" --base "$1" -i "$2" -k "$KEY" -o "$out" --run --control "$sock" --stats-json "$LOGS/c-$APP-check.json" \
        >"$LOGS/c-$APP-check.out" 2>"$LOGS/c-$APP-check.err" &
    pid=$!
    for ((i = 0; i < 1200; i++)); do [[ -s $LOGS/c-$APP-check.json ]] && break; sleep 0.1; done
    a=$(ctl "$sock" "{\"cmd\":\"exec\",\"script\":\"dpkg-query -W -f '\${Status}' $APP; echo; pgrep -a -x $APP || true\"}" || true)
    echo "$a" >"$LOGS/c-$APP-check.answer"
    ctl "$sock" '{"cmd":"stop"}' >/dev/null || true
    wait "$pid" || true
    C_NOTE="after resume, through the agent: $(python3 -c 'import json,sys
try:
    a = json.loads(sys.argv[1]); print(" / ".join(l for l in (a.get("stdout") or a.get("output") or str(a)).splitlines() if l))
except Exception:
    print(sys.argv[1])' "$a" | cut -c1-200)"
    log "$C_NOTE"
    rm -rf "$out"
}

# ---------------------------------------------------------------------------
# Report.

# stat FN PART SUBJECT METRIC: FN in med|min|max over numeric values.
st() {
    awk -F'\t' -v p="$2" -v s="$3" -v m="$4" 'NR > 1 && $1 == p && $2 == s && $3 == m && $5 ~ /^[0-9.]+$/ { print $5 }' "$TSV" |
        sort -g | awk -v fn="$1" -f "$ROOT/scripts/bench/pick.awk"
}
n_of() { awk -F'\t' -v p="$1" -v s="$2" -v m="$3" 'NR > 1 && $1 == p && $2 == s && $3 == m && $5 ~ /^[0-9.]+$/' "$TSV" | wc -l; }
cell() { # PART SUBJECT METRIC UNIT: "median (min–max, n runs)"
    local med lo hi n
    med=$(st med "$1" "$2" "$3")
    [[ $med == NA ]] && { echo "–"; return; }
    lo=$(st min "$1" "$2" "$3")
    hi=$(st max "$1" "$2" "$3")
    n=$(n_of "$1" "$2" "$3")
    if ((n > 1)); then echo "$(fmt "$med" "$4") ($(fmt "$lo" "$4") – $(fmt "$hi" "$4"), $n runs)"; else echo "$(fmt "$med" "$4") (1 run)"; fi
}
fmt() {
    case $2 in
    ms) awk -v v="$1" 'BEGIN { printf "%.0f ms", v }' ;;
    s) awk -v v="$1" 'BEGIN { printf "%.1f s", v }' ;;
    B) awk -v b="$1" 'BEGIN { if (b >= 1048576) printf "%.1f MiB", b / 1048576; else printf "%.1f KiB", b / 1024 }' ;;
    esac
}
verdict() { awk -v c="$1" 'BEGIN { print (c ? "**PASS**" : "**MISS**") }'; }
load_summary() {
    awk -F'\t' -v n="$(nproc)" 'NR > 1 && $1 != "meta" && $7 != "" { s += $7; k++; if ($7 > m) m = $7 }
        END { if (k) printf "1-minute load average at each row: mean %.1f, max %.1f on %d CPUs%s", s / k, m, n, (m > n ? " (the machine was shared: wall times are inflated)" : "") }' "$TSV"
}

meta() { awk -F'\t' -v s="$1" -v m="$2" 'NR > 1 && $1 == "meta" && $2 == s && $3 == m { v = $8 } END { print v }' "$TSV"; }

SECTION=$BENCH_DIR/section-$STAMP.md
# write_report: the section from the TSV so far, into BENCH_MD.
write_report() {
accel_used=$(meta qemu accel)
ver_kernel=$(meta guest kernel)
{
    echo "<!-- bench-linux:begin -->"
    echo "## Linux guests under QEMU: suspend, resume, an application's overlay"
    echo
    echo "_Written by \`scripts/bench-linux.sh\`; rerun it rather than editing this section._"
    echo
    echo "- Machine: $(nproc) CPUs, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(awk '/MemTotal/ { printf "%.0f GiB RAM", $2 / 1048576 }' /proc/meminfo), Linux $(uname -r), work dir on $(df -T "$BENCH_DIR" | awk 'NR == 2 { print $2 }')"
    echo "- Date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- Command: \`$BENCH_CMD\` (repo $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo "?")$(git -C "$ROOT" status --porcelain 2>/dev/null | grep -q . && echo ", with uncommitted changes"))"
    echo "- Versions: QEMU $ver_qemu (accelerator: ${accel_used:-$ACCEL}), guest kernel ${ver_kernel:-?} (linux-image-cloud-amd64), xdelta3 $(xdelta3 -V 2>&1 | head -n1 | grep -oE '[0-9]+\.[0-9.]+[a-z0-9]*' | head -n1), zstd $(zstd --version | grep -oE 'v[0-9.]+'), pv $(pv --version | head -n1 | grep -oE '[0-9.]+' | head -n1)"
    echo "- Load: $(load_summary)"
    echo "- Method: medians and min – max over RUNS=$RUNS; raw rows: \`${TSV#"$ROOT"/}\`. Suspend is \`kimberlize base --qemu\`'s own measurement (QMP stop to the VMDIR committed: device state written, memory file and directory fsynced, renamed). Resume is \`dekimberlize --run --stats-json\`: restore start to the guest agent's first answer (\`first_answer_ms - restore_start_ms\`), and to QEMU's first guest instruction."
    echo
    if [[ " $PARTS " == *" a "* ]]; then
        echo "### a, b. Busybox guest (\`scripts/linux-base.sh --busybox\`): suspend and resume"
        echo
        echo "| measurement | 256 MiB | 1 GiB | target | result |"
        echo "|---|---|---|---|---|"
        s1=$(st med a "busybox 1G" suspend_ms)
        echo "| a. suspend: pause to VMDIR committed, fsync included (\`kimberlize base\`) | $(cell a "busybox 256M" suspend_ms ms) | $(cell a "busybox 1G" suspend_ms ms) | ≤ 200 ms at 1 GiB | $([[ $s1 == NA ]] && echo – || verdict "$(awk -v a="$s1" 'BEGIN { print (a <= 200) }')") |"
        echo "| a'. suspend after a build (\`kimberlize build --stats-json\` \`suspend_ms\`) | $(cell a "busybox 256M" build_suspend_ms ms) | $(cell a "busybox 1G" build_suspend_ms ms) | — | — |"
        echo "| (context) boot to the agent's first answer, TCG | $(cell a "busybox 256M" boot_s s) | $(cell a "busybox 1G" boot_s s) | — | — |"
        if [[ " $PARTS " == *" b "* ]]; then
            r1=$(st med b "busybox 1G" restore_to_answer_ms)
            r2=$(st med b "busybox 256M" restore_to_answer_ms)
            ok=NA
            [[ $r1 != NA && $r2 != NA ]] && ok=$(awk -v a="$r1" -v b="$r2" 'BEGIN { d = a - b; if (d < 0) d = -d; print (a <= 500 && b <= 500 && d <= 100) }')
            echo "| b. resume of a synthesised VMDIR: restore start to the agent's first answer | $(cell b "busybox 256M" restore_to_answer_ms ms) | $(cell b "busybox 1G" restore_to_answer_ms ms) | ≤ 500 ms, 256 MiB within 100 ms of 1 GiB | $([[ $ok == NA ]] && echo – || verdict "$ok") |"
            echo "| b'. same: restore start to the first guest instruction | $(cell b "busybox 256M" restore_to_first_instruction_ms ms) | $(cell b "busybox 1G" restore_to_first_instruction_ms ms) | — | — |"
        fi
        echo
    fi
    for APP in $(awk -F'\t' 'NR > 1 && $1 == "c" && $3 == "kimberlize_ovl_bytes" && !seen[$2]++ { print $2 }' "$TSV"); do
        C_NOTE=$(meta "$APP" check)
        k=$(st med c "$APP" kimberlize_ovl_bytes)
        x=$(st med c "$APP" xdelta3_total_bytes)
        z=$(st med c "$APP" zstd_total_bytes)
        peer=$x
        [[ $z != NA ]] && peer=$(awk -v a="$x" -v b="$z" 'BEGIN { print (a < b ? a : b) }')
        # The best peer per component (zstd where it works, else xdelta3),
        # summed: the strictest comparison when zstd refuses a file.
        comps=$(awk -F'\t' -v a="$APP" 'NR > 1 && $1 == "c" && $2 == a && $3 ~ /^xdelta3_bytes:/ { sub(/^xdelta3_bytes:/, "", $3); if (!seen[$3]++) print $3 }' "$TSV")
        best=0
        comp_rows=""
        for f in $comps; do
            xf=$(st med c "$APP" "xdelta3_bytes:$f")
            zf=$(st med c "$APP" "zstd_bytes:$f")
            bf=$xf
            [[ $zf != NA ]] && bf=$(awk -v a="$xf" -v b="$zf" 'BEGIN { print (a < b ? a : b) }')
            [[ $bf == NA ]] && best=NA
            [[ $best != NA ]] && best=$(awk -v a="$best" -v b="$bf" 'BEGIN { printf "%.0f", a + b }')
            zn=$(awk -F'\t' -v a="$APP" -v m="zstd_s:$f" 'NR > 1 && $1 == "c" && $2 == a && $3 == m && $5 == "NA" { print $8; exit }' "$TSV")
            comp_rows+="| $f | $(cell c "$APP" "xdelta3_bytes:$f" B) | $(cell c "$APP" "xdelta3_s:$f" s) | $( [[ $zf == NA ]] && echo "${zn:-–}" || cell c "$APP" "zstd_bytes:$f" B) | $(cell c "$APP" "zstd_s:$f" s) |"$'\n'
        done
        [[ $best != NA && $best != 0 && $peer != NA ]] && peer=$(awk -v a="$peer" -v b="$best" 'BEGIN { print (a < b ? a : b) }')
        kd=$(st med c "$APP" kimberlize_diff_s)
        xd=$(st med c "$APP" xdelta3_total_s)
        zref=$(awk -F'\t' -v a="$APP" 'NR > 1 && $1 == "c" && $2 == a && $3 == "zstd_total_bytes" && $5 == "NA" { print $8; exit }' "$TSV")
        db=$(st med c "$APP" deb_bytes)
        kdc=$(st med c "$APP" kimberlize_dc_ovl_bytes)
        # ratio A B TARGET: "**PASS** (0.42×)" if A <= TARGET × B.
        ratio() { [[ $1 == NA || $2 == NA ]] && { echo –; return; }; echo "$(verdict "$(awk -v a="$1" -v b="$2" -v t="$3" 'BEGIN { print (a <= t * b) }')") ($(awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }')×)"; }
        echo "### c. $APP installed by its Debian package (Debian bookworm base, 1 GiB, \`scripts/linux-base.sh -o\`)"
        echo
        echo "Install script: \`apt-get update && apt-get install -y $APP\` over QEMU user networking (run once), then the size of the .deb files apt downloaded, then \`apt-get clean\`. The guest kernel runs with \`init_on_free=1\` (linux-base.sh's default) and \`kimberlize build\` trims its file systems before the suspend (the default). Peers run per component (memory.raw, then each disk) on the same base and launch files; sizes and times are summed over the components. $(awk -F'\t' -v a="$APP" 'NR > 1 && $1 == "c" && $2 == a && $7 != "" { s += $7; k++; if ($7 > m) m = $7 } END { if (k) printf "1-minute load average during these rows: mean %.1f, max %.1f.", s / k, m }' "$TSV")"
        echo
        echo "| measurement | value | target | result |"
        echo "|---|---|---|---|"
        echo "| install time (\`kimberlize build\` \`install_ms\`) | $(cell c "$APP" install_s s) | — | — |"
        echo "| whole \`kimberlize build\` (restore, install, resume script, suspend, diff) | $(cell c "$APP" build_total_s s) | — | — |"
        echo "| suspend of the 1 GiB launch VM (\`suspend_ms\`) | $(cell c "$APP" build_suspend_ms ms) | ≤ 200 ms | $(v=$(st med c "$APP" build_suspend_ms); [[ $v == NA ]] && echo – || verdict "$(awk -v a="$v" 'BEGIN { print (a <= 200) }')") |"
        echo "| Kimberley overlay (memory + disk + state, encrypted) | $(cell c "$APP" kimberlize_ovl_bytes B) | ≤ 0.9 × the smaller peer ($(fmt "$peer" B)) | $([[ $k == NA || $peer == NA ]] && echo – || echo "$(verdict "$(awk -v a="$k" -v b="$peer" 'BEGIN { print (a <= 0.9 * b) }')") ($(awk -v a="$k" -v b="$peer" 'BEGIN { printf "%.2f", a / b }')×)") |"
        echo "| .deb files apt downloaded (\`du -cb\`, before \`apt-get clean\`) | $(cell c "$APP" deb_bytes B), $(st med c "$APP" deb_count) packages | — | — |"
        echo "| trimmed by the guest's \`fstrim\` before the suspend (\`--stats-json\` \`reclaim.trimmed_bytes\`) | $(cell c "$APP" trimmed_bytes B) | — | — |"
        echo "| Kimberley overlay against xdelta3's | $(fmt "$k" B) against $(fmt "$x" B) | ≤ 0.5 × | $(ratio "$k" "$x" 0.5) |"
        echo "| Kimberley overlay against the .deb files | $(fmt "$k" B) against $(fmt "$db" B) | ≤ 1.2 × | $(ratio "$k" "$db" 1.2) |"
        echo "| Kimberley overlay after \`--drop-caches\` too (a second build from the launch VM that drops the page cache), against xdelta3's / the .deb files | $(cell c "$APP" kimberlize_dc_ovl_bytes B) | ≤ 0.5 × / ≤ 1.2 × | $(ratio "$kdc" "$x" 0.5) / $(ratio "$kdc" "$db" 1.2) |"
        echo "| xdelta3 -e (default settings), sum of components | $(cell c "$APP" xdelta3_total_bytes B) | — | — |"
        echo "| zstd --patch-from --long=31 -T0, sum of components | $(cell c "$APP" zstd_total_bytes B) | — | ${zref:-} |"
        echo "| \`kimberlize diff\` time | $(cell c "$APP" kimberlize_diff_s s) | ≥ 10 × faster than xdelta3 | $([[ $kd == NA || $xd == NA ]] && echo – || echo "$(verdict "$(awk -v a="$kd" -v b="$xd" 'BEGIN { print (b >= 10 * a) }')") ($(awk -v a="$kd" -v b="$xd" 'BEGIN { printf "%.1f", b / a }')×)") |"
        echo "| xdelta3 encode time, sum of components | $(cell c "$APP" xdelta3_total_s s) | — | — |"
        echo "| zstd encode time, sum of components | $(cell c "$APP" zstd_total_s s) | — | — |"
        echo "| synthesis at 100 Mbit/s: \`pv -q -L $RATE app.ovl \| dekimberlize -i - --run\`, start to the agent's first answer | $(cell c "$APP" synth_to_answer_s s) | beside the prototype's 60 – 90 s | — |"
        echo "| of which: restore start to first answer | $(cell c "$APP" resume_to_answer_ms ms) | — | — |"
        echo
        echo "Peers per component (the smaller peer above is the smaller of: xdelta3's sum, zstd's sum, and the best peer per component summed$([[ $best != NA && $best != 0 ]] && echo ", here $(fmt "$best" B)")):"
        echo
        echo "| component | xdelta3 size | xdelta3 time | zstd size | zstd time |"
        echo "|---|---|---|---|---|"
        printf '%s' "$comp_rows"
        echo
        [[ -n $C_NOTE ]] && echo "Check: $C_NOTE" && echo
    done
    echo "<!-- bench-linux:end -->"
} >"$SECTION"

python3 "$ROOT/scripts/bench/update-section.py" bench-linux "$BENCH_MD" "$SECTION" || die "cannot update $BENCH_MD"
cp "$SECTION" "$BENCH_DIR/section.md"
log "results: $TSV"
log "report: $BENCH_MD"
}

if [[ -z ${REPORT_ONLY:-} ]]; then
    if [[ " $PARTS " == *" a "* || " $PARTS " == *" b "* ]]; then part_ab; fi
    rec meta qemu accel 1 0 - "${accel_used:-$ACCEL}"
    rec meta guest kernel 1 0 - "${ver_kernel:-?}"
    if [[ " $PARTS " == *" c "* ]]; then part_c; fi
fi
write_report
cat "$SECTION"
