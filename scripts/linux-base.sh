#!/usr/bin/env bash
# linux-base.sh: a small Linux guest from Debian's packages only, for the
# QEMU backend (issue 8).
#
#   scripts/linux-base.sh --artifacts DIR
#       DIR/vmlinuz         the kernel of linux-image-cloud-amd64
#       DIR/initrd.cpio.gz  a busybox initramfs holding the whole root:
#                           busybox-static, qemu-ga and its libraries, the
#                           virtio-pci/blk/console/net modules, an /init that
#                           loads them, brings up lo (and eth0 by DHCP), and
#                           keeps qemu-ga running on the virtio-serial port
#                           org.qemu.guest_agent.0
#       Cached: nothing is rebuilt while the kernel package's version,
#       busybox, qemu-ga and this script are unchanged.
#   scripts/linux-base.sh -o VMDIR [--memory SIZE] [--busybox]
#       the suspended base VM directory (needs `kimberlize base --qemu`).
#
# Needs (apt): busybox-static, qemu-guest-agent, cpio; the kernel is
# downloaded with `apt-get download` (not installed) and unpacked with
# dpkg-deb. Exit 2 on bad usage.
set -euo pipefail
SELF=$(readlink -f "${BASH_SOURCE[0]}")

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//' >&2
    exit 2
}

artifacts=
out=
memory=256M
busybox=0
while (($#)); do
    case $1 in
    --artifacts) artifacts=${2:?--artifacts needs a directory}; shift 2 ;;
    -o) out=${2:?-o needs a directory}; shift 2 ;;
    --memory) memory=${2:?--memory needs a size}; shift 2 ;;
    --busybox) busybox=1; shift ;;
    -h|--help) usage ;;
    *) echo "linux-base.sh: unknown argument $1" >&2; usage ;;
    esac
done
if [[ -z $artifacts && -z $out ]]; then usage; fi

die() { echo "linux-base.sh: $*" >&2; exit 1; }

