#!/usr/bin/env bash
# bench-offload.sh: issue 14's performance target for the cloudlet daemon.
# Two network namespaces (cloudlet 10.79.0.1, device 10.79.0.2) joined by a
# veth pair whose ends are limited to RATE with `tc tbf`; kimberlized runs
# in the cloudlet namespace, `kimberlize offload` in the device namespace,
# uploading the overlay of BENCHMARKS.md's synthesis row (bench-vm.sh row
# 3: a microVM launch VM with 60 % text and 30 % random pages in memory and
# 10 % random blocks on disk, SIZE of data in all; about 119 MB of overlay
# for 200M). Measured, RUNS times:
#   offload start -> the guest's first answer: the wall clock of the
#   `kimberlize offload` process (and its own first_answer_ms), against the
#   overlay's transfer time at RATE (overlay bytes x 8 / RATE):
#   target: wall <= 1.1 x transfer + 1 s;
#   the same bytes copied over the same link by plain TCP (no TLS, no
#   synthesis), to show what the link itself takes;
# then the session's VM answers a status request through the daemon's API
# and the session is deleted (VM discarded). Rewrites the
# <!-- bench-offload:begin/end --> section of BENCHMARKS.md (appended if
# absent). Namespaces, the daemon and its sessions are removed on exit.
# Needs root, ip, tc, openssl, curl, python3 and /dev/kvm. The link is tc tbf on
# a veth pair between two network namespaces (no proxy).
#
# Environment (all optional):
#   SIZE=200M         data the guest writes (overlay of about 0.6 x SIZE)
#   MEM=1G            the launch VM's memory and disk (>= SIZE)
#   RUNS=5            runs (median, min - max)
#   RATE=100          link rate in Mbit/s (tc tbf on both veth ends)
#   BENCH_DIR=DIR     work dir (default: <repo>/bench-out/offload)
#   BENCH_MD=FILE     Markdown file to update (default: <repo>/BENCHMARKS.md;
#                     "-" prints the section instead)
#   BIN_DIR=DIR       kimberlize/kimberlized to use (default: a release build)
#   NO_BUILD=1        do not build them
# The machine should be otherwise idle for numbers worth keeping (check
# /proc/loadavg first); the section records the load average.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi
(($# == 0)) || { echo "usage: [ENV=...] $0   (see --help)" >&2; exit 2; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cmd_env=""
for v in SIZE MEM RUNS RATE BIN_DIR NO_BUILD; do
    if [[ -n ${!v+x} ]]; then cmd_env+="$v=${!v} "; fi
done
BENCH_CMD="${cmd_env}scripts/bench-offload.sh"
SIZE=${SIZE:-200M}
MEM=${MEM:-1G}
RUNS=${RUNS:-5}
RATE=${RATE:-100}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out/offload}
BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
[[ $BENCH_MD == - || $BENCH_MD == /* ]] || BENCH_MD=$PWD/$BENCH_MD
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
[[ $BIN_DIR == /* ]] || BIN_DIR=$PWD/$BIN_DIR
K=$BIN_DIR/kimberlize
KD=$BIN_DIR/kimberlized

log() { printf '[bench-offload %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $RUNS =~ ^[1-9][0-9]*$ ]] || die "RUNS must be a positive integer"
[[ $RATE =~ ^[1-9][0-9]*$ ]] || die "RATE must be a positive integer (Mbit/s)"
[[ $(id -u) == 0 ]] || die "needs root (network namespaces, tc): run it with sudo"
for c in ip tc openssl curl python3; do
    command -v "$c" >/dev/null || die "$c is missing (apt-get install iproute2 openssl curl python3)"
done
[[ -r /dev/kvm && -w /dev/kvm ]] || die "no usable /dev/kvm"
if [[ ${NO_BUILD:-0} != 1 && $BIN_DIR == */release ]]; then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release --locked -q -p kimberlize -p kimberlized) ||
        die "cargo build --release --locked failed"
fi
[[ -x $K && -x $KD ]] || die "$K or $KD is missing (build them or set BIN_DIR)"

