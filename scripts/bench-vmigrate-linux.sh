#!/usr/bin/env bash
# bench-vmigrate-linux.sh: issue 13's benchmark. The "basic" workload in a
# 512 MiB Linux guest (QEMU, TCG), migrated at 100 Mbit/s by
#   (a) vmigrate send/recv of the QEMU-backed VM directory,
#   (b) QEMU's own migration, default stream,
#   (c) QEMU's own migration, multifd + zstd,
#   (d) vmigrate copying the disk (no --shared-disk: in QEMU's stream),
#   (e) QEMU's own migration copying the disk (block migration),
# in the same run, on the same guest image, the link shaped the same way for
# every row: two network namespaces joined by a veth pair, each end limited
# by a `tc tbf` qdisc. Prints a Markdown section and replaces the
# <!-- bench-qemu-vmigrate:begin/end --> section of BENCHMARKS.md.
#
# The guest (every row): Debian's cloud kernel + the busybox initramfs of
# `scripts/linux-base.sh --artifacts` (qemu-guest-agent, virtio modules),
# kernel command line `console=ttyS0 quiet panic=-1 init_on_free=1`,
# machine pc-i440fx-7.2, cpu qemu64, one vCPU, 512 MiB, one virtio-blk disk
# holding the 160 MiB text stream of Kimberley's `fill text 160M 1 text`
# (scripts/bench/qemu/gentext.py), present on both sides (vmigrate:
# --shared-disk; QEMU: the same file) for rows a-c, copied by rows d and
# e into a new file on the destination (compared with the source's after
# the migration). The workload, run through the
# guest agent: copy the disk into a tmpfs (/data/text), add 40 MiB from
# /dev/urandom (/data/rnd), drop the page cache (freed pages are zeroed:
# init_on_free=1), checksum both; then idle 3 s and migrate. After every
# migration the destination guest checksums both files again: they must
# be equal, and the source must be gone.
#
# Environment: BENCH_DIR (default <repo>/bench-out; work dir
# $BENCH_DIR/vmigrate-linux), BENCH_MD (default <repo>/BENCHMARKS.md),
# RUNS (default 3), RATE (default 100mbit), ROWS (default "vmigrate qemu
# qemu-zstd vmigrate-disk qemu-block"), VMIGRATE_ARGS (extra `vmigrate send` arguments, default
# none), NO_BUILD=1 (use the binaries in target/release as they are),
# NO_MD=1 (do not write BENCHMARKS.md). Needs root (network namespaces).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
H=$ROOT/scripts/bench/qemu
W=${BENCH_DIR:-$ROOT/bench-out}/vmigrate-linux
MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
RUNS=${RUNS:-3}
RATE=${RATE:-100mbit}
ROWS=${ROWS:-vmigrate qemu qemu-zstd vmigrate-disk qemu-block}
VMIGRATE_ARGS=${VMIGRATE_ARGS:-}
MEM_MIB=512
TEXT_BYTES=$((160 << 20))
RND_BYTES=$((40 << 20))
CMDLINE="console=ttyS0 quiet panic=-1 init_on_free=1"
QMP="python3 $H/qmp.py"
CMD_LINE="$0 $*"
ENV_LINE="RUNS=$RUNS RATE=$RATE ROWS=\"$ROWS\"${VMIGRATE_ARGS:+ VMIGRATE_ARGS=\"$VMIGRATE_ARGS\"}"

[[ $(id -u) == 0 ]] || { echo "bench-vmigrate-linux.sh: needs root (ip netns)" >&2; exit 2; }
case $RATE in
  *mbit) RATE_BPS=$(( ${RATE%mbit} * 1000000 / 8 )) ;;
  *) echo "RATE must be Nmbit" >&2; exit 2 ;;
esac
for t in qemu-system-x86_64 zstd python3 ip tc flock; do
  command -v $t >/dev/null || { echo "missing $t" >&2; exit 2; }
done

