#!/usr/bin/env bash
# linux-base.sh: a small Linux guest from Debian's packages only, for the
# QEMU backend (issue 8).
#
#   scripts/linux-base.sh -o VMDIR [--memory SIZE] [--disk-size SIZE]
#                         [--vcpus N] [--busybox] [--artifacts DIR]
#       A new suspended base VM directory (`kimberlize base --qemu ... --net
#       user`; VMDIR must not exist). Default: a Debian bookworm root
#       (debootstrap --variant=minbase plus qemu-guest-agent, ca-certificates,
#       iproute2, procps) as a sparse raw ext4 disk of --disk-size (default 4G), booted
#       with Debian's cloud kernel and the initramfs below, which mounts
#       root=/dev/vda and switch_roots into it. In the guest: busybox init
#       (mounts, hostname, lo, DHCP on eth0, qemu-ga kept running), apt
#       pointing at the mirror with DNS on QEMU's 10.0.2.3, no recommends,
#       policy-rc.d so package scripts start no services. `apt-get update &&
#       apt-get install -y PKG` works in `kimberlize build --net user`.
#       With --busybox: no disk root, the initramfs is the whole system
#       (boots in seconds; for tests), plus an empty sparse disk of
#       --disk-size if given.
#         --memory SIZE      guest RAM (default 256M; QEMU's 16M-3G)
#         --vcpus N          vCPUs (default 1)
#         --init own|systemd the Debian root's init (default own: busybox
#                            init; systemd needs --include systemd,udev)
#         --include PKG,...  more Debian packages in the root
#         --accel A          auto|kvm|tcg (default auto)
#         --no-init-on-free  boot the Debian root without init_on_free=1
#                            (by default its kernel zeroes pages as they are
#                            freed, so freed memory diffs as zero: see
#                            docs/QEMU.md "Freed blocks and pages")
#         --timeout S        seconds to wait for the agent (default 60
#                            busybox, 180 Debian)
#       The Debian root is cached under the artifacts dir (default
#       ${XDG_CACHE_HOME:-~/.cache}/kimberley/linux): debootstrap runs once
#       per (suite, packages, mirror, debootstrap version), the disk image
#       once per (that, the root customisation, disk size).
#       Environment: KIMBERLIZE (the binary; else target/release or
#       target/debug beside this script, else PATH), KIMBERLEY_DEBIAN_MIRROR
#       (default: the host's apt mirror, else http://deb.debian.org/debian),
#       http_proxy (debootstrap and apt honour it).
#   scripts/linux-base.sh --artifacts DIR
#       Only the kernel and the initramfs:
#       DIR/vmlinuz         the kernel of linux-image-cloud-amd64
#       DIR/initrd.cpio.gz  a busybox initramfs holding the whole root:
#                           busybox-static, qemu-ga and its libraries, the
#                           virtio-pci/blk/console/net modules, an /init that
#                           loads them, brings up lo (and eth0 by DHCP), and
#                           keeps qemu-ga running on the virtio-serial port
#                           org.qemu.guest_agent.0 (or, with root= on the
#                           kernel command line, mounts it and runs init=)
#       Cached: nothing is rebuilt while the kernel package's version,
#       busybox, qemu-ga and this script are unchanged.
#
# Example: scripts/linux-base.sh -o linux-base --memory 1G
#
# Needs (apt): qemu-system-x86, busybox-static, qemu-guest-agent, cpio,
# debootstrap and e2fsprogs (Debian root, as root); the kernel is downloaded
# with `apt-get download` (not installed) and unpacked with dpkg-deb.
# Exit 2 on bad usage, 6 if VMDIR exists, 1 on other errors (kimberlize's
# own exit code when it fails).
set -euo pipefail
SELF=$(readlink -f "${BASH_SOURCE[0]}")

usage() {
    sed -n '2,/^set -euo/p' "$SELF" | sed '$d; s/^# \{0,1\}//'
    exit "$1"
}

