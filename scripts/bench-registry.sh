#!/usr/bin/env bash
# bench-registry.sh: overlays through an OCI registry (issue 12's targets).
# Starts Debian's docker-registry on a loopback port (storage in the work
# dir), pushes a one-layer chain of SIZE random (incompressible) bytes and
# one of SIZE/4, and measures:
#   1. kimberlize fetch into an empty cache (sha256 checked): throughput,
#      target >= 1 GB/s on loopback; 1b. the same into a cache on tmpfs
#      (SHM_DIR), where no disk bounds it;
#   2. a fetch of a chain the cache has, by tag (one manifest GET) and by
#      digest (no network): wall time, target <= 50 ms;
#   3. max RSS of the cold fetch for both sizes: target flat in overlay size;
#   4. dekimberlize --from with an empty cache (streamed apply), for context;
#   5. peers in the same rounds: curl of the same blob into a file, fsynced
#      (no digest check), curl into /dev/null (the registry's own rate on
#      this machine) and dd of 1 GiB of zeros with conv=fsync (the disk's).
# Rewrites the <!-- bench-registry:begin/end --> section of BENCHMARKS.md.
#
# Environment (all optional):
#   SIZE=1G           the larger overlay's payload (the smaller is SIZE/4)
#   RUNS=5            runs per measurement (median, min - max)
#   BENCH_DIR=DIR     work dir (default: <repo>/bench-out/registry)
#   BENCH_MD=FILE     Markdown file to update (default: <repo>/BENCHMARKS.md;
#                     "-" prints the section instead)
#   BIN_DIR=DIR       kimberlize/dekimberlize to use (default: a release build)
#   NO_BUILD=1        do not build them
#   SHM_DIR=DIR       a tmpfs for row 1b (default /dev/shm; skipped when it
#                     lacks room for two copies of the larger overlay)
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    exit 0
fi

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SIZE=${SIZE:-1G}
RUNS=${RUNS:-5}
BENCH_DIR=${BENCH_DIR:-$ROOT/bench-out/registry}
BENCH_MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
BIN_DIR=${BIN_DIR:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
KIMB=$BIN_DIR/kimberlize
DEKIMB=$BIN_DIR/dekimberlize
REGISTRY=/usr/bin/docker-registry

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x $REGISTRY ]] || die "$REGISTRY is missing: apt-get install docker-registry"
command -v /usr/bin/time >/dev/null || die "GNU time is missing: apt-get install time"
if [[ ${NO_BUILD:-0} != 1 && $BIN_DIR == */release ]]; then
    log "building release binaries"
    (cd "$ROOT" && cargo build --release -q -p kimberlize -p dekimberlize)
fi

bytes() { # "1G" -> bytes
    local s=$1 n=${1%%[KMGkmg]*}
    case ${s: -1} in K|k) echo $((n << 10));; M|m) echo $((n << 20));; G|g) echo $((n << 30));; *) echo "$s";; esac
}
BIG=$(bytes "$SIZE")
SMALL=$((BIG / 4))

rm -rf "$BENCH_DIR"
mkdir -p "$BENCH_DIR"
W=$BENCH_DIR
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat > "$W/registry.yml" <<YML
version: 0.1
log:
  level: error
  accesslog:
    disabled: true
storage:
  filesystem:
    rootdirectory: $W/storage
http:
  addr: 127.0.0.1:$port
YML
"$REGISTRY" serve "$W/registry.yml" >"$W/registry.log" 2>&1 &
reg_pid=$!
trap 'kill $reg_pid 2>/dev/null || true; [[ -s $W/last.err ]] && cat "$W/last.err" >&2 || true' EXIT
for _ in $(seq 100); do
    curl -fs "http://127.0.0.1:$port/v2/" >/dev/null 2>&1 && break
    sleep 0.1
done
curl -fs "http://127.0.0.1:$port/v2/" >/dev/null || die "the registry did not start"
R=127.0.0.1:$port

# A base of zeros and a launch VM of random bytes: an overlay of about
# its size (random pages do not compress).
make_chain() { # NAME BYTES
    local name=$1 n=$2 d=$W/$1
    mkdir -p "$d"
    truncate -s "$n" "$d/zero.raw"
    head -c "$n" /dev/urandom > "$d/rand.raw"
    "$KIMB" import -q -o "$d/base" --memory "$d/zero.raw"
    "$KIMB" import -q -o "$d/launch" --memory "$d/rand.raw"
    rm -f "$d/zero.raw" "$d/rand.raw"
    "$KIMB" diff -q --base "$d/base" --launch "$d/launch" --no-encrypt --level 1 -o "$d/l.ovl"
    "$KIMB" push -q "$R/bench/$name:v1" "$d/l.ovl" > "$d/ref"
}
log "making and pushing the overlays ($SIZE and a quarter of it)"
make_chain big "$BIG"
make_chain small "$SMALL"
big_bytes=$(stat -c %s "$W/big/l.ovl")
small_bytes=$(stat -c %s "$W/small/l.ovl")