if [[ ${NO_BUILD:-} != 1 ]]; then
  (cd "$ROOT" && cargo build --release --locked -p vmigrate -p kimberlize >&2)
fi
VMIGRATE=$ROOT/target/release/vmigrate
KIMBERLIZE=$ROOT/target/release/kimberlize
ART=$ROOT/target/kimberley-linux-artifacts
flock "$ROOT/target/kimberley-linux-artifacts.lock" "$ROOT/scripts/linux-base.sh" --artifacts "$ART" >&2
KERNEL=$ART/vmlinuz
INITRD=$ART/initrd.cpio.gz
QVER=$(qemu-system-x86_64 --version | head -1)
mkdir -p "$W"; cd "$W"

# --- the guest image: the text disk and a suspended base VM directory ------
[[ -f key ]] || "$KIMBERLIZE" keygen -o key >/dev/null
stamp="$(sha256sum "$KERNEL" "$INITRD" "$H/gentext.py" "$KIMBERLIZE" | cut -c1-16 | tr '\n' ' ') $CMDLINE $MEM_MIB"
if [[ ! -d tpl || "$(cat tpl.stamp 2>/dev/null)" != "$stamp" ]]; then
  echo "building the text disk and the base VM directory" >&2
  rm -rf tpl text.raw
  python3 "$H/gentext.py" $TEXT_BYTES 1 > text.raw
  "$KIMBERLIZE" base --qemu --accel tcg --memory ${MEM_MIB}M --kernel "$KERNEL" --initrd "$INITRD" \
    --append "$CMDLINE" --disk text.raw -o tpl -q
  echo "$stamp" > tpl.stamp
fi
DISK_NAME=$(cd tpl && ls | grep -E '^disk.*\.raw$' | head -1)
[[ -n $DISK_NAME ]] || { echo "no disk in tpl" >&2; ls tpl >&2; exit 1; }

WORKLOAD="set -e
mkdir -p /data
mount -t tmpfs -o size=300m tmpfs /data
dd if=/dev/vda of=/data/text bs=1M 2>/dev/null
head -c $RND_BYTES /dev/urandom > /data/rnd
sync
echo 3 > /proc/sys/vm/drop_caches
md5sum /data/text /data/rnd"
CHECK="md5sum /data/text /data/rnd"