artifacts=
out=
memory=256M
busybox=0
disk_size=
vcpus=1
init=own
include=
accel=auto
timeout=
init_on_free=1
need() { [[ $# -ge 2 && -n $2 ]] || { echo "linux-base.sh: $1 needs a value" >&2; exit 2; }; }
while (($#)); do
    case $1 in
    --artifacts) need "$@"; artifacts=$2; shift 2 ;;
    -o) need "$@"; out=$2; shift 2 ;;
    --memory) need "$@"; memory=$2; shift 2 ;;
    --disk-size) need "$@"; disk_size=$2; shift 2 ;;
    --vcpus) need "$@"; vcpus=$2; shift 2 ;;
    --init) need "$@"; init=$2; shift 2 ;;
    --include) need "$@"; include=$2; shift 2 ;;
    --accel) need "$@"; accel=$2; shift 2 ;;
    --timeout) need "$@"; timeout=$2; shift 2 ;;
    --busybox) busybox=1; shift ;;
    --no-init-on-free) init_on_free=0; shift ;;
    -h|--help) usage 0 ;;
    *) echo "linux-base.sh: unknown argument $1 (--help)" >&2; exit 2 ;;
    esac
done
if [[ -z $artifacts && -z $out ]]; then echo "linux-base.sh: -o VMDIR or --artifacts DIR needed (--help)" >&2; exit 2; fi
case $init in own|systemd) ;; *) echo "linux-base.sh: --init is own or systemd" >&2; exit 2 ;; esac
[[ $vcpus =~ ^[1-9][0-9]*$ ]] || { echo "linux-base.sh: --vcpus needs a positive number" >&2; exit 2; }
[[ -z $disk_size || $disk_size =~ ^[1-9][0-9]*[KMGT]?$ ]] || { echo "linux-base.sh: --disk-size is a size like 4G" >&2; exit 2; }
[[ -z $timeout || $timeout =~ ^[1-9][0-9]*$ ]] || { echo "linux-base.sh: --timeout needs seconds" >&2; exit 2; }
if [[ -n $out && -z $artifacts ]]; then
    artifacts=${XDG_CACHE_HOME:-${HOME:-/root}/.cache}/kimberley/linux
fi
# Absolute paths: QEMU does not run in our working directory.
[[ -z $artifacts ]] || artifacts=$(realpath -m -- "$artifacts")
[[ -z $out ]] || out=$(realpath -m -- "$out")

die() { echo "linux-base.sh: $*" >&2; exit 1; }

# --- step 1: kernel and initramfs -----------------------------------------
build_artifacts() {
    local dir=$1
    command -v busybox >/dev/null || die "busybox not found (apt-get install busybox-static)"
    [[ -x /usr/sbin/qemu-ga ]] || die "/usr/sbin/qemu-ga not found (apt-get install qemu-guest-agent)"
    command -v cpio >/dev/null || die "cpio not found (apt-get install cpio)"
    local bb
    bb=$(command -v busybox)
    # grep -q would stop reading at the match, and busybox, killed by
    # SIGPIPE, would fail the pipeline under pipefail: read the whole list.
    [[ $'\n'$(busybox --list)$'\n' == *$'\n'modprobe$'\n'* ]] ||
        die "$bb is not busybox-static (no modprobe applet)"

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
# root=DEV on the command line: mount it and hand over to the init named by
# init= (default /sbin/init) inside it.
root=
rinit=/sbin/init
rflags=ro
for a in $(cat /proc/cmdline); do
    case $a in
    root=*) root=${a#root=} ;;
    init=*) rinit=${a#init=} ;;
    rw) rflags=rw ;;
    esac
done
if [ -n "$root" ]; then
    i=0
    while [ ! -b "$root" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    mkdir -p /newroot
    if mount -t ext4 -o "$rflags" "$root" /newroot && { [ -x "/newroot$rinit" ] || [ -L "/newroot$rinit" ]; }; then
        umount /dev/shm /run /sys 2>/dev/null
        mount --move /dev /newroot/dev 2>/dev/null || umount /dev
        umount /proc
        exec switch_root /newroot "$rinit"
    fi
    echo "kimberley-linux: cannot mount $root or no $rinit in it; staying in the initramfs"
fi
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

# --- step 2 (Debian): the root disk image ---------------------------------
# The host's Debian mirror (the first deb.debian.org-like URI apt uses for
# the main archive), else deb.debian.org.
host_mirror() {
    local m=
    if [[ -r /etc/apt/sources.list.d/debian.sources ]]; then
        m=$(awk '/^URIs:/ {for (i = 2; i <= NF; i++) if ($i !~ /security/) {print $i; exit}}' \
            /etc/apt/sources.list.d/debian.sources)
    fi
    if [[ -z $m && -r /etc/apt/sources.list ]]; then
        m=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /^https?:/) {print $i; exit}}' \
            /etc/apt/sources.list)
    fi
    echo "${m:-http://deb.debian.org/debian}"
}

