#!/usr/bin/env bash
# Installs the Debian packages the test suite needs (idempotent; needs root).
#   mdadm      - the reference reader of md metadata (interop tests)
#   util-linux - losetup (mdadm -X reads bitmaps from block devices only)
#   libdlm3    - the DLM client library (loaded at run time by the libdlm backend)
set -euo pipefail
need=()
command -v mdadm >/dev/null 2>&1 || need+=(mdadm)
command -v losetup >/dev/null 2>&1 || need+=(util-linux)
# libdlm3: the real-DLM backend loads libdlm_lt.so.3 at run time
[ -e /usr/lib/x86_64-linux-gnu/libdlm_lt.so.3 ] || need+=(libdlm3)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "ci/install-deps.sh: missing ${need[*]}; run as root or install them" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}"
fi
for c in rustfmt clippy; do
    rustup component list --installed 2>/dev/null | grep -q "^$c" || rustup component add "$c"
done