# --- processes and namespaces: only what this script started ---------------
pids=()
NSA=kbvl$$a NSB=kbvl$$b
cleanup() {
  local p
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
finish() {
  cleanup
  ip netns del "$NSA" 2>/dev/null || true
  ip netns del "$NSB" 2>/dev/null || true
}
trap finish EXIT
trap 'exit 130' INT TERM

ip netns add "$NSA"
ip netns add "$NSB"
ip link add veth0 netns "$NSA" type veth peer name veth1 netns "$NSB"
for x in "$NSA veth0 10.79.0.1/30" "$NSB veth1 10.79.0.2/30"; do
  set -- $x
  ip netns exec "$1" ip addr add "$3" dev "$2"
  ip netns exec "$1" ip link set "$2" up
  ip netns exec "$1" ip link set lo up
  ip netns exec "$1" tc qdisc add dev "$2" root tbf rate "$RATE" burst 32kbit latency 400ms
done
DST_IP=10.79.0.2
# Bytes the source's end of the link sent (Ethernet frames, headers included).
tc_bytes() { ip netns exec "$NSA" tc -s qdisc show dev veth0 | awk '/Sent/ {print $2; exit}'; }

wait_file() { # FILE PATTERN SECONDS
  local t=$(( $(date +%s) + $3 ))
  until grep -q "$2" "$1" 2>/dev/null; do
    (( $(date +%s) < t )) || { echo "timeout waiting for '$2' in $1" >&2; tail -20 "$1" >&2; return 1; }
    sleep 0.1
  done
}
wait_sock() { # PATH SECONDS
  local t=$(( $(date +%s) + $2 ))
  until [[ -S $1 ]] && $QMP ctlcmd "$1" '{"cmd":"status"}' >/dev/null 2>&1; do
    (( $(date +%s) < t )) || { echo "no control socket $1" >&2; return 1; }
    sleep 0.2
  done
}
now() { date +%s.%N; }
# Non-zero 4 KiB pages of FILE, compressed by `zstd -1` (bytes).
zstd_nonzero() {
  python3 - "$1" <<'PY' | zstd -1 -q -c | wc -c
import sys
z = bytes(4096)
with open(sys.argv[1], "rb") as f:
    out = sys.stdout.buffer
    while True:
        b = f.read(4096 * 256)
        if not b:
            break
        for i in range(0, len(b), 4096):
            p = b[i:i + 4096]
            if p != z[:len(p)]:
                out.write(p)
PY
}
nonzero_pages() {
  python3 - "$1" <<'PY'
import sys
z = bytes(4096); n = 0
with open(sys.argv[1], "rb") as f:
    while True:
        b = f.read(4096 * 256)
        if not b:
            break
        n += sum(1 for i in range(0, len(b), 4096) if b[i:i + 4096] != z[:len(b[i:i + 4096])])
print(n)
PY
}

RES=$W/results.jsonl
: > "$RES"
record() { echo "$1" >> "$RES"; echo "  $1" >&2; }

# --- (a) vmigrate ------------------------------------------------------------
run_vmigrate() { # N [copy]: with "copy", the disk is copied (not shared)
  local n=$1 row=vmigrate d share_recv share_send
  share_recv=(--shared-disk-dir "$W/run-vmigrate-$n") share_send=(--shared-disk)
  if [[ ${2:-} == copy ]]; then row=vmigrate-disk share_recv=() share_send=(); fi
  d=$W/run-$row-$n
  rm -rf "$d"; mkdir -p "$d"
  cp -a --sparse=always tpl "$d/vm"
  cp key "$d/key"
  ip netns exec "$NSA" "$VMIGRATE" run "$d/vm" --control "$d/src.sock" > "$d/src.out" 2>&1 &
  local src=$!; pids+=($src)
  wait_sock "$d/src.sock" 120
  $QMP ctl "$d/src.sock" 600 "$WORKLOAD" > "$d/before.txt"
  sleep 3
  ip netns exec "$NSB" "$VMIGRATE" recv --listen $DST_IP:7070 -k "$d/key" -o "$d/dst" \
    --control "$d/dst.sock" "${share_recv[@]}" --stats-json "$d/rstats.json" > "$d/dst.out" 2>&1 &
  local dst=$!; pids+=($dst)
  wait_file "$d/dst.out" "waiting for a migration" 30
  local load b0 b1 t0 t1
  load=$(cut -d' ' -f1 /proc/loadavg)
  b0=$(tc_bytes); t0=$(now)
  # shellcheck disable=SC2086
  "$VMIGRATE" send --control "$d/src.sock" --to $DST_IP:7070 -k "$d/key" "${share_send[@]}" \
    --stats-json "$d/stats.json" -q $VMIGRATE_ARGS 2> "$d/send.err"
  t1=$(now); b1=$(tc_bytes)
  wait "$src" || { echo "source exited non-zero" >&2; return 1; }
  wait_sock "$d/dst.sock" 60
  $QMP ctl "$d/dst.sock" 300 "$CHECK" > "$d/after.txt"
  local same=false
  [[ $(grep -c /data "$d/before.txt") == 2 ]] && cmp -s <(grep /data "$d/before.txt") <(grep /data "$d/after.txt") && same=true
  $QMP ctlcmd "$d/dst.sock" '{"cmd":"stop"}' >/dev/null
  wait "$dst" || true
  # A copied disk must be the source's, byte for byte.
  [[ $row == vmigrate ]] || cmp -s "$d/dst/$DISK_NAME" "$d/vm/$DISK_NAME" || same=false
  local zs nz
  zs=$(zstd_nonzero "$d/dst/memory.raw"); nz=$(nonzero_pages "$d/dst/memory.raw")
  record "$(python3 - "$d/stats.json" "$n" "$t0" "$t1" "$b0" "$b1" "$same" "$zs" "$nz" "$load" "$row" <<'PY'
import json, sys
s = json.load(open(sys.argv[1]))
n, t0, t1, b0, b1, same, zs, nz, load, row = sys.argv[2:]
mc = s.get("measured_costs") or {}
print(json.dumps({"row": row, "run": int(n), "total_s": s["total_ms"] / 1000,
  "wall_s": float(t1) - float(t0), "downtime_ms": s["downtime_ms"], "wire": s["bytes_on_wire"],
  "tc": int(b1) - int(b0), "rounds": s["rounds"], "stop": s.get("stop_reason"),
  "same": same == "true", "zstd_nonzero": int(zs), "nonzero_pages": int(nz),
  "stream_bytes": mc.get("stream_bytes"), "boot_files_bytes": (mc.get("boot_files") or {}).get("boot_files_bytes"),
  "repaired_pages": mc.get("repaired_pages"), "disk_ref_pages": (mc.get("disk_refs") or {}).get("pages"), "load": float(load)}))
PY
)"
  cleanup
}

