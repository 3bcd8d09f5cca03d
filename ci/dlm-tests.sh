#!/usr/bin/env bash
# The libdlm backend against the real Linux DLM (corosync + dlm_controld + the kernel's dlm
# module) in QEMU TCG guests: installs the host packages, then runs integration/dlm-cluster.sh.
# Needs root and network access to deb.debian.org (guest kernel and rootfs, cached in
# DLM_CACHE afterwards). Usage: ci/dlm-tests.sh   (environment: see integration/dlm-cluster.sh)
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
exec integration/dlm-cluster.sh
