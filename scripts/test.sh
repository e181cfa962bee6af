#!/usr/bin/env bash
# The test suite, as CI runs it: every test, KVM tests required when
# /dev/kvm exists, lints denied. Usage: scripts/test.sh [cargo test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# A KVM test that skips when /dev/kvm exists is a failure.
if [ -e /dev/kvm ]; then
    export KIMBERLEY_REQUIRE_KVM=1
fi
# Likewise a QEMU test when qemu-system-x86_64 is installed.
if command -v qemu-system-x86_64 >/dev/null; then
    export KIMBERLEY_REQUIRE_QEMU=1
fi
# Likewise a registry test when Debian's docker-registry is installed.
if [ -x /usr/bin/docker-registry ]; then
    export KIMBERLEY_REQUIRE_REGISTRY=1
fi

# Test scratch on tmpfs when we can: this machine's disk makes fsync and
# unlink of test images slow, and the tests create many.
if [ -z "${TMPDIR:-}" ] && [ "$(id -u)" = 0 ]; then
    scratch=/tmp/kimberley-test-scratch
    mkdir -p "$scratch"
    mountpoint -q "$scratch" || mount -t tmpfs -o size=8g,mode=1777 tmpfs "$scratch" || true
    # A directory of this run's own, removed at its end: what a test's
    # SIGKILLed child could not clean up (fault-matrix cells) goes with it.
    # Sticky and open to all as /tmp is: tests connect as other uids.
    TMPDIR=$(mktemp -d -p "$scratch" run.XXXXXX)
    chmod 1777 "$TMPDIR"
    export TMPDIR
    trap 'rm -rf "$TMPDIR"' EXIT
fi

cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --locked "$@"