# --- step 1: kernel and initramfs -----------------------------------------
build_artifacts() {
    local dir=$1
    command -v busybox >/dev/null || die "busybox not found (apt-get install busybox-static)"
    [[ -x /usr/sbin/qemu-ga ]] || die "/usr/sbin/qemu-ga not found (apt-get install qemu-guest-agent)"
    command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"
    local bb
    bb=$(command -v busybox)
    busybox --list | grep -qx modprobe || die "$bb is not busybox-static (no modprobe applet)"

    # Fast path: nothing changed since the last build, apt's package lists
    # included (asking apt-cache takes seconds).
    local files quick
    files=$(sha256sum "$bb" /usr/sbin/qemu-ga "$SELF" | cut -c1-16 | tr '\n' ' ')
    quick="$files $(ls -l --time-style=+%s /var/lib/apt/lists/ 2>/dev/null | sha256sum | cut -c1-16)"
    if [[ -f $dir/vmlinuz && -f $dir/initrd.cpio.gz && -f $dir/stamp &&
        "$(cat "$dir/quick-stamp" 2>/dev/null)" == "$quick" ]]; then
        return 0
    fi

    # The versioned kernel package the meta package depends on (local apt
    # cache: no network when the artifacts are current). Another apt run
    # may be rebuilding the cache: try again, then keep what was built.
    local kpkg= kver_pkg= try
    for try in 1 2 3; do
        kpkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ {print $2; exit}') || true
        [[ -n $kpkg ]] && kver_pkg=$(apt-cache policy "$kpkg" 2>/dev/null | awk '/Candidate:/ {print $2}')
        [[ -n $kver_pkg ]] && break
        sleep 1
    done
    if [[ -z $kver_pkg && -f $dir/stamp ]]; then
        read -r kpkg kver_pkg _ <"$dir/stamp"
        echo "linux-base.sh: apt-cache did not answer; keeping $kpkg $kver_pkg" >&2
    fi
    [[ -n $kpkg && -n $kver_pkg ]] || die "linux-image-cloud-amd64 is unknown to apt (apt-get update?)"

    local stamp="$kpkg $kver_pkg $files"
    if [[ -f $dir/vmlinuz && -f $dir/initrd.cpio.gz && "$(cat "$dir/stamp" 2>/dev/null)" == "$stamp" ]]; then
        echo "$quick" >"$dir/quick-stamp"
        return 0
    fi
    echo "linux-base.sh: building $dir ($kpkg $kver_pkg)" >&2
    mkdir -p "$dir"
    local work
    work=$(mktemp -d "$dir/.work.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" EXIT

    # The kernel package, downloaded into a cache beside the artifacts.
    mkdir -p "$dir/debs"
    local deb
    deb=$(ls "$dir/debs/${kpkg}_"*.deb 2>/dev/null | head -1 || true)
    if [[ -z $deb || $deb != *"_${kver_pkg//:/%3a}_"* ]]; then
        rm -f "$dir/debs/"*.deb
        (cd "$dir/debs" && apt-get download -q "$kpkg" >/dev/null 2>&1) ||
            (cd "$dir/debs" && apt-get download "$kpkg" >&2) || die "apt-get download $kpkg failed"
        deb=$(ls "$dir/debs/${kpkg}_"*.deb | head -1)
    fi
    dpkg-deb -x "$deb" "$work/pkg"
    local vmlinuz
    vmlinuz=$(ls "$work/pkg/boot/vmlinuz-"* | head -1)
    local kver=${vmlinuz##*/vmlinuz-}
    local moddir=$work/pkg/lib/modules/$kver
    # The package leaves modules.dep to depmod at install time.
    [[ -f $moddir/modules.dep ]] || busybox depmod -b "$work/pkg" "$kver" ||
        die "depmod on $deb failed"

    # The root.
    local root=$work/root
    mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,proc,sys,dev,run,tmp,etc,root,var,lib64,"lib/modules/$kver"}
    ln -s ../run "$root/var/run"
    cp "$bb" "$root/bin/busybox"
    local a
    for a in $(busybox --list); do
        [[ $a == busybox ]] || ln -sf busybox "$root/bin/$a"
    done
    cp /usr/sbin/qemu-ga "$root/usr/sbin/qemu-ga"
    # Its libraries, at the paths ldd resolved (the loader at its own).
    local lib
    for lib in $(ldd /usr/sbin/qemu-ga | grep -o '/[^ ]*'); do
        mkdir -p "$root$(dirname "$lib")"
        cp -L "$lib" "$root$lib"
    done

    # Modules: virtio-pci, -blk, -console, -net and what they depend on
    # (modules.dep), in load order (dependencies first), with the builtin
    # ones skipped.
    local order=() seen=" "
    add_module() {
        local name=$1 line path deps d
        line=$(grep -E "/${name}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -1 || true)
        if [[ -z $line ]]; then
            grep -qE "/${name}\.ko" "$moddir/modules.builtin" 2>/dev/null ||
                die "module $name is neither in modules.dep nor builtin"
            return 0
        fi
        path=${line%%:*}
        deps=${line#*:}
        for d in $deps; do
            d=${d##*/}
            add_module "${d%%.ko*}"
        done
        if [[ $seen != *" $path "* ]]; then
            seen+="$path "
            order+=("$path")
        fi
    }
    local m
    for m in virtio_pci virtio_blk virtio_console virtio_net; do add_module "$m"; done
    : >"$root/lib/modules/$kver/modules.dep"
    for m in "${order[@]}"; do
        mkdir -p "$root/lib/modules/$kver/$(dirname "$m")"
        cp "$moddir/$m" "$root/lib/modules/$kver/$m"
        grep -E "^${m}:" "$moddir/modules.dep" >>"$root/lib/modules/$kver/modules.dep"
        echo "/lib/modules/$kver/$m" >>"$root/lib/modules/load-order"
    done
    touch "$root/lib/modules/load-order"

    printf 'root:x:0:0:root:/root:/bin/sh\n' >"$root/etc/passwd"
    printf 'root:x:0:\n' >"$root/etc/group"
    cat >"$root/etc/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc's hook: configure the interface and the resolver.
case $1 in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    : >/etc/resolv.conf
    for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf; done
    ;;
deconfig) ip addr flush dev "$interface" ;;
esac
EOF
    chmod 755 "$root/etc/udhcpc.script"

    cat >"$root/init" <<'EOF'
#!/bin/sh
# The whole system: mounts, virtio modules, network, and qemu-ga kept running
# on the virtio-serial port org.qemu.guest_agent.0.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
while read -r m; do insmod "$m" 2>/dev/null; done </lib/modules/load-order
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    udhcpc -b -q -t 5 -i eth0 -s /etc/udhcpc.script >/dev/null 2>&1
fi
echo "kimberley-linux: up $(cat /proc/uptime)"
port() {
    for n in /sys/class/virtio-ports/*/name; do
        [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
        d=${n%/name}
        echo "/dev/${d##*/}"
        return 0
    done
    return 1
}
while :; do
    p=$(port) || { sleep 0.2; continue; }
    qemu-ga -m virtio-serial -p "$p" -t /run </dev/null >/dev/null 2>&1
    sleep 0.2
done
EOF
    chmod 755 "$root/init"

    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0) | gzip -6 -n >"$work/initrd.cpio.gz"
    cp "$vmlinuz" "$work/vmlinuz"
    mv -f "$work/vmlinuz" "$dir/vmlinuz"
    mv -f "$work/initrd.cpio.gz" "$dir/initrd.cpio.gz"
    echo "$kver" >"$dir/kernel-release"
    echo "$stamp" >"$dir/stamp"
    echo "$quick" >"$dir/quick-stamp"
    rm -rf "$work"
    trap - EXIT
}

if [[ -n $artifacts ]]; then
    build_artifacts "$artifacts"
    echo "$artifacts/vmlinuz"
    echo "$artifacts/initrd.cpio.gz"
fi

# --- step 2: the VM directory ---------------------------------------------
if [[ -n $out ]]; then
    : "$memory" "$busybox"
    echo "linux-base.sh: -o needs \`kimberlize base --qemu\` (issue 8, in progress)" >&2
    exit 2
fi