# What the guest needs beyond minbase: the agent, TLS roots, `ip`, `ps` and
# `pgrep`; nothing else (the init and DHCP are busybox, copied in).
DEBIAN_PACKAGES=qemu-guest-agent,ca-certificates,iproute2,procps

# The Debian-side files of the base: the init, its rc script, apt and dpkg
# settings for a guest on QEMU's user network. Called with the root and the
# mirror; part of the image's cache key (declare -f).
customise_root() {
    local root=$1 mirror=$2 suite=$3
    echo kimberley-linux >"$root/etc/hostname"
    printf '127.0.0.1\tlocalhost\n127.0.1.1\tkimberley-linux\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
    printf '/dev/vda\t/\text4\trw,errors=remount-ro\t0\t1\n' >"$root/etc/fstab"
    # QEMU's user network: DNS at 10.0.2.3 (udhcpc rewrites it on boot).
    rm -f "$root/etc/resolv.conf"
    echo 'nameserver 10.0.2.3' >"$root/etc/resolv.conf"
    printf 'deb %s %s main\ndeb %s %s-updates main\n' "$mirror" "$suite" "$mirror" "$suite" >"$root/etc/apt/sources.list"
    # Small and quick under emulation: no recommends, no translations, no
    # fsync per file in dpkg (a crash mid-install loses the install anyway).
    cat >"$root/etc/apt/apt.conf.d/90kimberley" <<'EOF'
APT::Install-Recommends "false";
Acquire::Languages "none";
Acquire::Retries "3";
EOF
    echo force-unsafe-io >"$root/etc/dpkg/dpkg.cfg.d/90kimberley"
    # Without systemd running, nothing may start services from maintainer
    # scripts (invoke-rc.d asks policy-rc.d): the user's scripts start what
    # they want. With systemd as init, invoke-rc.d uses systemctl instead.
    printf '#!/bin/sh\n# kimberley: no service starts from package scripts without systemd.\n[ -d /run/systemd/system ] && exit 0\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
    chmod 755 "$root/usr/sbin/policy-rc.d"

    # busybox as init (it reaps orphans and respawns qemu-ga) and for udhcpc.
    mkdir -p "$root/usr/lib/kimberley"
    cp "$(command -v busybox)" "$root/usr/lib/kimberley/busybox"
    ln -sf busybox "$root/usr/lib/kimberley/init"
    cat >"$root/etc/inittab" <<'EOF'
# kimberley: busybox init (scripts/linux-base.sh).
::sysinit:/usr/lib/kimberley/rc.sysinit
::respawn:/usr/lib/kimberley/qemu-ga.run
::shutdown:/bin/sync
EOF
    cat >"$root/usr/lib/kimberley/rc.sysinit" <<'EOF'
#!/bin/sh
# kimberley: mounts, hostname, loopback, DHCP on eth0.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
bb=/usr/lib/kimberley/busybox
mountpoint -q /proc || mount -t proc proc /proc
mountpoint -q /sys || mount -t sysfs sysfs /sys
mountpoint -q /dev || mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs /dev/shm
mount -t tmpfs -o mode=0755,nosuid,nodev tmpfs /run
mkdir -p /run/lock
mount -o remount,rw / 2>/dev/null
hostname -F /etc/hostname
ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up
    $bb udhcpc -b -q -t 5 -i eth0 -s /usr/lib/kimberley/udhcpc.script >/dev/null 2>&1
fi
echo "kimberley-linux: debian up $(cat /proc/uptime)"
EOF
    cat >"$root/usr/lib/kimberley/qemu-ga.run" <<'EOF'
#!/bin/sh
# kimberley: qemu-ga on the virtio-serial port org.qemu.guest_agent.0
# (busybox init respawns this when it exits). Scripts it runs inherit this
# environment: a headless guest, so debconf asks nothing.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
for n in /sys/class/virtio-ports/*/name; do
    [ "$(cat "$n" 2>/dev/null)" = org.qemu.guest_agent.0 ] || continue
    d=${n%/name}
    exec /usr/sbin/qemu-ga -m virtio-serial -p "/dev/${d##*/}" -t /run </dev/null >/dev/null 2>&1
