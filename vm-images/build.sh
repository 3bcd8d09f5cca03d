#!/usr/bin/env bash
# Builds the test guest from Debian packages: a kernel and a busybox initramfs.
#
# usage: vm-images/build.sh OUTDIR
#
# OUTDIR/vmlinuz      Debian's linux-image-6.1.0-N-amd64 kernel (the newest apt knows of;
#                     VUMD_GUEST_KERNEL=linux-image-6.1.0-N-amd64 pins one)
# OUTDIR/initrd.img   busybox-static initramfs (uncompressed newc cpio) with
#                     - /init (vm-images/init): loads the boot modules, runs /test.sh, powers off
#                     - boot modules virtio_pci, virtio_blk, ext4 and their dependencies, loaded by /init
#                     - raid1, md-cluster, dlm and their dependencies (busybox modprobe, modules.dep)
#                     - fio, mke2fs/mkfs.ext4, e2fsck and util-linux blkdiscard with their shared
#                       libraries (taken from this host's Debian packages, found with ldd)
#                     Test suites append their own /test.sh as a second cpio archive
#                     (the kernel unpacks concatenated archives in order).
# OUTDIR/manifest.txt the inputs: kernel package and version, host package versions, sha256 of
#                     every copied binary and library and of this script and /init
# OUTDIR/key          sha256 of manifest.txt; when it matches, the images are reused
# OUTDIR/debs/        downloaded kernel package (kept for rebuilds)
#
# Needs (Debian 12): apt, dpkg, kmod (depmod, modprobe), cpio, busybox-static, fio, e2fsprogs,
# util-linux. The kernel package is fetched with `apt-get download` (after one `apt-get update`
# if apt does not know any linux-image-6.1.0-N-amd64) and unpacked with `dpkg-deb -x`.
set -euo pipefail
OUT=${1:?usage: vm-images/build.sh OUTDIR}
HERE=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BOOT_MODULES="virtio_pci virtio_blk ext4"
EXTRA_MODULES="raid1 md-cluster dlm"
log() { echo "vm-images: $*" >&2; }
die() { log "$*"; exit 1; }
t0=$(date +%s.%N)

exec 9>"$OUT/.lock"
flock -w 600 9 || die "another build holds $OUT/.lock"

# --- host tools that go into the image
dpkg-query -W -f='${Status}\n' busybox-static 2>/dev/null | grep -q '^install ok installed' ||
    die "busybox-static is not installed (apt-get install busybox-static)"
declare -A TOOL_DEST=([fio]=usr/bin/fio [mke2fs]=usr/sbin/mke2fs [e2fsck]=usr/sbin/e2fsck
    [blkdiscard]=usr/sbin/blkdiscard)
declare -A TOOL_SRC=()
for t in "${!TOOL_DEST[@]}"; do
    p=$(command -v "$t" || true)
    [ -n "$p" ] || die "$t not found (apt-get install fio e2fsprogs util-linux)"
    TOOL_SRC[$t]=$(readlink -f "$p")
done
for c in depmod modprobe cpio dpkg-deb apt-get; do
    command -v "$c" >/dev/null || die "$c not found (apt-get install kmod cpio)"
done
LIBS=$(for t in "${!TOOL_SRC[@]}"; do ldd "${TOOL_SRC[$t]}"; done |
    awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)

# --- kernel package: the newest linux-image-6.1.0-N-amd64 apt knows of
newest_kernel() {
    apt-cache pkgnames linux-image-6.1.0- 2>/dev/null |
        grep -E '^linux-image-6\.1\.0-[0-9]+-amd64$' | sort -V | tail -1
}
KPKG=${VUMD_GUEST_KERNEL:-$(newest_kernel)}
if [ -z "$KPKG" ]; then
    log "apt knows no linux-image-6.1.0-N-amd64; running apt-get update"
    apt-get update -qq >&2
    KPKG=$(newest_kernel)
    [ -n "$KPKG" ] || die "no linux-image-6.1.0-N-amd64 package in the apt sources"
