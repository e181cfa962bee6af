#!/usr/bin/env bash
# bench-migrate.sh: live migration of a 512 MiB guest with the release
# vmigrate, source and destination on this machine (loopback TCP, the link
# limited with `vmigrate send --max-bandwidth`, a token bucket on the
# source's socket writes):
#   basic: fill 160M text + 40M random, counter running
#   media: basic + a 64M region filled and rewritten by `dirty` at 20M/s
#   mixed: fill 100M text + 100M random, and a 64M region rewritten at
#          20M/s (issue 7, finding 16: the downtime target must hold in
#          every run)
#   mixedload: mixed while two busy loops (`yes`) compete for the 2 cores
# Targets (from the issue): at 100 Mbit/s, basic's total time <= 1.15 x
# (bytes on the wire / bandwidth) and its bytes on the wire <= 1.05 x what
# `zstd -1` makes of the guest's non-zero pages; downtime < 50 ms unlimited
# and < 300 ms at 70 Mbit/s for media.
# at 100mbit, 70mbit and unlimited. Reports total time, downtime, bytes on
# the wire, rounds, stop reason and throttling, and replaces the
# <!-- bench-migrate:begin/end --> section of BENCHMARKS.md (appended if
# absent; nothing else is touched).
#
# Environment: BENCH_DIR (default <repo>/bench-out), BENCH_MD (default
# <repo>/BENCHMARKS.md), NO_BUILD=1 (use target/release as is),
# MAX_ROUNDS (default 30, as vmigrate send), RUNS (default 3: each row is
# the run with the median total time; min-max shown), PAIRS (default: basic
# and media at 100mbit, 70mbit and unlimited, mixed unlimited).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${BENCH_DIR:-$ROOT/bench-out}/migrate
MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
B=$ROOT/target/release
PAIRS=${PAIRS:-basic:100mbit basic:70mbit basic:unlimited media:100mbit media:70mbit media:unlimited mixed:unlimited mixedload:unlimited}
MAX_ROUNDS=${MAX_ROUNDS:-30}
RUNS=${RUNS:-3}
[[ ${NO_BUILD:-} == 1 ]] || (cd "$ROOT" && cargo build --release -p vmigrate -p kimberlize)
rm -rf "$W"; mkdir -p "$W"; cd "$W"
"$B/kimberlize" keygen -o key
"$B/kimberlize" base -o base --memory 512M --disk 64M
printf 'fill text 160M 1 text\nfill rnd 40M 2 random\ncounter start\n' > install
echo "sleep 10" > resume
"$B/kimberlize" build -q --base base --install install --resume resume -k key -o app.ovl --launch-out launch
printf 'fill text 100M 1 text\nfill rnd 100M 2 random\ncounter start\n' > install-mixed
"$B/kimberlize" build -q --base base --install install-mixed --resume resume -k key -o mixed.ovl --launch-out launch-mixed
# Reference: zstd -1 of the basic guest's non-zero pages.
python3 - launch/memory.raw > nonzero.raw <<'PY'
import sys
z = bytes(4096)
with open(sys.argv[1], "rb") as f:
    while True:
        p = f.read(4096)
        if not p:
            break
        if p != z:
            sys.stdout.buffer.write(p)