# --- (b), (c) QEMU's own migration ------------------------------------------
qemu_argv() { # NAME DIR [DISK]
  echo -nodefaults -no-user-config -display none -no-reboot \
    -machine pc-i440fx-7.2,accel=tcg -cpu qemu64 -smp 1 -m ${MEM_MIB}M \
    -kernel "$KERNEL" -initrd "$INITRD" \
    -serial "file:$2/$1.log" \
    -device virtio-serial-pci,id=vser0 \
    -chardev "socket,id=qga0,path=$2/$1.qga,server=on,wait=off" \
    -device virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0 \
    -drive "file=${3:-$W/text.raw},format=raw,if=none,id=disk0,discard=unmap,cache=writeback,file.locking=off" \
    -device virtio-blk-pci,drive=disk0,discard=on \
    -qmp "unix:$2/$1.qmp,server=on,wait=off"
}
run_qemu() { # N MULTIFD(off|zstd|block: the disk copied by block migration)
  local n=$1 mfd=$2 row=qemu d dst_disk
  [[ $mfd == off ]] || row=qemu-$mfd
  d=$W/run-$row-$n
  rm -rf "$d"; mkdir -p "$d"
  dst_disk=$W/text.raw
  if [[ $mfd == block ]]; then
    dst_disk=$d/dst-disk.raw
    truncate -s "$(stat -c %s "$W/text.raw")" "$dst_disk"
  fi
  # shellcheck disable=SC2046
  ip netns exec "$NSA" qemu-system-x86_64 $(qemu_argv src "$d") -append "$CMDLINE" 2> "$d/src.err" &
  local src=$!; pids+=($src)
  $QMP qga "$d/src.qga" 600 "$WORKLOAD" > "$d/before.txt"
  sleep 3
  # shellcheck disable=SC2046
  ip netns exec "$NSB" qemu-system-x86_64 $(qemu_argv dst "$d" "$dst_disk") -append "$CMDLINE" -incoming defer 2> "$d/dst.err" &
  local dst=$!; pids+=($dst)
  local load b0 b1 t0 t1
  load=$(cut -d' ' -f1 /proc/loadavg)
  b0=$(tc_bytes); t0=$(now)
  # QEMU's defaults except max-bandwidth (out of the way: the link limits);
  # downtime-limit 300 ms is QEMU's default. The stream goes through the
  # counting relay (the bytes QEMU really sent, multifd compressed).
  ip netns exec "$NSA" python3 "$H/qmp.py" migrate "$d/src.qmp" "$d/dst.qmp" 7071 $((1 << 40)) 300 "$mfd" \
    "$d/st.json" $DST_IP 1 2> "$d/migrate.err"
  t1=$(now); b1=$(tc_bytes)
  $QMP qga "$d/dst.qga" 300 "$CHECK" > "$d/after.txt"
  local same=false srcst
  [[ $(grep -c /data "$d/before.txt") == 2 ]] && cmp -s <(grep /data "$d/before.txt") <(grep /data "$d/after.txt") && same=true
  [[ $mfd != block ]] || cmp -s "$dst_disk" "$W/text.raw" || same=false
  srcst=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["bench"]["src_status"]["status"])' "$d/st.json")
  record "$(python3 - "$d/st.json" "$n" "$t0" "$t1" "$b0" "$b1" "$same" "$row" "$load" "$srcst" <<'PY'