done
sleep 0.2
EOF
    cat >"$root/usr/lib/kimberley/udhcpc.script" <<'EOF'
#!/bin/sh
# udhcpc's hook: configure the interface and the resolver.
case $1 in
bound|renew)
    ip addr flush dev "$interface"
    ip addr add "$ip/${mask:-24}" dev "$interface"
    for r in $router; do ip route add default via "$r" dev "$interface"; break; done
    if [ -n "$dns" ]; then
        : >/etc/resolv.conf.new
        for d in $dns; do echo "nameserver $d" >>/etc/resolv.conf.new; done
        mv /etc/resolv.conf.new /etc/resolv.conf
    fi
    ;;
deconfig) ip addr flush dev "$interface" ;;
esac
EOF
    chmod 755 "$root/usr/lib/kimberley/rc.sysinit" "$root/usr/lib/kimberley/qemu-ga.run" \
        "$root/usr/lib/kimberley/udhcpc.script"
    # For init=/lib/systemd/systemd (when systemd is in --include): its
    # network on eth0 by DHCP, and the agent started on boot (Debian's unit
    # is started by udev when the port appears).
    if [[ -d $root/lib/systemd/system ]]; then
        mkdir -p "$root/etc/systemd/network"
        printf '[Match]\nName=eth0\n\n[Network]\nDHCP=ipv4\n' >"$root/etc/systemd/network/eth0.network"
        if [[ -e $root/lib/systemd/system/systemd-networkd.service ]]; then
            ln -sf /lib/systemd/system/systemd-networkd.service \
                "$root/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
        fi
    fi
    # Empty machine-id: regenerated per boot; apt caches left out.
    : >"$root/etc/machine-id"
    rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/* "$root"/var/log/*.log
}

# The Debian root image: debootstrap once per (suite, packages, mirror,
# debootstrap version) into DIR/debian/root-KEY (kept: the slow part), then
# customise a copy and mkfs.ext4 -d it into DIR/debian/disk-KEY-KEY2.raw
# (KEY2 adds customise_root's text, busybox and the disk size; one image per
# root is kept).
# Prints the image's path.
debian_image() {
    local dir=$1 size=$2 suite=bookworm mirror
    mirror=${KIMBERLEY_DEBIAN_MIRROR:-$(host_mirror)}
    command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap)"
    command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (apt-get install e2fsprogs)"
    command -v busybox >/dev/null || die "busybox not found (apt-get install busybox-static)"
    [[ $(id -u) == 0 ]] || die "debootstrap needs root (run as root, or use --busybox)"
    local pkgs=$DEBIAN_PACKAGES${include:+,$include}
    local dbv
    dbv=$(dpkg-query -W -f='${Version}' debootstrap 2>/dev/null || echo unknown)
    local key1 key2
    key1=$(printf '%s\n' "$suite" "$pkgs" "$mirror" "$dbv" minbase | sha256sum | cut -c1-16)
    mkdir -p "$dir/debian"
    local base=$dir/debian/root-$key1
    if [[ ! -f $base/.complete ]]; then
        rm -rf "$base" "$base.tmp"
        echo "linux-base.sh: debootstrap $suite ($pkgs) from $mirror into $base (minutes)" >&2
        local t0=$SECONDS
        debootstrap --variant=minbase --include="$pkgs" "$suite" "$base.tmp" "$mirror" >"$dir/debian/debootstrap-$key1.log" 2>&1 ||
            die "debootstrap failed; see $dir/debian/debootstrap-$key1.log"
        touch "$base.tmp/.complete"
        mv "$base.tmp" "$base"
        echo "linux-base.sh: debootstrap took $((SECONDS - t0)) s" >&2
    fi
    key2=$(
        {
            echo "$key1 $size $mirror"
            declare -f customise_root
            sha256sum "$(command -v busybox)" | cut -c1-64
        } | sha256sum | cut -c1-16
    )
    local img=$dir/debian/disk-$key1-$key2.raw
    if [[ ! -f $img ]]; then
        # Older images of the same root (another customisation or size).
        rm -f "$dir/debian/disk-$key1-"*.raw "$dir/debian/disk-"????????????????.raw
        echo "linux-base.sh: making the root image $img ($size)" >&2
        local work
        work=$(mktemp -d "$dir/debian/.work.XXXXXX")
        # shellcheck disable=SC2064
        trap "rm -rf '$work'" EXIT
        cp -a "$base" "$work/root"
        rm -f "$work/root/.complete"
        customise_root "$work/root" "$mirror" "$suite"
        truncate -s "$size" "$work/disk.raw"
        mkfs.ext4 -q -F -L kimberley-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$work/root" "$work/disk.raw" ||
            die "mkfs.ext4 -d failed (e2fsprogs 1.43+ needed; is --disk-size big enough?)"
        mv "$work/disk.raw" "$img"
        rm -rf "$work"
        trap - EXIT
    fi
    echo "$img"
}

find_kimberlize() {
    local here
    here=$(dirname "$SELF")/..
    if [[ -n ${KIMBERLIZE:-} ]]; then
        [[ -x $KIMBERLIZE ]] || die "KIMBERLIZE=$KIMBERLIZE is not executable"
        echo "$KIMBERLIZE"
    elif [[ -x $here/target/release/kimberlize ]]; then
        readlink -f "$here/target/release/kimberlize"
    elif [[ -x $here/target/debug/kimberlize ]]; then
        readlink -f "$here/target/debug/kimberlize"
    elif command -v kimberlize >/dev/null; then
        command -v kimberlize
    else
        die "kimberlize not found: set KIMBERLIZE, build it (cargo build --release), or put it on PATH"
    fi
}

if [[ -n $out ]]; then
    [[ ! -e $out ]] || { echo "linux-base.sh: $out exists (the VM directory must be new)" >&2; exit 6; }
    command -v qemu-system-x86_64 >/dev/null || die "qemu-system-x86_64 not found (apt-get install qemu-system-x86)"
    if ((!busybox)); then
        command -v debootstrap >/dev/null || die "debootstrap not found (apt-get install debootstrap; or --busybox)"
        command -v mkfs.ext4 >/dev/null || die "mkfs.ext4 not found (apt-get install e2fsprogs)"
        [[ $(id -u) == 0 ]] || die "debootstrap needs root (run as root, or use --busybox)"
    fi
    kimb=$(find_kimberlize)
    echo "linux-base.sh: using $kimb" >&2
fi

if [[ -n $artifacts ]]; then
    build_artifacts "$artifacts"
    if [[ -z $out ]]; then
        echo "$artifacts/vmlinuz"
        echo "$artifacts/initrd.cpio.gz"
        exit 0
    fi
fi

# --- step 3: the VM directory ---------------------------------------------
args=(base --qemu -o "$out" --kernel "$artifacts/vmlinuz" --initrd "$artifacts/initrd.cpio.gz"
    --memory "$memory" --vcpus "$vcpus" --net user --accel "$accel")
tmpdisk=
if ((busybox)); then
    if [[ -n $disk_size ]]; then
        tmpdisk=$(mktemp "${TMPDIR:-/tmp}/linux-base-disk.XXXXXX")
        trap 'rm -f "$tmpdisk"' EXIT
        truncate -s "$disk_size" "$tmpdisk"
        args+=(--disk "$tmpdisk")
    fi
    args+=(--timeout "${timeout:-60}")
else
    img=$(debian_image "$artifacts" "${disk_size:-4G}")
    case $init in
    own) rinit=/usr/lib/kimberley/init ;;
    systemd) rinit=/lib/systemd/systemd ;;
    esac
    append="root=/dev/vda rw init=$rinit quiet panic=-1"
    ((init_on_free)) && append+=" init_on_free=1"
    args+=(--disk "$img" --append "$append" --timeout "${timeout:-180}")
fi
echo "linux-base.sh: $kimb ${args[*]}" >&2
t0=$(date +%s.%N)
rc=0
"$kimb" "${args[@]}" || rc=$?
echo "linux-base.sh: $out in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s (exit $rc)" >&2
exit $rc