ms() { # run a command, print its wall time in ms
    local t0 t1
    t0=$(date +%s%N); "$@" >/dev/null 2>"$W/last.err" || { [[ $? == 10 ]] || return 1; }; t1=$(date +%s%N)
    echo $(((t1 - t0) / 1000000))
}
stats() { # numbers on stdin -> "median min max"
    sort -n | awk '{a[NR]=$1} END {printf "%s %s %s\n", a[int((NR+1)/2)], a[1], a[NR]}'
}

blob_url() { # NAME -> the URL of its overlay's blob
    local d
    d=$(sha256sum "$W/$1/l.ovl" | cut -d' ' -f1)
    echo "http://$R/v2/bench/$1/blobs/sha256:$d"
}
BIG_URL=$(blob_url big)
rate() { # BYTES NS -> MB/s
    awk -v b="$1" -v n="$2" 'BEGIN {printf "%.0f", b / (n / 1e9) / 1e6}'
}

log "cold fetches of $big_bytes bytes, and the peers"
cold=() shm=() rss_big=() rss_small=() curl_file=() curl_null=() disk=()
SHM_DIR=${SHM_DIR:-/dev/shm}
shm_cache=
if [[ -d $SHM_DIR ]] && (($(df -B1 --output=avail "$SHM_DIR" | tail -1) > 2 * big_bytes)); then
    shm_cache=$(mktemp -d -p "$SHM_DIR" kimberley-bench.XXXXXX)
    trap 'kill $reg_pid 2>/dev/null || true; rm -rf "$shm_cache"; [[ -s $W/last.err ]] && cat "$W/last.err" >&2 || true' EXIT
fi
for i in $(seq "$RUNS"); do
    rm -f "$W/peer.blob"
    sync
    t0=$(date +%s%N)
    curl -fs -o "$W/peer.blob" "$BIG_URL"
    sync -f "$W/peer.blob"
    curl_file+=("$(rate "$big_bytes" $(($(date +%s%N) - t0)))")
    rm -f "$W/peer.blob"
    t0=$(date +%s%N)
    curl -fs -o /dev/null "$BIG_URL"
    curl_null+=("$(rate "$big_bytes" $(($(date +%s%N) - t0)))")
    sync
    t0=$(date +%s%N)
    dd if=/dev/zero of="$W/peer.dd" bs=1M count=1024 conv=fsync status=none
    disk+=("$(rate $((1 << 30)) $(($(date +%s%N) - t0)))")
    rm -f "$W/peer.dd"
    rm -rf "$W/cache"
    sync
    /usr/bin/time -f '%e %M' -o "$W/time" "$KIMB" fetch -q --cache "$W/cache" "$R/bench/big:v1"
    read -r secs kib < "$W/time"
    cold+=("$(awk -v b="$big_bytes" -v s="$secs" 'BEGIN {printf "%.0f", b / s / 1e6}')")
    rss_big+=("$kib")
    if [[ -n $shm_cache ]]; then
        rm -rf "$shm_cache/c"
        t0=$(date +%s%N)
        "$KIMB" fetch -q --cache "$shm_cache/c" "$R/bench/big:v1"
        shm+=("$(rate "$big_bytes" $(($(date +%s%N) - t0)))")
        rm -rf "$shm_cache/c"
    fi
    rm -rf "$W/cache-small"
    /usr/bin/time -f '%e %M' -o "$W/time" "$KIMB" fetch -q --cache "$W/cache-small" "$R/bench/small:v1"
    read -r _ kib < "$W/time"
    rss_small+=("$kib")
done
log "cached fetches"
by_tag=() by_digest=()
digest_ref=$(cat "$W/big/ref")
for i in $(seq "$RUNS"); do
    by_tag+=("$(ms "$KIMB" fetch -q --cache "$W/cache" "$R/bench/big:v1")")
    by_digest+=("$(ms "$KIMB" fetch -q --cache "$W/cache" "$digest_ref")")
done
log "dekimberlize --from, empty cache"
from=()
for i in $(seq "$RUNS"); do
    rm -rf "$W/cache-from" "$W/out"
    from+=("$(ms "$DEKIMB" -q --no-sync --base "$W/big/base" --from "$R/bench/big:v1" --cache "$W/cache-from" -o "$W/out")")
done