bytes() { # "200M" -> bytes
    local s=$1 n=${1%%[KMGkmg]*}
    [[ $n =~ ^[0-9]+$ ]] || die "not a size: $s"
    case ${s: -1} in K|k) echo $((n << 10));; M|m) echo $((n << 20));; G|g) echo $((n << 30));; *) echo "$s";; esac
}
data=$(bytes "$SIZE")
(( data >= 10 << 20 )) || die "SIZE must be at least 10M"
(( data <= $(bytes "$MEM") )) || die "SIZE ($SIZE) must not exceed MEM ($MEM)"
# bench-vm.sh row 3's mix: 120M text + 60M random in memory, 20M on disk.
text=$((data * 6 / 10 >> 20))M rand=$((data * 3 / 10 >> 20))M disk=$((data / 10 >> 20))M

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
W=$(cd "$BENCH_DIR" && pwd)
LOGS=$W/logs
mkdir -p "$LOGS"
id=$$
NC=kob-$id-c ND=kob-$id-d VC=kobc$id VD=kobd$id
ADDR=10.79.0.1 PORT=7466
daemon_pid="" sink_pid=""
cleanup() {
    local rc=$?
    if [[ -n $sink_pid ]]; then kill "$sink_pid" 2>/dev/null || true; wait "$sink_pid" 2>/dev/null || true; fi
    if [[ -n $daemon_pid ]] && kill -0 "$daemon_pid" 2>/dev/null; then
        kill -TERM "$daemon_pid" 2>/dev/null || true
        for _ in $(seq 600); do kill -0 "$daemon_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$daemon_pid" 2>/dev/null || true
        wait "$daemon_pid" 2>/dev/null || true
    fi
    ip netns del "$NC" 2>/dev/null || true
    ip netns del "$ND" 2>/dev/null || true
    rm -rf "$W/state" "$W/base" "$W/launch"
    ((rc == 0)) || log "failed; logs in $LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

log "load average $(cut -d' ' -f1-3 /proc/loadavg); work dir $W"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------
# The overlay (as bench-vm.sh row 3).

cd "$W"
"$K" keygen -o key.key
log "base: --memory $MEM --disk $MEM"
"$K" base -o base --memory "$MEM" --disk "$MEM" >"$LOGS/base.out" 2>&1 ||
    { cat "$LOGS/base.out" >&2; die "kimberlize base failed"; }
printf 'print ready\n' >resume.txt
cat >install.txt <<EOF
fill t $text 3 text
fill r $rand 4 random
disk-write 0 $disk 5
EOF
log "overlay: $text text + $rand random in memory, $disk random on disk"
"$K" build --base base --install install.txt --resume resume.txt -k key.key -o app.ovl -q \
    2>"$LOGS/build.console" || { cat "$LOGS/build.console" >&2; die "kimberlize build failed"; }
ovl_bytes=$(stat -c %s app.ovl)
log "the same, built with --early-start (a version-2 overlay, the resumed VM's working set first)"
"$K" build --base base --install install.txt --resume resume.txt -k key.key -o early.ovl -q \
    --early-start 2>"$LOGS/build-early.console" ||
    { cat "$LOGS/build-early.console" >&2; die "kimberlize build --early-start failed"; }
early_bytes=$(stat -c %s early.ovl)

# ---------------------------------------------------------------------------
# Certificates: one operator CA for both sides (EC P-256).

pki() { openssl "$@" >>"$LOGS/openssl.log" 2>&1 || die "openssl $1 failed (see $LOGS/openssl.log)"; }
pki req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj "/CN=bench CA" \
    -keyout ca.key -out ca.pem
leaf() { # NAME SAN EKU
    pki req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$1" -keyout "$1.key" -out "$1.csr"
    printf 'subjectAltName=%s\nextendedKeyUsage=%s\nbasicConstraints=CA:FALSE\n' "$2" "$3" >"$1.ext"
    pki x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" -out "$1.pem"
}
leaf cloudlet "IP:$ADDR" serverAuth
leaf device "DNS:device" clientAuth

# ---------------------------------------------------------------------------
# The link.

ip netns add "$NC"
ip netns add "$ND"
ip link add "$VC" netns "$NC" type veth peer name "$VD" netns "$ND"
for x in "$NC $VC $ADDR/24" "$ND $VD 10.79.0.2/24"; do
    read -r ns dev a <<<"$x"
    ip -n "$ns" link set lo up
    ip -n "$ns" addr add "$a" dev "$dev"
    ip -n "$ns" link set "$dev" up
    # burst: 1 ms at the rate, at least 32 KiB; queue: 100 ms.
    burst=$((RATE * 1000000 / 8 / 1000)); ((burst >= 32768)) || burst=32768
    ip netns exec "$ns" tc qdisc add dev "$dev" root tbf rate "${RATE}mbit" burst "$burst" latency 100ms
done
tbf=$(ip netns exec "$ND" tc qdisc show dev "$VD" | sed "s/ *$//")
log "link: $tbf"

# ---------------------------------------------------------------------------
# The daemon.

ip netns exec "$NC" "$KD" --listen "$ADDR:$PORT" --no-mdns --state-dir "$W/state" --base "$W/base" \
    --cert cloudlet.pem --key cloudlet.key --client-ca ca.pem --max-sessions 1 \
    --max-memory "$MEM" --max-disk "$((4 * $(bytes "$MEM")))" 2>"$LOGS/daemon.log" &
daemon_pid=$!
for _ in $(seq 300); do
    grep -q '"listening"' "$LOGS/daemon.log" && break
    kill -0 "$daemon_pid" 2>/dev/null || { cat "$LOGS/daemon.log" >&2; die "kimberlized exited"; }
    sleep 0.1
done
grep -q '"listening"' "$LOGS/daemon.log" || die "kimberlized did not listen within 30 s"

# A plain TCP copy of the overlay over the same link: a sink in the
# cloudlet namespace reads to the end and answers one byte; the device
# sends the file and times until that byte arrives.
cat >tcpcopy.py <<'PY'
import socket, sys, time
if sys.argv[1] == "sink":
    s = socket.create_server((sys.argv[2], int(sys.argv[3])))
    print("listening", flush=True)
    while True:
        c, _ = s.accept()
        while c.recv(1 << 20):
            pass
        c.sendall(b"k")
        c.close()
else:
    f = open(sys.argv[4], "rb")
    t0 = time.monotonic()
    c = socket.create_connection((sys.argv[2], int(sys.argv[3])))
    c.sendfile(f)
    c.shutdown(socket.SHUT_WR)
    assert c.recv(1) == b"k"
    print(round((time.monotonic() - t0) * 1000))
PY
SINK_PORT=7467
ip netns exec "$NC" python3 tcpcopy.py sink "$ADDR" "$SINK_PORT" >"$LOGS/sink.out" 2>&1 &
sink_pid=$!
for _ in $(seq 100); do grep -q listening "$LOGS/sink.out" && break; sleep 0.1; done
grep -q listening "$LOGS/sink.out" || die "the TCP sink did not start: $(cat "$LOGS/sink.out")"

dev_curl() { # METHOD PATH: the device's request to the daemon
    ip netns exec "$ND" curl -sS --fail-with-body --cert device.pem --key device.key --cacert ca.pem \
        -X "$1" "https://$ADDR:$PORT$2"
}

# ---------------------------------------------------------------------------
# The runs.

jget() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$@"; }
walls=() firsts=() transfers=() synths=() copies=() efirsts=() etransfers=()
for run in $(seq 1 "$RUNS"); do
    c=$(ip netns exec "$ND" python3 tcpcopy.py send "$ADDR" "$SINK_PORT" app.ovl) ||
        die "the plain TCP copy failed (run $run)"
    copies+=("$c")
    sync -f "$W"
    t0=${EPOCHREALTIME/./}
    ip netns exec "$ND" "$K" offload app.ovl -k key.key --cert device.pem --key device.key --ca ca.pem \
        --cloudlet "$ADDR:$PORT" --json -q >"$LOGS/run-$run.json" 2>"$LOGS/run-$run.err" ||
        { cat "$LOGS/run-$run.err" >&2; die "kimberlize offload failed (run $run)"; }
    t1=${EPOCHREALTIME/./}
    j=$LOGS/run-$run.json
    walls+=("$(((t1 - t0) / 1000))")
    firsts+=("$(jget "$j" 'd["times"]["first_answer_ms"]')")
    transfers+=("$(jget "$j" 'd["times"]["transfer_ms"]')")
    synths+=("$(jget "$j" 'd["times"]["synthesis_ms"]')")
    session=$(jget "$j" 'd["session"]')
    log "run $run: plain TCP copy ${copies[-1]} ms; offload: wall ${walls[-1]} ms," \
        "first answer ${firsts[-1]} ms (client), last byte written ${transfers[-1]} ms"
    # The guest answers through the daemon's API, not only in the offload's word.
    dev_curl POST "/v1/sessions/$session/status" >"$LOGS/status-$run.json" ||
        die "status of session $session failed: $(cat "$LOGS/status-$run.json")"
    [[ $(jget "$LOGS/status-$run.json" 'd["ok"]') == True ]] ||
        die "session $session: the VM's status is not ok: $(cat "$LOGS/status-$run.json")"
    dev_curl DELETE "/v1/sessions/$session" >"$LOGS/delete-$run.json" ||
        die "DELETE of session $session failed: $(cat "$LOGS/delete-$run.json")"
    # Early start: the client's first_answer_ms is when the `ready` line
    # arrived, while the overlay may still be going up.
    sync -f "$W"
    ip netns exec "$ND" "$K" offload early.ovl -k key.key --cert device.pem --key device.key --ca ca.pem \
        --cloudlet "$ADDR:$PORT" --json -q >"$LOGS/early-$run.json" 2>"$LOGS/early-$run.err" ||
        { cat "$LOGS/early-$run.err" >&2; die "kimberlize offload of early.ovl failed (run $run)"; }
    j=$LOGS/early-$run.json
    efirsts+=("$(jget "$j" 'd["times"]["first_answer_ms"]')")
    etransfers+=("$(jget "$j" 'd["times"]["transfer_ms"]')")
    session=$(jget "$j" 'd["session"]')
    log "run $run: early start: first answer ${efirsts[-1]} ms, last byte written ${etransfers[-1]} ms"
    dev_curl POST "/v1/sessions/$session/status" >"$LOGS/estatus-$run.json" ||
        die "status of session $session failed: $(cat "$LOGS/estatus-$run.json")"
    [[ $(jget "$LOGS/estatus-$run.json" 'd["ok"]') == True ]] ||
        die "session $session: the VM's status is not ok: $(cat "$LOGS/estatus-$run.json")"
    dev_curl DELETE "/v1/sessions/$session" >"$LOGS/edelete-$run.json" ||
        die "DELETE of session $session failed: $(cat "$LOGS/edelete-$run.json")"
done

# ---------------------------------------------------------------------------
# The report.

stats() { # numbers on stdin -> "median min max"
    sort -n | awk '{a[NR]=$1} END {printf "%s %s %s\n", a[int((NR+1)/2)], a[1], a[NR]}'
}
secs() { awk -v m="$1" 'BEGIN {printf "%.2f s", m / 1000}'; }
read -r wall_med wall_min wall_max < <(printf '%s\n' "${walls[@]}" | stats)
read -r first_med first_min first_max < <(printf '%s\n' "${firsts[@]}" | stats)
read -r tr_med tr_min tr_max < <(printf '%s\n' "${transfers[@]}" | stats)
read -r sy_med sy_min sy_max < <(printf '%s\n' "${synths[@]}" | stats)
read -r cp_med cp_min cp_max < <(printf '%s\n' "${copies[@]}" | stats)
read -r ef_med ef_min ef_max < <(printf '%s\n' "${efirsts[@]}" | stats)
read -r et_med et_min et_max < <(printf '%s\n' "${etransfers[@]}" | stats)
early_transfer_ms=$(awk -v b="$early_bytes" -v r="$RATE" 'BEGIN {printf "%.0f", b * 8 / (r * 1e6) * 1000}')
early_target_ms=$(awk -v t="$early_transfer_ms" 'BEGIN {printf "%.0f", 0.3 * t}')
transfer_ms=$(awk -v b="$ovl_bytes" -v r="$RATE" 'BEGIN {printf "%.0f", b * 8 / (r * 1e6) * 1000}')
target_ms=$(awk -v t="$transfer_ms" 'BEGIN {printf "%.0f", 1.1 * t + 1000}')
div() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
verdict() { if awk "BEGIN {exit !($1)}"; then echo '**PASS**'; else echo '**MISS**'; fi; }
rev=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
# A 1-minute load above half the cores at either end: say so.
quiet=""
if awk -v a="${load_start%% *}" -v b="${load_end%% *}" -v n="$(nproc)" 'BEGIN {exit !(a > n / 2 || b > n / 2)}'; then
    quiet=" **The machine was not quiet** (other work ran beside the benchmark): times may be noisy."
fi
[[ -z $(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null) ]] || rev+=", with uncommitted changes"

section=$(cat <<MD
<!-- bench-offload:begin -->
## Offload to a cloudlet at ${RATE} Mbit/s (\`scripts/bench-offload.sh\`)

_Written by \`scripts/bench-offload.sh\`; rerun it rather than editing this section._

Measured on $(date -u '+%Y-%m-%d %H:%M UTC') (repo $rev): $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/{print $2}') GiB RAM, Linux $(uname -r), binaries from \`${BIN_DIR#"$ROOT"/}\`.
Command: \`$BENCH_CMD\` ($RUNS runs; median, min – max). Load average at start / end: $load_start / $load_end.$quiet

- Link: kimberlized in one network namespace, \`kimberlize offload --cloudlet\` in another, joined by a veth pair shaped on both ends with tc tbf (\`$tbf\`); no proxy.
- Overlay: $ovl_bytes bytes (launch VM --memory $MEM --disk $MEM; $text text + $rand random in memory, $disk random on disk, as \`bench-vm.sh\` row 3), uploaded with its key over mutual TLS 1.3. Its transfer time at exactly ${RATE} Mbit/s: $(secs "$transfer_ms"); the target is offload start → first answer ≤ 1.1 × that + 1 s = $(secs "$target_ms").
- Each run: a plain TCP copy of the overlay over the link, then \`kimberlize offload\` (timed from before its start until it exits, after the guest's \`ready\`), then a \`status\` request through the daemon's API to the session's VM (must answer \`ok\`), then the session is deleted.
- Early start: the same launch VM built with \`kimberlize build --early-start\` ($early_bytes bytes, a version-2 overlay whose resumed VM's working set comes first; its transfer time $(secs "$early_transfer_ms")): the daemon starts the VM once the working set has arrived, and the client records when the \`ready\` line arrives while it still uploads. Target (issue 14): ≤ 0.3 × the transfer time = $(secs "$early_target_ms").

| measurement | median | min – max | ÷ transfer time | ÷ target ($(secs "$target_ms")) | result |
|---|---|---|---|---|---|
| offload start → the guest's first answer, wall clock of \`kimberlize offload\` | $(secs "$wall_med") | $(secs "$wall_min") – $(secs "$wall_max") | $(div "$wall_med" "$transfer_ms") | $(div "$wall_med" "$target_ms") | $(verdict "$wall_med <= $target_ms") |
| same, the client's own \`first_answer_ms\` | $(secs "$first_med") | $(secs "$first_min") – $(secs "$first_max") | $(div "$first_med" "$transfer_ms") | $(div "$first_med" "$target_ms") | — |
| the client's \`transfer_ms\` (last overlay byte written to the TLS socket) | $(secs "$tr_med") | $(secs "$tr_min") – $(secs "$tr_max") | $(div "$tr_med" "$transfer_ms") | — | — |
| the client's \`synthesis_ms\` (the cloudlet's \`synthesised\`: launch VM complete) | $(secs "$sy_med") | $(secs "$sy_min") – $(secs "$sy_max") | $(div "$sy_med" "$transfer_ms") | — | — |
| early start: offload start → the guest's first answer (the client's \`first_answer_ms\`) | $(secs "$ef_med") | $(secs "$ef_min") – $(secs "$ef_max") | $(div "$ef_med" "$early_transfer_ms") | $(div "$ef_med" "$early_target_ms") (0.3 × transfer) | $(verdict "$ef_med <= $early_target_ms") |
| early start: the client's \`transfer_ms\` | $(secs "$et_med") | $(secs "$et_min") – $(secs "$et_max") | $(div "$et_med" "$early_transfer_ms") | — | — |
| plain TCP copy of the same bytes over the same link (until the receiver's acknowledgement) | $(secs "$cp_med") | $(secs "$cp_min") – $(secs "$cp_max") | $(div "$cp_med" "$transfer_ms") | — | — |
| context: the original Kimberley prototype at 100 Mbit/s, overlays of 64 – 197 MB | 60 – 90 s | — | — | — | — |
<!-- bench-offload:end -->
MD
)
if [[ $BENCH_MD == - ]]; then
    printf '%s\n' "$section"
else
    printf '%s\n' "$section" >"$W/section.md"
    python3 "$ROOT/scripts/bench/update-section.py" bench-offload "$BENCH_MD" "$W/section.md"
fi
log "done: ${BENCH_MD/#-/stdout}"
