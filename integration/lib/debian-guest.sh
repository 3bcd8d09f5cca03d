# shellcheck shell=bash
# Debian 12 (bookworm) guests for the QEMU tests that boot a full userland
# (integration/dlm-cluster.sh, integration/systemd-guest.sh). Sourced, not run.
#
# Both tests share one cache: a Debian 6.1 kernel (apt-get download, unpacked) and one
# debootstrap'ed rootfs with the packages of every test, so a CI run debootstraps once.
#
#   GUEST_CACHE   cache dir (the caller sets it; default below)
#   KDIR          an unpacked, depmod'ed linux-image-6.1.0-*-amd64 tree to use instead
#                 of downloading one into the cache
#   DLM_KERNEL_PKG  the kernel package to download (default: the newest apt knows)
#
# guest_kernel          sets KDIR and KVER (downloads the kernel into the cache once)
# guest_rootfs          sets ROOTFS: $GUEST_CACHE/rootfs, debootstrap'ed on first use and
#                       whenever GUEST_PKGS changes
# guest_initrd OUT INIT MODULES
#                       a busybox initramfs that loads MODULES (names for modprobe, with
#                       their dependencies) and switch_roots into the ext4 root on
#                       /dev/vda, executing INIT there
# guest_ext4 OUT DIR LABEL [SIZE]
#                       an ext4 image of DIR (SIZE for mke2fs; default: DIR's size + 25%)

GUEST_CACHE=${GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-md/dlm-cluster}
# dlm-cluster: corosync, dlm_controld, libdlm, mdadm (kernel md-cluster), tools.
# systemd-guest: systemd as PID 1 (systemd-sysv, udev, dbus), man pages, curl.
GUEST_PKGS=corosync,dlm-controld,libdlm3,mdadm,kmod,iproute2,procps,psmisc,systemd,systemd-sysv,udev,dbus,man-db,curl

# The cache is filled under a lock: two tests started together do not debootstrap
# into the same directory.
guest_cache_lock() {
    mkdir -p "$GUEST_CACHE"
    exec 8>"$GUEST_CACHE/.lock"
    flock 8
}
guest_cache_unlock() { exec 8>&-; }

guest_kernel() {
    if [ -z "${KDIR:-}" ]; then
        local pkg
        pkg=${DLM_KERNEL_PKG:-$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' |
            awk '{print $1}' | sort -V | tail -1)}
        [ -n "$pkg" ] || { echo "no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)" >&2; return 1; }
        KDIR=$GUEST_CACHE/kernel/$pkg
        guest_cache_lock
        if [ ! -e "$KDIR/.complete" ]; then
            rm -rf "$KDIR" "$GUEST_CACHE/kernel/dl"
            mkdir -p "$KDIR" "$GUEST_CACHE/kernel/dl"
            (cd "$GUEST_CACHE/kernel/dl" && apt-get download "$pkg") || { guest_cache_unlock; return 1; }
            dpkg-deb -x "$GUEST_CACHE/kernel/dl/${pkg}"_*.deb "$KDIR"
            depmod -b "$KDIR" "$(ls "$KDIR/lib/modules" | head -1)"
            rm -rf "$GUEST_CACHE/kernel/dl"
            touch "$KDIR/.complete"
        fi
        guest_cache_unlock
    fi
    KVER=$(ls "$KDIR/lib/modules" | head -1)
}

guest_rootfs() {
    ROOTFS=$GUEST_CACHE/rootfs
    guest_cache_lock
    if [ "$(cat "$GUEST_CACHE/rootfs.pkgs" 2>/dev/null)" != "$GUEST_PKGS" ]; then
        echo "debootstrap bookworm ($GUEST_PKGS) into $ROOTFS"
        rm -rf "$ROOTFS" "$ROOTFS.tmp" "$GUEST_CACHE/rootfs.pkgs"
        if ! debootstrap --variant=minbase --include="$GUEST_PKGS" bookworm "$ROOTFS.tmp" \
            http://deb.debian.org/debian >"$GUEST_CACHE/debootstrap.log" 2>&1; then
            tail -20 "$GUEST_CACHE/debootstrap.log"
            guest_cache_unlock
            return 1
        fi
        local r=$ROOTFS.tmp
        # man pages stay: the systemd guest reads the ones our package installs with man-db
        rm -rf "$r"/usr/share/{doc,locale,info} "$r"/var/cache/apt/*.bin \
            "$r"/var/cache/apt/archives/*.deb "$r"/var/lib/apt/lists/*
        mv "$ROOTFS.tmp" "$ROOTFS"
        echo "$GUEST_PKGS" >"$GUEST_CACHE/rootfs.pkgs"
    fi
    guest_cache_unlock
}

guest_initrd() {
    local out=$1 init=$2 modules=$3 i busybox m
    i=$(mktemp -d "${TMPDIR:-/tmp}/initrd.XXXXXX")
    mkdir -p "$i"/{bin,proc,sys,dev,newroot,lib/modules}
    busybox=$(command -v busybox) && ! ldd "$busybox" >/dev/null 2>&1 ||
        { echo "needs a static busybox (apt-get install busybox-static)" >&2; rm -rf "$i"; return 1; }
    cp "$busybox" "$i/bin/busybox"
    for a in sh mount mkdir insmod switch_root cat echo sleep poweroff; do ln -s busybox "$i/bin/$a"; done
    for m in $modules; do
        modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
    done | awk '!seen[$0]++' | while read -r ko; do
        cp "$ko" "$i/lib/modules/"
        basename "$ko" >>"$i/modules.order"
    done
    cat >"$i/init" <<EOF
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in \$(cat /modules.order); do insmod /lib/modules/\$m || echo "insmod \$m failed"; done
if mount -t ext4 /dev/vda /newroot; then
    for d in dev proc sys; do mount --move /\$d /newroot/\$d; done
    exec switch_root /newroot $init
fi
echo "guest boot failed: no root on /dev/vda"; sleep 5; poweroff -f
EOF
    chmod 755 "$i/init"
    (cd "$i" && find . | cpio -o -H newc --quiet | gzip -1) >"$out"
    rm -rf "$i"
}

guest_ext4() {
    local out=$1 dir=$2 label=$3 size=${4:-}
    [ -n "$size" ] || size=$(($(du -sm "$dir" | cut -f1) * 5 / 4 + 16))M
    rm -f "$out"
    mke2fs -q -t ext4 -L "$label" -d "$dir" "$out" "$size" >/dev/null
}
