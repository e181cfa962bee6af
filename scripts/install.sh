#!/usr/bin/env bash
# Installs kimberlize, dekimberlize, vmigrate, vmctl and kimberlized with their man pages and
# bash, zsh and fish completions.
#
#   scripts/install.sh [--prefix DIR] [--bin-dir DIR]
#
#   --prefix DIR   where to install (default /usr/local): DIR/bin,
#                  DIR/share/man/man1, DIR/share/bash-completion/completions,
#                  DIR/share/zsh/site-functions, DIR/share/fish/vendor_completions.d
#   --bin-dir DIR  take the binaries from DIR instead of building release
#                  binaries with cargo
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
tools=(kimberlize dekimberlize vmigrate vmctl kimberlized)

prefix=/usr/local
bin_dir=
while (($#)); do
    case $1 in
        --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
        --prefix=*) prefix=${1#*=}; shift ;;
        --bin-dir) bin_dir=${2:?--bin-dir needs a directory}; shift 2 ;;
        --bin-dir=*) bin_dir=${1#*=}; shift ;;
        -h|--help) sed -n '2,12s/^# \{0,1\}//p' "$0"; exit 0 ;;
        *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [ -z "$bin_dir" ]; then
    cargo build --release --locked -q "${tools[@]/#/-p}"
    bin_dir=$repo/target/release
fi
for t in "${tools[@]}"; do
    [ -x "$bin_dir/$t" ] || { echo "error: $bin_dir/$t is missing or not executable" >&2; exit 1; }
done

for t in "${tools[@]}"; do
    install -D -m 0755 "$bin_dir/$t" "$prefix/bin/$t"
done
install -d "$prefix/share/man/man1"
install -m 0644 "$repo"/man/*.1 "$prefix/share/man/man1/"
# Completion scripts come from the installed binaries themselves (vmctl's
# first argument is a socket, so it takes --completions SHELL instead).
for t in "${tools[@]}"; do
    completions=completions
    [ "$t" = vmctl ] && completions=--completions
    install -d "$prefix/share/bash-completion/completions" "$prefix/share/zsh/site-functions" \
        "$prefix/share/fish/vendor_completions.d"
    "$prefix/bin/$t" $completions bash > "$prefix/share/bash-completion/completions/$t"
    "$prefix/bin/$t" $completions zsh > "$prefix/share/zsh/site-functions/_$t"
    "$prefix/bin/$t" $completions fish > "$prefix/share/fish/vendor_completions.d/$t.fish"
done
echo "installed ${tools[*]} into $prefix (man pages: $prefix/share/man/man1)"
case ":$PATH:" in *":$prefix/bin:"*) ;; *) echo "note: $prefix/bin is not on PATH" ;; esac