PY
command -v zstd >/dev/null || apt-get install -y zstd >/dev/null
nonzero=$(stat -c %s nonzero.raw)
zstd1=$(zstd -1 -c -T1 nonzero.raw | wc -c)
rm -f nonzero.raw
exec_sock() { python3 -c '
import socket,json,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall((json.dumps({"cmd":"exec","script":sys.argv[2]})+"\n").encode())
print(s.makefile().readline().strip())' "$@"; }
rows=()
for pair in $PAIRS; do
  c=${pair%%:*} r=${pair#*:}
  {
   for n in $(seq 1 "$RUNS"); do
    rm -rf vm dst ./*.sock src.log dst.log
    if [[ $c == mixed* ]]; then cp -a --sparse=always launch-mixed vm; else cp -a --sparse=always launch vm; fi
    "$B/vmigrate" run vm --control src.sock >/dev/null 2>src.log &
    src=$!
    until python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect("src.sock")' 2>/dev/null; do sleep 0.05; done
    [[ $c == basic ]] || exec_sock src.sock $'fill hot 64M 3 random\ndirty hot 20M' >/dev/null
    "$B/vmigrate" recv --listen 127.0.0.1:0 -k key -o dst --control dst.sock >/dev/null 2>dst.log &
    dst=$!
    while ! grep -q "waiting for a migration on" dst.log 2>/dev/null; do sleep 0.05; done
    addr=$(sed -n 's/.*waiting for a migration on //p' dst.log)
    bw=(); [[ $r == unlimited ]] || bw=(--max-bandwidth "$r")
    hogs=()
    if [[ $c == mixedload ]]; then yes >/dev/null & hogs+=($!); yes >/dev/null & hogs+=($!); fi
    "$B/vmigrate" send -q --control src.sock --to "$addr" -k key "${bw[@]}" \
      --max-rounds "$MAX_ROUNDS" --downtime-ms 50 --stats-json "st-$c-$r-$n.json"
    [[ ${#hogs[@]} -eq 0 ]] || kill "${hogs[@]}"
    wait $src
    until python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect("dst.sock")' 2>/dev/null; do sleep 0.05; done
    exec_sock dst.sock "counter" >/dev/null
    python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.connect("dst.sock"); s.sendall(b"{\"cmd\":\"stop\"}\n"); s.makefile().readline()'
    wait $dst
   done
    # The run with the median total time stands for the row.
    python3 - "$c" "$r" "$RUNS" <<'PY'
import json, shutil, sys
c, r, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = sorted((json.load(open(f"st-{c}-{r}-{k}.json"))["total_ms"], k) for k in range(1, n + 1))
shutil.copy(f"st-{c}-{r}-{runs[len(runs) // 2][1]}.json", f"st-{c}-{r}.json")
json.dump([t for t, _ in runs], open(f"times-{c}-{r}.json", "w"))
json.dump(sorted(json.load(open(f"st-{c}-{r}-{k}.json"))["downtime_ms"] for k in range(1, n + 1)),
          open(f"downtimes-{c}-{r}.json", "w"))
PY
    rows+=("$(python3 -c '
import json,sys
s=json.load(open(sys.argv[1]))
t=json.load(open(sys.argv[4]))
print("| %s | %s | %.1f (%.1f–%.1f) | %.1f | %.1f | %d | %s | %s |" % (sys.argv[2], sys.argv[3], s["total_ms"]/1000, t[0]/1000, t[-1]/1000, s["downtime_ms"],
  s["bytes_on_wire"]/1048576, s["rounds"], s["stop_reason"], ("yes, up to %d%%" % s["max_throttle_pct"]) if s["throttled"] else "no"))' "st-$c-$r.json" "$c" "$r" "times-$c-$r.json")")
    echo "${rows[-1]}"
  }
done
sec=$(mktemp)
{
  echo "<!-- bench-migrate:begin -->"
  echo "## Live migration (\`scripts/bench-migrate.sh\`)"
  echo
  echo "_Written by \`scripts/bench-migrate.sh\`; rerun it rather than editing this section._"
  echo
  echo "- 512 MiB guest; basic = 160M text + 40M random filled, counter running; media = basic + \`dirty\` of a 64M region at 20M/s; mixed = 100M text + 100M random + \`dirty\` of a 64M region at 20M/s; mixedload = mixed with two busy loops on the 2 cores"
  echo "- loopback, link limited by \`--max-bandwidth\` (token bucket on the sender); --downtime-ms 50, --max-rounds $MAX_ROUNDS"
  echo "- $(date -u +%F), load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
  echo
  echo "Each row is the run with the median total time of $RUNS (total: median, min–max)."
  echo
  echo "| case | link | total s | downtime ms | MiB on wire | rounds | stop | throttled |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo
  python3 - "$nonzero" "$zstd1" <<'PY'
import json, os, sys
nonzero, zstd1 = int(sys.argv[1]), int(sys.argv[2])
def st(c, r):
    p = f"st-{c}-{r}.json"
    return json.load(open(p)) if os.path.exists(p) else None
rate = {"100mbit": 100e6 / 8, "70mbit": 70e6 / 8}
print("| target | measured | result |")
print("|---|---|---|")
b = st("basic", "100mbit")
if b:
    bound = b["bytes_on_wire"] / rate["100mbit"]
    t = b["total_ms"] / 1000
    print(f"| basic, 100 Mbit/s: total ≤ 1.15 × wire/bandwidth | {t:.1f} s vs {bound:.1f} s of transfer ({t / bound:.2f}×) | {'PASS' if t <= 1.15 * bound else 'MISS'} |")
    w = b["bytes_on_wire"]
    print(f"| basic: bytes on the wire ≤ 1.05 × zstd -1 of the non-zero pages | {w / 1048576:.1f} MiB vs {zstd1 / 1048576:.1f} MiB ({w / zstd1:.2f}×; {nonzero / 1048576:.0f} MiB non-zero) | {'PASS' if w <= 1.05 * zstd1 else 'MISS'} |")
    print(f"| (context) basic at 100 Mbit/s vs the published 25 s (same memory size, other guest) | {t:.1f} s | {t / 25:.2f}× |")
for c, r, lim in [("basic", "unlimited", 50), ("media", "unlimited", 50), ("media", "70mbit", 300)]:
    s = st(c, r)
    if s:
        d = s["downtime_ms"]
        print(f"| {c}, {r}: downtime < {lim} ms | {d:.1f} ms | {'PASS' if d < lim else 'MISS'} |")
for c in ["mixed", "mixedload"]:
    if os.path.exists(f"downtimes-{c}-unlimited.json"):
        d = json.load(open(f"downtimes-{c}-unlimited.json"))
        s = st(c, "unlimited")
        e = s["downtime_estimate"]["total_ms"]
        print(f"| {c}, unlimited, --downtime-ms 50: every run's pause ≤ 50 ms | {len(d)} runs: {', '.join('%.1f' % x for x in d)} ms (median run: predicted {e:.1f} ms, stop: {s['stop_reason']}) | {'PASS' if max(d) <= 50 else 'MISS'} |")
PY
  echo "<!-- bench-migrate:end -->"
} > "$sec"
python3 "$ROOT/scripts/bench/update-section.py" bench-migrate "$MD" "$sec"
echo "updated $MD"
