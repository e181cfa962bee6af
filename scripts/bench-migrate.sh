#!/usr/bin/env bash
# bench-migrate.sh: live migration of a 512 MiB guest with the release
# vmigrate, source and destination on this machine (loopback TCP, the link
# limited with `vmigrate send --max-bandwidth`, a token bucket on the
# source's socket writes):
#   basic: fill 160M text + 40M random, counter running
#   media: basic + `dirty` of a 64M region at 20M/s
# at 100mbit, 70mbit and unlimited. Reports total time, downtime, bytes on
# the wire, rounds, stop reason and throttling, and replaces the
# <!-- bench-migrate:begin/end --> section of BENCHMARKS.md (appended if
# absent; nothing else is touched).
#
# Environment: BENCH_DIR (default <repo>/bench-out), BENCH_MD (default
# <repo>/BENCHMARKS.md), NO_BUILD=1 (use target/release as is),
# MAX_ROUNDS (default 10), CASES (default "basic media"), RATES (default
# "100mbit 70mbit unlimited").
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
W=${BENCH_DIR:-$ROOT/bench-out}/migrate
MD=${BENCH_MD:-$ROOT/BENCHMARKS.md}
B=$ROOT/target/release
CASES=${CASES:-basic media}
RATES=${RATES:-100mbit 70mbit unlimited}
MAX_ROUNDS=${MAX_ROUNDS:-10}
[[ ${NO_BUILD:-} == 1 ]] || (cd "$ROOT" && cargo build --release -p vmigrate -p kimberlize)
rm -rf "$W"; mkdir -p "$W"; cd "$W"
"$B/kimberlize" keygen -o key
"$B/kimberlize" base -o base --memory 512M --disk 64M
printf 'fill text 160M 1 text\nfill rnd 40M 2 random\nfill hot 64M 3 random\ncounter start\n' > install
echo "sleep 10" > resume
"$B/kimberlize" build -q --base base --install install --resume resume -k key -o app.ovl --launch-out launch
exec_sock() { python3 -c '
import socket,json,sys
s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.sendall((json.dumps({"cmd":"exec","script":sys.argv[2]})+"\n").encode())
print(s.makefile().readline().strip())' "$@"; }
rows=()
for c in $CASES; do
  for r in $RATES; do
    rm -rf vm dst ./*.sock
    cp -a --sparse=always launch vm
    "$B/vmigrate" run vm --control src.sock >/dev/null 2>src.log &
    src=$!
    until python3 -c 'import socket; socket.socket(socket.AF_UNIX).connect("src.sock")' 2>/dev/null; do sleep 0.05; done
    [[ $c == media ]] && exec_sock src.sock "dirty hot 20M" >/dev/null
    "$B/vmigrate" recv --listen 127.0.0.1:0 -k key -o dst --control dst.sock >/dev/null 2>dst.log &
    dst=$!
    while ! grep -q "waiting for a migration on" dst.log; do sleep 0.05; done
    addr=$(sed -n 's/.*waiting for a migration on //p' dst.log)
    bw=(); [[ $r == unlimited ]] || bw=(--max-bandwidth "$r")
    "$B/vmigrate" send -q --control src.sock --to "$addr" -k key "${bw[@]}" \
      --max-rounds "$MAX_ROUNDS" --stats-json "st-$c-$r.json"
    wait $src
    while [[ ! -S dst.sock ]]; do sleep 0.05; done
    exec_sock dst.sock "counter" >/dev/null
    python3 -c 'import socket; s=socket.socket(socket.AF_UNIX); s.connect("dst.sock"); s.sendall(b"{\"cmd\":\"stop\"}\n"); s.makefile().readline()'
    wait $dst
    rows+=("$(python3 -c '
import json,sys
s=json.load(open(sys.argv[1]))
print("| %s | %s | %.1f | %.1f | %.1f | %d | %s | %s |" % (sys.argv[2], sys.argv[3], s["total_ms"]/1000, s["downtime_ms"],
  s["bytes_on_wire"]/1048576, s["rounds"], s["stop_reason"], ("yes, up to %d%%" % s["max_throttle_pct"]) if s["throttled"] else "no"))' "st-$c-$r.json" "$c" "$r")")
    echo "${rows[-1]}"
  done
done
sec=$(mktemp)
{
  echo "<!-- bench-migrate:begin -->"
  echo "## Live migration (\`scripts/bench-migrate.sh\`)"
  echo
  echo "_Written by \`scripts/bench-migrate.sh\`; rerun it rather than editing this section._"
  echo
  echo "- 512 MiB guest; basic = 160M text + 40M random filled, counter running; media = basic + \`dirty\` of a 64M region at 20M/s"
  echo "- loopback, link limited by \`--max-bandwidth\` (token bucket on the sender); --downtime-ms 50, --max-rounds $MAX_ROUNDS"
  echo "- $(date -u +%F), load $(cut -d' ' -f1-3 /proc/loadavg), $(nproc) cores"
  echo
  echo "| case | link | total s | downtime ms | MiB on wire | rounds | stop | throttled |"
  echo "|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${rows[@]}"
  echo "<!-- bench-migrate:end -->"
} > "$sec"
python3 - "$MD" "$sec" <<'PY'
import sys,re,os
md,sec=sys.argv[1],open(sys.argv[2]).read().rstrip("\n")
s=open(md).read() if os.path.exists(md) else ""
pat=re.compile(r"<!-- bench-migrate:begin -->.*?<!-- bench-migrate:end -->",re.S)
s=pat.sub(lambda m: sec, s) if pat.search(s) else (s.rstrip("\n")+"\n\n"+sec+"\n")
open(md,"w").write(s)
PY
echo "updated $MD"
