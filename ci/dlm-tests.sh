#!/usr/bin/env bash
# The tests in Debian 12 guests with a full userland (QEMU TCG): installs the host packages,
# then runs
#   integration/dlm-cluster.sh   the libdlm backend against the real Linux DLM (corosync +
#                                dlm_controld + the kernel's dlm module)
#   integration/systemd-guest.sh the .deb and its systemd units in a guest with systemd as PID 1
# both (the second also when the first failed); fails if either failed.
# Needs root and network access to deb.debian.org (guest kernel and rootfs, shared by both
# and cached in DLM_CACHE afterwards).
# Usage: ci/dlm-tests.sh   (environment: see the two scripts)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" -ne 0 ]; then
    echo "ci/dlm-tests.sh: needs root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
need=()
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
command -v cpio >/dev/null 2>&1 || need+=(cpio)
command -v mke2fs >/dev/null 2>&1 || need+=(e2fsprogs)
command -v modprobe >/dev/null 2>&1 || need+=(kmod)
command -v python3 >/dev/null 2>&1 || need+=(python3)
[ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || need+=(busybox-static)
# systemd-guest.sh: packaging/build-deb.sh (strip; dpkg-shlibdeps for the Depends field) and
# the metrics parser
command -v strip >/dev/null 2>&1 || need+=(binutils)
command -v dpkg-shlibdeps >/dev/null 2>&1 || need+=(dpkg-dev)
/usr/bin/python3 -c 'import prometheus_client.parser' 2>/dev/null || need+=(python3-prometheus-client)
# The guest kernel is found with apt-cache and fetched with apt-get download.
apt-get update -qq
if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    # Debian 12 images that carry qemu-utils from bookworm-backports refuse bookworm's
    # qemu-system-x86 (7.2): take it from bookworm-backports as well.
    if . /etc/os-release && [ "${VERSION_CODENAME:-}" = bookworm ]; then
        if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
            cat >/etc/apt/sources.list.d/bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
            apt-get update -qq
        fi
        apt-get install -y -qq --no-install-recommends -t bookworm-backports qemu-system-x86
    else
        apt-get install -y -qq --no-install-recommends qemu-system-x86
    fi
fi
rc=0
integration/dlm-cluster.sh || rc=1
integration/systemd-guest.sh || rc=1
exit $rc
