#!/usr/bin/env bash
# bench-qemu-migrate.sh: a peer row for scripts/bench-migrate.sh: QEMU's own
# live migration of a 512 MiB guest, two local qemu-system-x86_64 processes
# (TCG: a stock kernel makes no progress under KVM on these machines, see
# /work/shared/KVM-HERE.md), loopback TCP on 127.0.0.1, the link limited by
# QEMU's max-bandwidth (a rate limit on the source's migration stream).
# The guest: Debian's kernel + a busybox initramfs whose /init holds
# "basic": the same 160 MiB text stream as Kimberley's `fill text 160M 1 text`
# (generated on the host by scripts/bench/qemu/gentext.py and brought in by
# the initramfs) + 40 MiB from /dev/urandom, then idle.
# Runs unlimited, 100mbit, 70mbit (downtime-limit 50 ms, fallback to QEMU's
# default 300 ms when a run does not complete), and one extra run with
# multifd + zstd at 100mbit; prints a Markdown table and replaces the
# <!-- bench-qemu-migrate:begin/end --> section of BENCHMARKS.md (appended
# if absent; nothing else is touched).
#
# Environment: BENCH_DIR (default <repo>/bench-out; work dir is
# $BENCH_DIR/qemu), BENCH_MD (default <repo>/BENCHMARKS.md), RUNS (default
# 1), RATES (default "unlimited 100mbit 70mbit"), EXTRA (default
# "zstd@100mbit"; "" for none; entries MULTIFD@RATE with MULTIFD one of
# on|zstd|zlib), DOWNTIME_MS (default 50), MIGRATE_TIMEOUT (seconds per
# run before it counts as not converging, default 600), NO_MD=1 (do not
# write BENCHMARKS.md).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
H=$ROOT/scripts/bench/qemu
W=${BENCH_DIR:-$ROOT/bench-out}/qemu
MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
RUNS=${RUNS:-1}
RATES=${RATES:-unlimited 100mbit 70mbit}
EXTRA=${EXTRA-zstd@100mbit}
DOWNTIME_MS=${DOWNTIME_MS:-50}
MIGRATE_TIMEOUT=${MIGRATE_TIMEOUT:-600}
MEM=512M

# --- dependencies -----------------------------------------------------------
need=()
command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
command -v cpio >/dev/null || need+=(cpio)
command -v python3 >/dev/null || need+=(python3)
command -v zstd >/dev/null || need+=(zstd)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
compgen -G "/boot/vmlinuz-*" >/dev/null || need+=(linux-image-amd64)
if ((${#need[@]})); then
  echo "installing ${need[*]}" >&2
  apt-get update >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" >/dev/null
fi
VMLINUZ=$(ls /boot/vmlinuz-* | sort -V | tail -1)
KVER=${VMLINUZ#/boot/vmlinuz-}
QVER=$(qemu-system-x86_64 --version | head -1)

mkdir -p "$W"; cd "$W"

# --- cleanup: only the QEMU processes this script started -------------------
pids=()
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- initramfs --------------------------------------------------------------
# Rebuilt when the kernel, busybox, /init or the generator changed.
stamp="$KVER $(sha256sum /bin/busybox "$H/init" "$H/gentext.py" | cut -c1-16 | tr '\n' ' ')"
if [[ ! -f initrd.zst || "$(cat initrd.stamp 2>/dev/null)" != "$stamp" ]]; then
  echo "building initramfs" >&2
  rm -rf root initrd.zst
  mkdir -p root/{bin,sbin,proc,sys,dev,mnt,data,tmp}
  cp /bin/busybox root/bin/busybox
  cp "$H/init" root/init
  chmod 755 root/init
  python3 "$H/gentext.py" $((160 << 20)) 1 > root/data/text
  (cd root && find . | cpio -o -H newc --quiet) | zstd -q -3 -T0 > initrd.zst
  rm -rf root
  echo "$stamp" > initrd.stamp
fi

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}
qemu() { # NAME [extra args...]
  local n=$1; shift
  rm -f "$n.qmp" "$n.log"
  qemu-system-x86_64 -accel tcg -m $MEM -nodefaults -no-user-config \
    -nographic -display none -monitor none \
    -kernel "$VMLINUZ" -initrd initrd.zst \
    -append "console=ttyS0 quiet init_on_free=1" \
    -serial "file:$n.log" -qmp "unix:$n.qmp,server=on,wait=off" "$@" \
    2> "$n.err" &
  pids+=($!)
}
wait_for() { # FILE PATTERN SECONDS
  local t=$(( $(date +%s) + $3 ))
  until grep -q "$2" "$1" 2>/dev/null; do
    (( $(date +%s) < t )) || { echo "timeout waiting for '$2' in $1" >&2; tail -20 "$1" >&2; return 1; }
    sleep 0.2
  done
}
rate_bytes() {
  case $1 in
    unlimited) echo $((1 << 40)) ;;
    *mbit) echo $(( ${1%mbit} * 1000000 / 8 )) ;;
    *) echo "bad rate $1" >&2; exit 2 ;;
  esac
}

