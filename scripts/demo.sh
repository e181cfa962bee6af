#!/usr/bin/env bash
# The main job on an embedded default: make a base VM, build an overlay with
# the example scripts in examples/, synthesise the launch VM from the
# overlay through a pipe, resume it, and show through the guest that it is
# exactly where it was suspended.
#
#   scripts/demo.sh [WORKDIR]        (default: a fresh temporary directory)
#
# The tools: $KIMBERLEY_BIN_DIR if set (e.g. target/debug after
# scripts/test.sh), else target/release, built with cargo only when a
# source is newer than the binaries there (or they are missing).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

if [ -n "${KIMBERLEY_BIN_DIR:-}" ]; then
    bin=$KIMBERLEY_BIN_DIR
else
    bin=$repo/target/release
    stale=
    for t in kimberlize dekimberlize vmctl; do
        if [ ! -x "$bin/$t" ] || [ -n "$(find Cargo.toml Cargo.lock ./*/Cargo.toml ./*/src ./*/build.rs \
            -newer "$bin/$t" -print -quit 2>/dev/null)" ]; then
            stale=1
        fi
    done
    if [ -n "$stale" ]; then
        echo "== building release binaries (cargo build --release)"
        cargo build --release --locked -q -p kimberlize -p dekimberlize -p vmctl
    fi
fi
K=$bin/kimberlize
D=$bin/dekimberlize
C=$bin/vmctl

work=${1:-$(mktemp -d -t kimberley-demo.XXXXXX)}
mkdir -p "$work"
cd "$work"
rm -rf base launch-vm demo.key demo.ovl control.sock stats-*.json
echo "== working in $work"

step() { printf '\n== %s\n' "$*"; }
ms() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

step "kimberlize keygen: a key for the overlay (one line, KIMBERLEY-KEY-1...)"
"$K" keygen -o demo.key

step "kimberlize base: boot the test guest under KVM and suspend it (64 MiB memory, 256 MiB disk)"
t0=$(date +%s%N)
"$K" base -o base --memory 64M --disk 256M
echo "base VM in $(( ($(date +%s%N) - t0) / 1000000 )) ms: $(du -sh --apparent-size base | cut -f1) logical, $(du -sh base | cut -f1) on disk"

step "kimberlize build: resume the base, run the install and resume scripts, suspend, diff"
"$K" build --base base --install "$repo/examples/install.txt" --resume "$repo/examples/resume.txt" \
    -k demo.key -o demo.ovl --stats-json stats-build.json -q 2> build-console.txt
cat build-console.txt | sed 's/^/  guest: /'
echo "overlay: $(stat -c %s demo.ovl) bytes ($(ms stats-build.json 'd["diff"]["chunks"]'))"

step "kimberlize inspect"
"$K" inspect demo.ovl -k demo.key

step "dekimberlize --run: stream the overlay through a pipe, synthesise, resume"
cat demo.ovl | "$D" --base base -k demo.key -o launch-vm --run --control control.sock \
    --stats-json stats-run.json -q > run-console.txt 2> run-stderr.txt &
pid=$!
for _ in $(seq 1 300); do
    "$C" control.sock status > /dev/null 2>&1 && break
    sleep 0.05
done
[ -S control.sock ] || { cat run-stderr.txt; exit 1; }
echo "synthesis timeline (ms from start): $(ms stats-run.json 'd["times"]')"
reply=$("$C" control.sock exec "$repo/examples/check.txt")
echo "guest answers: $reply"

step "correctness, shown through the guest"
status=0
for what in "checksum app-code" "checksum app-data" "disk-checksum 0 16M" "disk-checksum 128M 4M"; do
    before=$(grep "^$what " build-console.txt | awk '{print $NF}')
    after=$(python3 -c "import json,sys; o=json.loads(sys.argv[1])['output']; print([l for l in o.splitlines() if l.startswith(sys.argv[2]+' ')][0].split()[-1])" "$reply" "$what")
    if [ "$before" = "$after" ]; then echo "  $what: $after (same as before suspend)"; else echo "  $what: $before -> $after  MISMATCH"; status=1; fi
done
c0=$(grep '^counter ' build-console.txt | awk '{print $2}')
c1=$(python3 -c "import json,sys; o=json.loads(sys.argv[1])['output']; print([l for l in o.splitlines() if l.startswith('counter ')][0].split()[1])" "$reply")
if [ "$c1" -gt "$c0" ]; then echo "  counter: $c0 at suspend -> $c1 now (continued)"; else echo "  counter went from $c0 to $c1: WRONG"; status=1; fi

step "stop: the launch VM suspends cleanly back into launch-vm/"
"$C" control.sock stop > /dev/null
wait $pid
cat run-stderr.txt | sed 's/^/  /'
[ $status = 0 ] && echo "demo OK" || { echo "demo FAILED"; exit 1; }
