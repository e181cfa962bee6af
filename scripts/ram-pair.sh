#!/usr/bin/env bash
# ram-pair.sh: the two guest-RAM images scripts/bench-ram.sh compares (issue
# 10's "guest RAM alone"): a Debian guest suspended idle, and the same guest
# after installing an application from its Debian package and starting it.
#
#   scripts/ram-pair.sh DIR [APP]      (APP: abiword, the default, or any package)
#
# Makes DIR/base (scripts/linux-base.sh --memory $MEMORY, a Debian root
# booted with init_on_free=1) and DIR/APP (`kimberlize build --net user
# --launch-out`: apt-get update, apt-get install APP, the app started
# headless where it can be), then prints the two memory files:
#   scripts/bench-ram.sh DIR/base/memory.raw DIR/APP/memory.raw
# Under TCG (no KVM for guest kernels here) this takes tens of minutes.
#
# Environment: MEMORY=512M (guest RAM), KIMBERLIZE (the binary; default
# target/release/kimberlize), and linux-base.sh's own.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help || $# -lt 1 || $# -gt 2 ]]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    [[ ${1:-} == -h || ${1:-} == --help ]] && exit 0
    exit 2
fi
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=$1
APP=${2:-abiword}
MEMORY=${MEMORY:-512M}
KIMB=${KIMBERLIZE:-$ROOT/target/release/kimberlize}
[[ -x $KIMB ]] || { echo "error: $KIMB is missing (cargo build --release -p kimberlize, or set KIMBERLIZE)" >&2; exit 1; }
[[ ! -e $DIR/base && ! -e $DIR/$APP ]] || { echo "error: $DIR/base or $DIR/$APP exists" >&2; exit 1; }
mkdir -p "$DIR"

KIMBERLIZE=$KIMB "$ROOT/scripts/linux-base.sh" -o "$DIR/base" --memory "$MEMORY"

cat >"$DIR/install.sh" <<EOF
set -e
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q $APP
apt-get clean
EOF
if [[ $APP == abiword ]]; then
    # AbiWord without a display: its command plugin reads commands on stdin
    # (held open by a sleeping writer).
    cat >"$DIR/resume.sh" <<'EOF'
mkfifo /run/abiword.in
nohup sleep 1000000000 >/run/abiword.in 2>/dev/null &
nohup abiword --plugin=AbiCommand </run/abiword.in >/run/abiword.log 2>&1 &
sleep 2
pgrep -x abiword >/dev/null
EOF
else
    printf 'true\n' >"$DIR/resume.sh"
fi
"$KIMB" build --base "$DIR/base" --install "$DIR/install.sh" --resume "$DIR/resume.sh" \
    --net user --timeout 3600 --no-encrypt --launch-out "$DIR/$APP" -q
echo "$DIR/base/memory.raw $DIR/$APP/memory.raw"