import json, sys
r = json.load(open(sys.argv[1])); b = r["bench"]; ram = r["ram"]
n, t0, t1, b0, b1, same, row, load, srcst = sys.argv[2:]
print(json.dumps({"row": row, "run": int(n), "total_s": b["dst_running_s"], "qemu_total_s": r["total-time"] / 1000,
  "wall_s": float(t1) - float(t0), "downtime_ms": b["stop_to_resume_ms"], "qemu_downtime_ms": r["downtime"], "wire": b["relay_bytes"],
  "tc": int(b1) - int(b0), "rounds": ram["dirty-sync-count"], "stop": r["status"],
  "same": same == "true" and b["dst_status"]["status"] == "running" and srcst == "postmigrate",
  "qemu_transferred": ram["transferred"], "normal_pages": ram["normal"], "load": float(load)}))
PY
)"
  cleanup
}

for ((i = 1; i <= RUNS; i++)); do
  for r in $ROWS; do
    echo "run $i: $r" >&2
    case $r in
      vmigrate) run_vmigrate $i ;;
      qemu) run_qemu $i off ;;
      qemu-zstd) run_qemu $i zstd ;;
      vmigrate-disk) run_vmigrate $i copy ;;
      qemu-block) run_qemu $i block ;;
      *) echo "unknown row $r" >&2; exit 2 ;;
    esac
  done
done

# --- the section --------------------------------------------------------------
sec=$(mktemp)
python3 - "$RES" "$RATE_BPS" "$RATE" > "$sec.body" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
bps, rate = int(sys.argv[2]), sys.argv[3]
M = 1 << 20
names = {"vmigrate": "(a) vmigrate send/recv --shared-disk (QEMU's stream through vmigrate's channel, zstd -3; guest pages equal to shared-disk blocks sent as references)",
         "qemu": "(b) QEMU, default stream", "qemu-zstd": "(c) QEMU, multifd + zstd",
         "vmigrate-disk": "(d) vmigrate copying the disk (no `--shared-disk`: QEMU's block migration in its stream, through vmigrate's channel)",
         "qemu-block": "(e) QEMU copying the disk, default stream + block migration"}
def med(vals, fmt):
    vals = sorted(vals)
    m = statistics.median(vals)
    if len(vals) == 1:
        return (fmt % m) + " (1 run)"
    return (fmt % m) + " (" + (fmt % vals[0]) + " – " + (fmt % vals[-1]) + ")"
by = {}
for r in rows:
    by.setdefault(r["row"], []).append(r)
print("| row | runs | total s | (QEMU's own total-time s) | downtime ms | (QEMU's own downtime ms) | MiB on the wire (payload) | MiB through the tbf qdisc (frames) | wire / bandwidth s | rounds (dirty syncs) | checks |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for k in ("vmigrate", "qemu", "qemu-zstd", "vmigrate-disk", "qemu-block"):
    if k not in by:
        continue
    rs = by[k]
    print("| %s | %d | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
        names[k], len(rs), med([r["total_s"] for r in rs], "%.2f"),
        med([r["qemu_total_s"] for r in rs], "%.2f") if "qemu_total_s" in rs[0] else "–",
        med([r["downtime_ms"] for r in rs], "%.0f"),
        med([r["qemu_downtime_ms"] for r in rs], "%.0f") if "qemu_downtime_ms" in rs[0] else "–",
        med([r["wire"] / M for r in rs], "%.1f"), med([r["tc"] / M for r in rs], "%.1f"),
        med([r["wire"] / bps for r in rs], "%.2f"), med([r["rounds"] for r in rs], "%d"),
        "%d/%d equal" % (sum(r["same"] for r in rs), len(rs))))
