#!/usr/bin/env bash
# Guest integration tests: Linux guests under QEMU (TCG) on a vhost-user-md disk.
# Installs QEMU 10 and libvirt from bookworm-backports and the image tools, builds the guest images
# (vm-images/build.sh, cached by content in $VUMD_IMAGE_CACHE), builds the release binary and
# runs integration/guest-suite.sh (all tests, or the ones named).
#
# usage: ci/guest-tests.sh [TEST...]          (root, Debian 12)
#   VUMD_IMAGE_CACHE     image cache (default /var/cache/vhost-user-md-images)
#   VUMD_GUEST_RESULTS   logs per test (default ${CARGO_TARGET_DIR:-target}/guest-tests)
set -euo pipefail
cd "$(dirname "$0")/.."
export DEBIAN_FRONTEND=noninteractive

missing() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed' || echo "$p"
    done
}
qemu_major() { qemu-system-x86_64 --version 2>/dev/null | sed -n 's/^QEMU emulator version \([0-9]*\)\..*/\1/p'; }

# Debian 12's own QEMU is 7.2 and conflicts with the qemu-utils 10 from bookworm-backports that
# these machines carry; QEMU 10 (reconnect-ms, the vhost-user-blk used here) comes from backports.
tools=$(missing busybox-static fio e2fsprogs util-linux cpio kmod jq python3)
qemu=
[ "$(qemu_major)" -ge 10 ] 2>/dev/null || qemu=1
libvirt=$(missing libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients)
if [ -n "$tools$qemu$libvirt" ]; then
    [ "$(id -u)" = 0 ] || { echo "ci/guest-tests.sh: packages missing; run as root" >&2; exit 1; }
    if [ -n "$qemu$libvirt" ] && ! grep -rqs 'bookworm-backports' /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat > /etc/apt/sources.list.d/bookworm-backports.sources <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    fi
    apt-get update -qq
    if [ -n "$qemu" ]; then
        apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86 qemu-utils
    fi
    # shellcheck disable=SC2086
    [ -z "$tools" ] || apt-get install -y -qq --no-install-recommends $tools
    # libvirt from backports too, to match QEMU 10
    # shellcheck disable=SC2086
    [ -z "$libvirt" ] || apt-get install -y -qq --no-install-recommends -t bookworm-backports $libvirt
fi
qemu-system-x86_64 --version | head -1

images=${VUMD_IMAGE_CACHE:-/var/cache/vhost-user-md-images}
vm-images/build.sh "$images"
cargo build --release --locked
target=${CARGO_TARGET_DIR:-target}
VUMD="$(cd "$target" && pwd)/release/vhost-user-md" VUMD_IMAGES=$images \
    VUMD_GUEST_RESULTS=${VUMD_GUEST_RESULTS:-$target/guest-tests} \
    integration/guest-suite.sh "$@"