# one_run TAG RATE MULTIFD DOWNTIME -> st-TAG.json; returns non-zero if not completed
one_run() {
  local tag=$1 rate=$2 mfd=$3 dt=$4 port t0 ready
  cleanup
  t0=$(date +%s.%N)
  qemu src
  wait_for src.log KIMBERLEY-QEMU-READY 300 || return 1
  ready=$(python3 -c "import time; print('%.1f' % (time.time() - $t0))")
  sleep 3 # let the guest settle into idle
  port=$(free_port)
  qemu dst -incoming defer
  echo "  $tag: source ready after ${ready}s; migrating to 127.0.0.1:$port" >&2
  local ok=0
  timeout "$MIGRATE_TIMEOUT" python3 "$H/qmp.py" migrate src.qmp dst.qmp "$port" \
    "$(rate_bytes "$rate")" "$dt" "$mfd" "st-$tag.json" || ok=$?
  if ((ok == 0)); then
    # The guest must go on running on the destination: a new tick after the switch.
    local n
    n=$(grep -c '^tick' dst.log || true)
    sleep 5
    if (( $(grep -c '^tick' dst.log || true) <= n )); then
      echo "  $tag: destination does not tick" >&2; ok=1
    fi
    python3 - "st-$tag.json" "$ready" "$(grep -c '^tick' dst.log || true)" <<'PY'
import json, sys
p = sys.argv[1]; r = json.load(open(p))
r["bench"]["src_ready_s"] = float(sys.argv[2]); r["bench"]["dst_ticks_after"] = int(sys.argv[3])
json.dump(r, open(p, "w"), indent=1)
PY
  fi
  cp src.log "src-$tag.log"; cp dst.log "dst-$tag.log" 2>/dev/null || true
  cleanup
  return $ok
}