fi
KVERSION=$(apt-cache policy "$KPKG" | awk '/Candidate:/ { print $2 }')
if [ -z "$KVERSION" ] || [ "$KVERSION" = "(none)" ]; then die "$KPKG has no candidate version"; fi
KVER=${KPKG#linux-image-}

# --- cache key: everything that goes into the images
manifest() {
    echo "kernel $KPKG=$KVERSION"
    echo "boot-modules $BOOT_MODULES"
    echo "extra-modules $EXTRA_MODULES"
    dpkg-query -W -f='package ${Package}=${Version}\n' busybox-static fio e2fsprogs util-linux libc6 kmod
    (cd "$HERE" && sha256sum build.sh init)
    # shellcheck disable=SC2086
    sha256sum /bin/busybox "${TOOL_SRC[@]}" $LIBS
}
MANIFEST=$(manifest)
KEY=$(sha256sum <<<"$MANIFEST" | cut -d' ' -f1)
if [ -f "$OUT/key" ] && [ "$(cat "$OUT/key")" = "$KEY" ] && [ -s "$OUT/vmlinuz" ] && [ -s "$OUT/initrd.img" ]; then
    log "up to date: $OUT ($KPKG $KVERSION, key ${KEY:0:12})"
    exit 0
fi
log "building $OUT ($KPKG $KVERSION, key ${KEY:0:12})"

W=$(mktemp -d "$OUT/.build.XXXXXX")
trap 'rm -rf "$W"' EXIT

# --- kernel: download once, unpack, index the modules
mkdir -p "$OUT/debs"
DEB=
for f in "$OUT/debs/${KPKG}"_*_amd64.deb; do
    [ -f "$f" ] && [ "$(dpkg-deb -f "$f" Version)" = "$KVERSION" ] && DEB=$f
done
if [ -z "$DEB" ]; then
    rm -f "$OUT/debs/${KPKG}"_*_amd64.deb
    (cd "$W" && apt-get download "$KPKG=$KVERSION") > "$W/download.log" 2>&1 ||
        { cat "$W/download.log" >&2; die "apt-get download $KPKG=$KVERSION failed"; }
    mv "$W/${KPKG}"_*_amd64.deb "$OUT/debs/"
    DEB=$(ls "$OUT/debs/${KPKG}"_*_amd64.deb)
    log "downloaded $(basename "$DEB")"
fi
K=$W/kernel
dpkg-deb -x "$DEB" "$K"
[ -f "$K/boot/vmlinuz-$KVER" ] || die "$DEB has no boot/vmlinuz-$KVER"
depmod -b "$K" "$KVER"
mkdir -p "$W/no-modprobe-conf"

# --- initramfs tree
S=$W/root
mkdir -p "$S"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,mnt,run,root,lib/modules/"$KVER"}
cp /bin/busybox "$S/bin/busybox"
for a in $(/bin/busybox --list); do
    [ "$a" = busybox ] || ln -s busybox "$S/bin/$a"
done
install -m 755 "$HERE/init" "$S/init"

# modules: "insmod PATH [ARGS]" lines in load order, from the kernel's own modules.dep and
# modules.softdep (an empty config dir keeps this host's /etc/modprobe.d out)
MD=$K/lib/modules/$KVER
mod_lines() {
    modprobe -C "$W/no-modprobe-conf" -d "$K" -S "$KVER" --show-depends "$1" |
        awk -v md="$MD/" '$1 == "insmod" { sub(md, "", $2); $1 = ""; sub(/^ /, ""); print }'
}
: > "$S/etc/boot-modules"
for m in $BOOT_MODULES $EXTRA_MODULES; do
    mod_lines "$m" > "$W/mod.lines" || die "module $m not found in $KPKG"
    while read -r rel args; do
        install -D -m 644 "$MD/$rel" "$S/lib/modules/$KVER/$rel"
        case " $BOOT_MODULES " in
            *" $m "*) grep -q "^$rel\( \|$\)" "$S/etc/boot-modules" ||
                echo "$rel${args:+ $args}" >> "$S/etc/boot-modules" ;;
        esac
    done < "$W/mod.lines"
done
cp "$MD"/modules.order "$MD"/modules.builtin "$MD"/modules.builtin.modinfo "$S/lib/modules/$KVER/"
depmod -b "$S" "$KVER"

# tools and their shared libraries (at their host paths; ld.so.cache made by ldconfig -r)
for t in "${!TOOL_DEST[@]}"; do
    install -D -m 755 "${TOOL_SRC[$t]}" "$S/${TOOL_DEST[$t]}"
done
ln -s mke2fs "$S/usr/sbin/mkfs.ext4"
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$S/etc/"
for l in $LIBS; do
    install -D -m 755 "$l" "$S/$l"
done
for l in $LIBS; do dirname "$l"; done | sort -u > "$S/etc/ld.so.conf"
ldconfig -r "$S"
if [ "$(id -u)" = 0 ]; then
    # full paths: busybox sh runs its own applets (blkdiscard, mke2fs) before searching PATH
    for t in "/usr/bin/fio --version" "/usr/sbin/mkfs.ext4 -V" "/usr/sbin/e2fsck -V" "/usr/sbin/blkdiscard -V"; do
        # shellcheck disable=SC2086
        chroot "$S" $t > "$W/check.log" 2>&1 ||
            { cat "$W/check.log" >&2; die "'$t' does not run in the initramfs"; }
    done
fi

# --- images: reproducible cpio (fixed mtimes, sorted, no inode numbers)
find "$S" -exec touch -h -d @0 {} +
(cd "$S" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --reproducible --quiet) > "$W/initrd.img"
cp "$K/boot/vmlinuz-$KVER" "$W/vmlinuz"
echo "$MANIFEST" > "$W/manifest.txt"
mv "$W/vmlinuz" "$W/initrd.img" "$W/manifest.txt" "$OUT/"
echo "$KEY" > "$OUT/key"
log "built $OUT: vmlinuz-$KVER, initrd.img $(du -h "$OUT/initrd.img" | cut -f1)," \
    "boot modules: $(awk '{ sub(/.*\//, "", $1); print $1 }' "$S/etc/boot-modules" | xargs)," \
    "in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }') s"
