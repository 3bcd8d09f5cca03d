#!/usr/bin/env bash
# The libdlm backend against the real Linux DLM: QEMU (TCG) guests running Debian 12 with
# corosync, dlm_controld and the kernel's dlm module; the host-built binaries run inside.
#
#   phase 1 (one guest, one-node cluster): the conformance suite on libdlm
#           (dlm_conformance --ignored libdlm_conforms)
#   phase 2 (two guests, QEMU socket network on 127.0.0.1): cross-node checks with
#           `vhost-user-md lock --dlm`: NOQUEUE refused while the other node holds PW, the
#           holder gets a blocking callback, kill -9 of the holder grants the waiter, an LVB
#           written on one node (PW -> NL) is read on the other, and the death of a whole node
#           releases its locks.
#
# Usage: integration/dlm-cluster.sh            (root; ci/dlm-tests.sh installs the host packages)
# Environment:
#   DLM_CACHE   cache of the guest kernel and the debootstrap'ed rootfs
#               (default ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-md/dlm-cluster)
#   DLM_WORK    work dir for images, sockets and logs (default: a new /tmp/vumd-dlm.XXXXXX;
#               keep it short, unix socket paths are limited); removed on success
#   DLM_PHASES  phases to run (default "1 2")
#   KDIR        an unpacked, depmod'ed Debian linux-image-6.1.0-*-amd64 tree to use
#               instead of downloading one into the cache
#   KEEP=1      keep the work dir (logs) even on success
#   DLM_SHELL=1 phase 1 only boots the guest and starts the cluster, then waits for
#               $DLM_WORK/stop (drive the guest with integration/dlm-cluster/vmsh.py)
# Needs (ci/dlm-tests.sh installs them on Debian 12): qemu-system-x86_64 (run with
# -accel tcg -cpu max), debootstrap, busybox-static, kmod, cpio, e2fsprogs, python3, cargo;
# network access to deb.debian.org on the first run (kernel and rootfs are cached).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, guest images)" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
H=$ROOT/integration/dlm-cluster
CACHE=${DLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-md/dlm-cluster}
PHASES=${DLM_PHASES:-1 2}
VM_TIMEOUT=${DLM_VM_TIMEOUT:-1800}
PKGS=corosync,dlm-controld,libdlm3,kmod,iproute2,procps,psmisc
MODULES="virtio_pci virtio_blk virtio_net ext4 dlm"
mkdir -p "$CACHE"
W=${DLM_WORK:-$(mktemp -d /tmp/vumd-dlm.XXXXXX)}
mkdir -p "$W"

T0=$(date +%s.%N)
log() { printf '[%6.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { print a - b }')" "$*"; }
passed=0 failed=0 fail_logs=0
pass() { passed=$((passed + 1)); log "PASS: $*"; }
fail() { failed=$((failed + 1)); fail_logs=1; log "FAIL: $*"; }