cases=()
for r in $RATES; do cases+=("off@$r"); done
for e in $EXTRA; do cases+=("$e"); done
rm -f st-*.json
rows=()
for c in "${cases[@]}"; do
  mfd=${c%@*} rate=${c#*@}
  for ((i = 1; i <= RUNS; i++)); do
    tag="$mfd-$rate-$i"
    dt=$DOWNTIME_MS
    if ! one_run "$tag" "$rate" "$mfd" "$dt"; then
      mv -f "st-$tag.json" "st-$tag-dt$dt-failed.json" 2>/dev/null || true
      echo "  $tag: not completed with downtime-limit $dt ms; retrying with 300 ms" >&2
      dt=300
      one_run "$tag" "$rate" "$mfd" "$dt" || { echo "  $tag: failed with 300 ms too" >&2; continue; }
    fi
    rows+=("$(python3 - "st-$tag.json" "$rate" "$mfd" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); b = r["bench"]; ram = r["ram"]
mode = {"off": "default (no multifd)", "on": "multifd, no compression"}.get(sys.argv[3], "multifd + " + sys.argv[3])
wire = b.get("relay_bytes") or ram["transferred"]
print("| %s | %s | %d | %.1f | %d | %.1f | %.1f | %d | %.1f | %s |" % (
    sys.argv[2], mode, b["downtime_limit_ms"], r["total-time"] / 1000, r["downtime"],
    ram["transferred"] / 1048576, wire / 1048576, ram["dirty-sync-count"], r.get("setup-time", 0),
    b["dst_status"]["status"]))
PY
)")
    echo "${rows[-1]}"
  done
done

# Guest RAM that QEMU sends as data (non-zero pages), from the last run.
last=$(ls -t st-*.json | grep -v failed | head -1)
sec=$(mktemp)
{
  echo "<!-- bench-qemu-migrate:begin -->"
  echo "## Peer: QEMU live migration (\`scripts/bench-qemu-migrate.sh\`)"
  echo
  echo "_Written by \`scripts/bench-qemu-migrate.sh\`; rerun it rather than editing this section._"
  echo
  echo "- $QVER, \`-accel tcg\`, \`-m $MEM\`, \`-nodefaults\`, one vCPU; guest kernel Debian $KVER (\`console=ttyS0 quiet init_on_free=1\`) + busybox initramfs"
  echo "- guest memory (\"basic\"): 160 MiB of text, byte for byte Kimberley's \`fill text 160M 1 text\` (\`zstd -1\` ratio ~3.4), loaded with the initramfs, + 40 MiB from the guest's /dev/urandom, both in the initramfs' rootfs (RAM); then idle (a shell loop printing a tick every 2 s without forking)"
  echo "- two local QEMU processes, loopback TCP on 127.0.0.1, \`migrate-incoming\` on a \`-incoming defer\` destination; link limited by QEMU's \`max-bandwidth\` (100mbit = 12500000 B/s, 70mbit = 8750000 B/s, unlimited = 2^40 B/s); \`downtime-limit\` as in the table (${DOWNTIME_MS} ms asked for; 300 ms, QEMU's default, only where ${DOWNTIME_MS} did not complete); other parameters and capabilities at QEMU's defaults (no auto-converge, no xbzrle, no postcopy)"
  echo "- total = QEMU's \`total-time\`, downtime = \`downtime\`, MiB transferred = \`ram.transferred\`; MiB on the wire = the same for the default stream, and for multifd rows the bytes counted by a TCP relay (scripts/bench/qemu/qmp.py) between source and destination, because QEMU 7.2 counts multifd pages uncompressed in \`ram.transferred\` (and its \`max-bandwidth\` limit then lets the real stream run at a different rate); rounds = \`ram.dirty-sync-count\`, setup = \`setup-time\`; every run checked: the destination is \`running\` and its guest keeps ticking"
  echo "- $(date -u '+%F %H:%M') UTC, $RUNS run(s) per row, load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
  echo "- Differences from Kimberley's \`bench-migrate.sh\`: QEMU migrates a whole Linux guest (kernel, page cache, the rootfs holding the data, device state), Kimberley a CPL-3 test guest under KVM; QEMU's default stream sends zero pages as a flag and every other page uncompressed (compression only with multifd + zlib/zstd, the extra row), Kimberley compresses with zstd; the guest runs under TCG here (dirty tracking by QEMU's softmmu, not KVM's dirty log); the rate limit is QEMU's own, as \`vmigrate send --max-bandwidth\` is Kimberley's."
  echo
  echo "| link | stream | downtime limit ms | total s | downtime ms | MiB transferred (QEMU) | MiB on the wire | dirty-sync rounds | setup ms | dest |"
  echo "|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  if [[ -n $last ]]; then
    python3 - "$last" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); ram = r["ram"]
print()
print("Guest RAM at the last run: %d normal (sent) pages = %.1f MiB, %d zero pages (sent as flags), page size %d." % (
    ram["normal"], ram["normal-bytes"] / 1048576, ram["duplicate"], ram.get("page-size", 4096)))
PY
  fi
  echo "<!-- bench-qemu-migrate:end -->"
} > "$sec"
cat "$sec"
if [[ ${NO_MD:-} != 1 ]]; then
  python3 "$ROOT/scripts/bench/update-section.py" bench-qemu-migrate "$MD" "$sec"
  echo "updated $MD"
fi
rm -f "$sec"