read -r cold_med cold_min cold_max < <(printf '%s\n' "${cold[@]}" | stats)
read -r tag_med tag_min tag_max < <(printf '%s\n' "${by_tag[@]}" | stats)
read -r dig_med dig_min dig_max < <(printf '%s\n' "${by_digest[@]}" | stats)
read -r rb_med _ _ < <(printf '%s\n' "${rss_big[@]}" | stats)
read -r rs_med _ _ < <(printf '%s\n' "${rss_small[@]}" | stats)
read -r from_med from_min from_max < <(printf '%s\n' "${from[@]}" | stats)
verdict() { if awk "BEGIN {exit !($1)}"; then echo '**PASS**'; else echo '**MISS**'; fi; }
if ((${#shm[@]})); then
    read -r sh_med sh_min sh_max < <(printf '%s\n' "${shm[@]}" | stats)
    shm_row="| 1b. the same into a cache on tmpfs ($SHM_DIR): no disk | ${sh_med} MB/s | ${sh_min} – ${sh_max} MB/s | ≥ 1000 MB/s | $(verdict "$sh_med >= 1000") |"
else
    shm_row="| 1b. the same into a cache on tmpfs | not run: $SHM_DIR missing or too small | — | — | — |"
fi
read -r cf_med cf_min cf_max < <(printf '%s\n' "${curl_file[@]}" | stats)
read -r cn_med cn_min cn_max < <(printf '%s\n' "${curl_null[@]}" | stats)
read -r dk_med dk_min dk_max < <(printf '%s\n' "${disk[@]}" | stats)

section=$(cat <<MD
<!-- bench-registry:begin -->
## Overlays through an OCI registry (\`scripts/bench-registry.sh\`)

Measured on $(date -u '+%Y-%m-%d %H:%M UTC'): $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')), $(free -g | awk '/Mem:/{print $2}') GiB RAM.
Command: \`SIZE=$SIZE RUNS=$RUNS scripts/bench-registry.sh\` ($RUNS runs; median, min – max). Load average at the end: $(cut -d' ' -f1-3 /proc/loadavg).
Debian's docker-registry $(dpkg-query -W -f='${Version}' docker-registry 2>/dev/null) on 127.0.0.1, filesystem storage; overlays of random pages (\`--no-encrypt --level 1\`): $big_bytes and $small_bytes bytes.

| measurement | median | min – max | target | result |
|---|---|---|---|---|
| 1. \`kimberlize fetch\`, empty cache, $big_bytes bytes, sha256 checked, fsynced | ${cold_med} MB/s | ${cold_min} – ${cold_max} MB/s | ≥ 1000 MB/s | $(verdict "$cold_med >= 1000") |
${shm_row}
| 2a. fetch of a cached chain by tag (one manifest GET) | ${tag_med} ms | ${tag_min} – ${tag_max} ms | ≤ 50 ms | $(verdict "$tag_med <= 50") |
| 2b. fetch of a cached chain by digest (no network) | ${dig_med} ms | ${dig_min} – ${dig_max} ms | ≤ 50 ms | $(verdict "$dig_med <= 50") |
| 3. max RSS of the cold fetch: $big_bytes vs $small_bytes bytes | $((rb_med / 1024)) MiB vs $((rs_med / 1024)) MiB | — | flat in overlay size | $(verdict "$rb_med <= $rs_med * 1.25 + 4096") |
| 4. \`dekimberlize --from\`, empty cache (streamed apply, \`--no-sync\`) | ${from_med} ms | ${from_min} – ${from_max} ms | — | — |
| 5a. peer: \`curl -o FILE\` of the same blob, fsynced, no digest check | ${cf_med} MB/s | ${cf_min} – ${cf_max} MB/s | — | fetch / curl: $(awk -v a="$cold_med" -v b="$cf_med" 'BEGIN {printf "%.2f", a / b}') |
| 5b. peer: \`curl -o /dev/null\` of the same blob (the registry's rate here) | ${cn_med} MB/s | ${cn_min} – ${cn_max} MB/s | — | — |
| 5c. the disk: \`dd\` of 1 GiB of zeros, \`conv=fsync\` | ${dk_med} MB/s | ${dk_min} – ${dk_max} MB/s | — | — |

Rows 1, 5a, 5b and 5c run in the same rounds, so they share the machine's state; 1 and 5a write to the same disk and wait for it (fsync), so 5c bounds both.
<!-- bench-registry:end -->
MD
)
if [[ $BENCH_MD == - ]]; then
    printf '%s\n' "$section"
elif grep -q '<!-- bench-registry:begin -->' "$BENCH_MD"; then
    python3 - "$BENCH_MD" "$section" <<'PY'
import re, sys
p, sec = sys.argv[1], sys.argv[2]
s = open(p).read()
s = re.sub(r"<!-- bench-registry:begin -->.*?<!-- bench-registry:end -->", lambda m: sec, s, flags=re.S)
open(p, "w").write(s)
PY
else
    printf '\n%s\n' "$section" >> "$BENCH_MD"
fi
log "done: $BENCH_MD"