# ---------------------------------------------------------------- guests
NODES_UP=""
on() { local n=$1; shift; "$H/vmsh.py" "$W/node$n.ser" "$@"; } # on N 'cmd' [timeout_s]
# until_ok N 'cmd' seconds: retry cmd (each try 30 s max) until it succeeds
until_ok() {
    local n=$1 c=$2 t=$3 end=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt $end ]; do
        on "$n" "$c" 30 >/dev/null 2>&1 && return 0
        sleep 1
    done
    log "timeout (${t}s) on node$n: $c"
    return 1
}
start_node() { # N NODES NETDEV-ARGS
    local n=$1 nodes=$2 net=$3
    rm -f "$W/node$n.ser" "$W/node$n.log"
    timeout "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m 768M -machine q35 \
        -kernel "$KDIR/boot/vmlinuz-$KVER" -initrd "$W/initrd.cpio.gz" \
        -append "console=ttyS0 panic=-1 loglevel=4 vmh_node=$n vmh_nodes=$nodes" \
        -drive "file=$W/root.ext4,if=virtio,format=raw,snapshot=on" \
        -drive "file=$W/bin.ext4,if=virtio,format=raw,readonly=on" \
        -netdev "$net" -device "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0$n" \
        -chardev "socket,id=s0,path=$W/node$n.ser,server=on,wait=off,logfile=$W/node$n.log" \
        -serial chardev:s0 -display none -monitor none -no-reboot \
        >"$W/qemu-node$n.out" 2>&1 &
    echo $! >"$W/node$n.pid"
    NODES_UP="$NODES_UP $n"
}
wait_ready() { # N
    local n=$1 end=$(($(date +%s) + 300))
    while [ "$(date +%s)" -lt $end ]; do
        grep -q "VMH_READY node$n" "$W/node$n.log" 2>/dev/null && return 0
        kill -0 "$(cat "$W/node$n.pid")" 2>/dev/null || break
        sleep 0.5
    done
    log "node$n did not come up"
    return 1
}
guest_logs() { # print what helps to understand a failure
    local n
    for n in $NODES_UP; do
        [ -S "$W/node$n.ser" ] || continue
        echo "===== node$n: dlm_tool ls / status, dmesg, corosync.log, dlm_controld dump"
        on "$n" 'dlm_tool ls; dlm_tool status; dmesg | tail -60; tail -40 /var/log/corosync/corosync.log; dlm_tool dump | tail -60' 60 || true
        echo "===== node$n: serial console log (tail)"
        tail -c 20000 "$W/node$n.log" 2>/dev/null | tr -d '\r' || true
        echo "===== node$n: qemu output"
        cat "$W/qemu-node$n.out" 2>/dev/null || true
    done
}
stop_nodes() {
    local n p
    for n in $NODES_UP; do
        p=$(cat "$W/node$n.pid" 2>/dev/null) || continue
        kill "$p" 2>/dev/null || true
    done
    for n in $NODES_UP; do
        p=$(cat "$W/node$n.pid" 2>/dev/null) || continue
        for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null || true
        rm -f "$W/node$n.pid"
    done
    NODES_UP=""
}
finish() {
    local rc=$?
    if [ $fail_logs = 1 ] || [ $rc != 0 ]; then guest_logs; fi
    stop_nodes
    if [ $failed = 0 ] && [ $rc = 0 ] && [ -z "${KEEP:-}" ] && [ -z "${DLM_WORK:-}" ]; then
        rm -rf "$W"
    else
        echo "logs and images: $W"
    fi
    [ $rc = 0 ] || [ $failed -gt 0 ] || failed=1
    echo "$passed passed, $failed failed"
    [ $failed = 0 ]
}
trap finish EXIT
trap 'exit 130' INT TERM

# cluster_up NODES: corosync quorate with NODES members, dlm_controld running everywhere
cluster_up() {
    local nodes=$1 n
    for n in $(seq "$nodes"); do on "$n" 'corosync' 60 >/dev/null || return 1; done
    until_ok 1 "corosync-quorumtool -s | grep -q 'Quorate: *Yes' && [ \$(corosync-quorumtool -l | grep -c node) = $nodes ]" 180 || return 1
    log "corosync quorate with $nodes node(s)"
    for n in $(seq "$nodes"); do on "$n" 'dlm_controld </dev/null >/dev/null 2>&1' 60 >/dev/null || return 1; done
    for n in $(seq "$nodes"); do
        until_ok "$n" "[ \$(dlm_tool status | grep -c '^node .* M ') = $nodes ]" 120 || return 1
    done
    log "dlm_controld up on $nodes node(s)"
}

# ---------------------------------------------------------------- build
log "building the binaries under test"
cd "$ROOT"
artifact() { # cargo args... -> path of the executable built for the last target named $NAME
    cargo "$@" --locked --message-format=json | python3 -c '
import json, sys
name = sys.argv[1]
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == name:
        print(m["executable"])' "$NAME" | tail -1
}
TEST_BIN=$(NAME=dlm_conformance artifact test --no-run --test dlm_conformance)
MD_BIN=$(NAME=vhost-user-md artifact build --bin vhost-user-md)
if [ ! -x "$TEST_BIN" ] || [ ! -x "$MD_BIN" ]; then echo "build failed" >&2; exit 1; fi