print()
if "vmigrate" in by:
    v = by["vmigrate"]
    tot = statistics.median(r["total_s"] for r in v)
    wire = statistics.median(r["wire"] for r in v)
    zs = statistics.median(r["zstd_nonzero"] for r in v)
    dt = statistics.median(r["downtime_ms"] for r in v)
    print("Guest memory at the switch-over (vmigrate runs: the received `memory.raw`): %s non-zero 4 KiB pages, `zstd -1` of them %s MiB; vmigrate's boot files (kernel, initrd) %s MiB of its wire bytes; QEMU stream before compression %s MiB; pages sent as references to the shared disk %s; pages repaired by the memory check %s." % (
        med([r["nonzero_pages"] for r in v], "%d"), med([r["zstd_nonzero"] / M for r in v], "%.1f"),
        med([(r["boot_files_bytes"] or 0) / M for r in v], "%.1f"), med([(r["stream_bytes"] or 0) / M for r in v], "%.1f"),
        med([r.get("disk_ref_pages") or 0 for r in v], "%d"),
        med([r["repaired_pages"] or 0 for r in v], "%d")))
    print()
    print("| target (medians) | measured | result |")
    print("|---|---|---|")
    def row(name, val, limit, txt):
        print("| %s | %s | **%s** |" % (name, txt, "PASS" if val <= limit else "MISS"))
    if "qemu-zstd" in by:
        q = statistics.median(r["total_s"] for r in by["qemu-zstd"])
        row("vmigrate total ≤ 0.6 × QEMU multifd+zstd total", tot, 0.6 * q, "%.2f s against 0.6 × %.2f s = %.2f s (%.2f×)" % (tot, q, 0.6 * q, tot / q))
    row("vmigrate total ≤ 1.15 × wire / bandwidth", tot, 1.15 * wire / bps, "%.2f s against 1.15 × %.2f s = %.2f s (%.2f×)" % (tot, wire / bps, 1.15 * wire / bps, tot / (wire / bps)))
    row("wire bytes ≤ 1.05 × `zstd -1` of the non-zero pages", wire, 1.05 * zs, "%.1f MiB against 1.05 × %.1f MiB = %.1f MiB (%.2f×)" % (wire / M, zs / M, 1.05 * zs / M, wire / zs))
    row("downtime ≤ 300 ms", dt, 300, "%.0f ms" % dt)
    print()
if "vmigrate-disk" in by and "qemu-block" in by:
    v = statistics.median(r["total_s"] for r in by["vmigrate-disk"])
    q = statistics.median(r["total_s"] for r in by["qemu-block"])
    vw = statistics.median(r["wire"] for r in by["vmigrate-disk"])
    qw = statistics.median(r["wire"] for r in by["qemu-block"])
    print("With the disk copied (rows d and e; no issue target): vmigrate's total is %.2f× QEMU's (%.2f s against %.2f s), its wire bytes %.2f× (%.1f MiB against %.1f MiB)." % (v / q, v, q, vw / qw, vw / M, qw / M))
    print()
print("Load (1-minute average when each migration started): %s." % ", ".join("%s %s" % (k, med([r["load"] for r in by[k]], "%.2f")) for k in by))
PY
{
  echo "<!-- bench-qemu-vmigrate:begin -->"
  echo "## vmigrate against QEMU's own migration, Linux guest (\`scripts/bench-vmigrate-linux.sh\`)"
  echo
  echo "_Written by \`scripts/bench-vmigrate-linux.sh\`; rerun it rather than editing this section._"
  echo
  echo "- Command: \`$ENV_LINE $CMD_LINE\` (repo $(cd "$ROOT" && git rev-parse --short HEAD)$(cd "$ROOT" && git diff --quiet HEAD -- . ':!BENCHMARKS.md' || echo ', with uncommitted changes')), $(date -u '+%F %H:%M') UTC, $(nproc) cores shared with other work"
  echo "- $QVER, \`-accel tcg\`, machine pc-i440fx-7.2, cpu qemu64, one vCPU, ${MEM_MIB} MiB; guest: Debian's cloud kernel $(cat "$ART/kernel-release" 2>/dev/null) + the busybox initramfs of \`scripts/linux-base.sh --artifacts\` (qemu-guest-agent), \`$CMDLINE\`; the same kernel, initramfs, command line and disk for every row (vmigrate: a \`kimberlize base --qemu\` VM directory restored by \`vmigrate run\`, RAM in its shared \`memory.raw\`; QEMU rows: booted directly with the backend's devices, anonymous RAM)"
  echo "- Workload \"basic\" (through the guest agent, before each migration): the 160 MiB text of Kimberley's \`fill text 160M 1 text\` copied from a virtio-blk disk into a tmpfs, 40 MiB from the guest's /dev/urandom into the same tmpfs, the page cache dropped (\`init_on_free=1\` zeroes what it frees); then idle 3 s. Rows a-c: the disk is on both sides (vmigrate \`--shared-disk\`; QEMU: the same file), so they do not send it; rows d and e copy it (the guest only reads it), and the destination's disk file must equal the source's byte for byte. bench-qemu-migrate.sh brings the same text in its initramfs instead; here it cannot, because vmigrate sends a VM's initramfs file to the receiver."
  echo "- Link: two network namespaces joined by a veth pair, \`tc qdisc ... tbf rate $RATE burst 32kbit latency 400ms\` on both ends; every row over it; no tool's own bandwidth limit (QEMU \`max-bandwidth\` 2^40 B/s; vmigrate without \`--max-bandwidth\`). QEMU at its defaults otherwise (\`downtime-limit\` 300 ms, 2 multifd channels, zstd level 1); vmigrate at its defaults (\`--downtime-ms 50\`)${VMIGRATE_ARGS:+ plus \`$VMIGRATE_ARGS\`}."
  echo "- Measured: total = vmigrate's \`--stats-json\` \`total_ms\` (request to the receiver's confirmation that the guest runs there) / for QEMU, from the \`migrate\` command to the destination's first \`running\` answer to \`query-status\` (polled every 50 ms); QEMU's own \`total-time\` is shown apart: it ends when the source has written its last byte, here into the counting relay, not when the bytes have crossed the link; downtime = from the source QEMU's STOP to the guest running on the receiver, for every row: vmigrate's \`downtime_ms\` (memory check, commit and resume included) / for QEMU the source's STOP event to the destination's RESUME event (QMP timestamps, one host, one clock); QEMU's own \`downtime\` is shown apart: the source's stop to its completion, here writing into the local relay, so without the link's tail and the destination's load and start; wire (payload) = vmigrate's \`bytes_on_wire\` (sealed frames, both directions) / the bytes of QEMU's stream counted by a TCP relay in front of the source (scripts/bench/qemu/qmp.py; QEMU 7.2 counts multifd pages uncompressed in \`ram.transferred\`); frames = the bytes the source end's tbf qdisc sent during the migration (Ethernet, IP and TCP headers included, one direction); checks: the destination's guest has both files (and, rows d and e, the destination's disk file is the source's) with the checksums they had on the source (and QEMU's destination is \`running\`, its source \`postmigrate\`; vmigrate's source process exited 0). Medians of $RUNS runs, min – max in parentheses."
  echo
  cat "$sec.body"
  echo "<!-- bench-qemu-vmigrate:end -->"
} > "$sec"
cat "$sec"
if [[ ${NO_MD:-} != 1 ]]; then
  python3 "$ROOT/scripts/bench/update-section.py" bench-qemu-vmigrate "$MD" "$sec"
  echo "updated $MD" >&2
fi
rm -f "$sec" "$sec.body"