log "guest kernel and rootfs (cache: $CACHE)"
if [ -z "${KDIR:-}" ]; then
    pkg=${DLM_KERNEL_PKG:-$(apt-cache search --names-only '^linux-image-6\.1\.0-[0-9]+-amd64$' |
        awk '{print $1}' | sort -V | tail -1)}
    [ -n "$pkg" ] || { echo "no linux-image-6.1.0-*-amd64 package known to apt (apt-get update?)" >&2; exit 1; }
    KDIR=$CACHE/kernel/$pkg
    if [ ! -e "$KDIR/.complete" ]; then
        rm -rf "$KDIR" "$CACHE/kernel/dl"
        mkdir -p "$KDIR" "$CACHE/kernel/dl"
        (cd "$CACHE/kernel/dl" && apt-get download "$pkg")
        dpkg-deb -x "$CACHE/kernel/dl/${pkg}"_*.deb "$KDIR"
        depmod -b "$KDIR" "$(ls "$KDIR/lib/modules" | head -1)"
        rm -rf "$CACHE/kernel/dl"
        touch "$KDIR/.complete"
    fi
fi
KVER=$(ls "$KDIR/lib/modules" | head -1)
if [ "$(cat "$CACHE/rootfs.pkgs" 2>/dev/null)" != "$PKGS" ]; then
    log "debootstrap bookworm ($PKGS)"
    rm -rf "$CACHE/rootfs" "$CACHE/rootfs.tmp" "$CACHE/rootfs.pkgs"
    debootstrap --variant=minbase --include="$PKGS" bookworm "$CACHE/rootfs.tmp" \
        http://deb.debian.org/debian >"$CACHE/debootstrap.log" 2>&1 ||
        { tail -20 "$CACHE/debootstrap.log"; exit 1; }
    R=$CACHE/rootfs.tmp
    rm -rf "$R"/usr/share/{doc,man,locale,info} "$R"/var/cache/apt/*.bin \
        "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/*
    mv "$CACHE/rootfs.tmp" "$CACHE/rootfs"
    echo "$PKGS" >"$CACHE/rootfs.pkgs"
fi

log "images (kernel $KVER)"
R=$CACHE/rootfs
install -m 755 "$H/guest-init" "$R/sbin/guest-init"
mkdir -p "$R/etc/dlm" "$R/etc/corosync"
install -m 644 "$H/corosync-1node.conf" "$H/corosync-2node.conf" "$R/etc/corosync/"
install -m 644 "$H/dlm.conf" "$R/etc/dlm/dlm.conf"
printf '10.0.0.1 node1\n10.0.0.2 node2\n127.0.0.1 localhost\n' >"$R/etc/hosts"
rm -f "$W/root.ext4"
mke2fs -q -t ext4 -L vumdroot -d "$R" "$W/root.ext4" 1G >/dev/null
# binaries under test on their own read-only disk (vdb -> /opt/vumd in the guest)
B=$W/bindisk
rm -rf "$B" "$W/bin.ext4"
mkdir -p "$B"
cp "$TEST_BIN" "$B/dlm_conformance"
cp "$MD_BIN" "$B/vhost-user-md"
mke2fs -q -t ext4 -L vumdbin -d "$B" "$W/bin.ext4" $(($(du -sm "$B" | cut -f1) * 5 / 4 + 16))M >/dev/null
rm -rf "$B"
# initramfs: busybox, the modules, then switch_root into the rootfs (guest-init)
I=$W/initrd
rm -rf "$I"
mkdir -p "$I"/{bin,proc,sys,dev,newroot,lib/modules}
BUSYBOX=$(command -v busybox) && ! ldd "$BUSYBOX" >/dev/null 2>&1 ||
    { echo "needs a static busybox (apt-get install busybox-static)" >&2; exit 1; }
cp "$BUSYBOX" "$I/bin/busybox"
for a in sh mount mkdir insmod switch_root cat echo; do ln -s busybox "$I/bin/$a"; done
for m in $MODULES; do
    modprobe -d "$KDIR" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | awk '!seen[$0]++' | while read -r ko; do
    cp "$ko" "$I/lib/modules/"
    basename "$ko" >>"$I/modules.order"
done
cat >"$I/init" <<'EOF'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /modules.order); do insmod /lib/modules/$m || echo "insmod $m failed"; done
EOF
cat "$H/switch-root.sh" >>"$I/init"
echo 'echo "guest boot failed"; sleep 5; poweroff -f' >>"$I/init"
chmod 755 "$I/init"
(cd "$I" && find . | cpio -o -H newc --quiet | gzip -1) >"$W/initrd.cpio.gz"
rm -rf "$I"
log "images ready in $W"

# ---------------------------------------------------------------- phase 1: one node
phase1() {
    log "phase 1: one guest, one-node cluster"
    start_node 1 1 hubport,id=n0,hubid=0
    wait_ready 1 || { fail "phase 1: guest boot"; return; }
    log "node1 up"
    cluster_up 1 || { fail "phase 1: corosync + dlm_controld"; return; }
    if [ -n "${DLM_SHELL:-}" ]; then # debugging: keep the guest up until $W/stop exists
        log "guest up: $H/vmsh.py $W/node1.ser 'CMD' [TIMEOUT]; touch $W/stop to end"
        while [ ! -e "$W/stop" ]; do sleep 2; done
        return
    fi
    local out rc=0
    out=$(on 1 'cd /tmp && VUMD_LIBDLM=1 RUST_BACKTRACE=1 dlm_conformance --ignored --exact libdlm_conforms --nocapture --test-threads=1' 1200) || rc=$?
    echo "$out" | sed 's/^/    node1| /'
    if [ $rc = 0 ] && echo "$out" | grep -q 'test result: ok. 1 passed'; then
        pass "libdlm conformance suite on the real DLM (one node)"
    else
        fail "libdlm conformance suite on the real DLM (one node), rc=$rc"
    fi
}

# ---------------------------------------------------------------- phase 2: two nodes
# wait_line N FILE TEXT SECONDS: until FILE on node N has a line TEXT
wait_line() { until_ok "$1" "grep -qx '$3' $2" "$4"; }
phase2() {
    log "phase 2: two guests"
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    start_node 1 2 "socket,id=n0,listen=127.0.0.1:$port"
    for _ in $(seq 100); do [ -S "$W/node1.ser" ] && break; sleep 0.1; done
    sleep 0.5
    start_node 2 2 "socket,id=n0,connect=127.0.0.1:$port"
    if ! wait_ready 1 || ! wait_ready 2; then fail "phase 2: guest boot"; return; fi
    log "node1, node2 up"
    cluster_up 2 || { fail "phase 2: corosync + dlm_controld on two nodes"; return; }
    local LK='vhost-user-md lock --dlm --lockspace vumdx'

    # node2 holds PW on r
    on 2 "$LK r PW </dev/null >/tmp/holder.out 2>&1 & echo \$! >/tmp/holder.pid" 30 >/dev/null || true
    if ! wait_line 2 /tmp/holder.out Granted 60; then
        fail "node2 takes PW"
        on 2 'cat /tmp/holder.out' 10 || true
        return
    fi
    log "node2 holds PW on r"
    # node1: PW with NOQUEUE is refused
    local out rc=0
    out=$(on 1 "$LK --noqueue r PW 2>&1" 90) || rc=$?
    if [ $rc != 0 ] && [ "$(echo "$out" | head -1)" = Again ]; then
        pass "NOQUEUE PW on node1 refused (Again) while node2 holds PW"
    else
        fail "NOQUEUE PW on node1 while node2 holds PW: rc=$rc, output: $out"
    fi
    # node1: a queued PW waits; node2's holder is told it blocks someone
    on 1 "$LK r PW </dev/null >/tmp/waiter.out 2>&1 & echo \$! >/tmp/waiter.pid" 30 >/dev/null || true
    if wait_line 2 /tmp/holder.out 'blocking None' 60; then
        pass "node2's PW holder gets a blocking callback for node1's request"
    else
        fail "no blocking callback on node2 (holder output: $(on 2 'cat /tmp/holder.out' 10))"
    fi
    sleep 2
    if on 1 'grep -q Granted /tmp/waiter.out' 10; then
        fail "node1's PW was granted while node2 still held PW"
    fi
    # kill -9 the holder: its locks go at once (no fencing), node1's request is granted
    on 2 'kill -9 $(cat /tmp/holder.pid)' 30 || true
    if wait_line 1 /tmp/waiter.out Granted 60; then
        pass "kill -9 of node2's holder: node1's queued PW granted"
    else
        fail "node1's queued PW not granted after kill -9 of the holder ($(on 1 'cat /tmp/waiter.out' 10))"
    fi

    # LVB: written on node2 by PW -> NL (the NL lock keeps the resource), read on node1
    on 2 "$LK --lvb node2-wrote-this-LVB --convert NL lvb PW </dev/null >/tmp/lvb.out 2>&1 & echo \$! >/tmp/lvb.pid" 30 >/dev/null || true
    if wait_line 2 /tmp/lvb.out converting 60 && until_ok 2 '[ $(grep -cx Granted /tmp/lvb.out) = 2 ]' 60; then
        on 1 "$LK --valblk lvb CR </dev/null >/tmp/reader.out 2>&1 & echo \$! >/tmp/reader.pid" 30 >/dev/null || true
        if wait_line 1 /tmp/reader.out 'lvb node2-wrote-this-LVB' 60; then
            pass "LVB written on node2 (PW -> NL) read on node1 (CR)"
        else
            fail "LVB not seen on node1: $(on 1 'cat /tmp/reader.out' 10)"
        fi
    else
        fail "node2 LVB writer: $(on 2 'cat /tmp/lvb.out' 10)"
    fi

    # death of a whole node: node1 keeps an NL lock on d (the NL-preserve idiom), node2
    # takes PW and writes the LVB (PW -> PW), node1 queues PW; node2's guest is killed:
    # after recovery node1's PW is granted and the dead holder's LVB is flagged not valid
    on 1 "$LK --valblk d NL </dev/null >/tmp/dnl.out 2>&1 & true" 30 >/dev/null || true
    wait_line 1 /tmp/dnl.out Granted 60 || true
    on 2 "$LK --lvb node2-slot --convert PW d PW </dev/null >/tmp/dpw.out 2>&1 & true" 30 >/dev/null || true
    if wait_line 2 /tmp/dpw.out converting 60 && until_ok 2 '[ $(grep -cx Granted /tmp/dpw.out) = 2 ]' 60; then
        on 1 "$LK --valblk d PW </dev/null >/tmp/dwait.out 2>&1 & true" 30 >/dev/null || true
        wait_line 2 /tmp/dpw.out 'blocking None' 60 || true
        log "killing node2's guest"
        kill -9 "$(pgrep -P "$(cat "$W/node2.pid")" qemu-system)" 2>/dev/null || kill "$(cat "$W/node2.pid")"
        if wait_line 1 /tmp/dwait.out Granted 240; then
            pass "death of node2: node1's queued PW granted after recovery"
            if wait_line 1 /tmp/dwait.out lvb-invalid 10; then
                pass "death of node2: the LVB it held PW is flagged not valid"
            else
                fail "death of node2: LVB not flagged ($(on 1 'cat /tmp/dwait.out' 10))"
            fi
        else
            fail "node1's PW not granted after node2 died ($(on 1 'cat /tmp/dwait.out; dlm_tool status' 10))"
        fi
    else
        fail "node2 takes PW on d and writes its LVB: $(on 2 'cat /tmp/dpw.out' 10)"
    fi
}

for p in $PHASES; do
    "phase$p"
    if [ $fail_logs = 1 ]; then guest_logs; fail_logs=0; fi
    stop_nodes
done
log "done"
