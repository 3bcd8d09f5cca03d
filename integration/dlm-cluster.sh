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
#   phase 3 (two guests sharing two leg image files, /dev/vdc and /dev/vdd): two of our
#           `serve --lock-manager dlm` nodes share an array (profile U32: slots 1 and 2
#           in one lockspace, slot 0 is taken last), node2 reads what node1 wrote; the
#           writer role a migration hands over: node2's writes fail while node1's
#           front-end holds it, and succeed once that front-end is gone; node1
#           dies mid-write, first by kill -9 of its serve, then (restarted) by killing its
#           whole guest: each time
#           node2 resyncs exactly node1's dirty chunks (status resync.bytes_copied), and
#           every write node1 acknowledged (examples/guest_io's record) reads back through
#           node2; node1's cluster stack stops under a writer (corosync, and dlm_controld
#           with it): node1 is fenced at once (writes fail) and says its host needs a
#           reboot (the kernel keeps the stopped lockspace), node2 recovers its slot and
#           writes, and after the reboot node1 serves in its slot again; at the end the legs are identical and node2's clean stop releases the
#           lockspace.
#   phase 4 (two guests, shared legs): kernel md-cluster (mdadm) creates and runs the
#           array on both; our node refuses to join while the kernel has it, on the same
#           host (before touching the DLM) and on the other host (CPG check naming the
#           kernel node, no join attempt seen by the kernel's lockspace); a kernel node
#           dies mid-write (guest killed; a clean mdadm --stop would clear its bits), our
#           nodes resync exactly the dirty chunks and hold every write it acknowledged;
#           our nodes write and are killed together mid-write (8 dirty chunks in each of
#           their slots, 1 and 2), kernel md assembles alone (slot 0), resyncs them all,
#           and reads every acknowledged block back. Leg chunks are corrupted on purpose
#           inside the dirty regions, so identical legs at the end prove they were resynced.
#   phase 5 (one guest): a plain array served alone on the host (lock manager local, so
#           with its multi-host heartbeat in each leg's first 4 KiB) is killed mid-write;
#           kernel md in the guest assembles the legs ([UU]), reads every acknowledged
#           block, and leaves the heartbeat block as it was.
#
# Usage: integration/dlm-cluster.sh            (root; ci/dlm-tests.sh installs the host packages)
# Environment:
#   DLM_CACHE   cache of the guest kernel and the debootstrap'ed rootfs, shared with
#               integration/systemd-guest.sh (integration/lib/debian-guest.sh builds them;
#               default ${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-md/dlm-cluster)
#   DLM_WORK    work dir for images, sockets and logs (default: a new /tmp/vumd-dlm.XXXXXX;
#               keep it short, unix socket paths are limited); removed on success
#   DLM_PHASES  phases to run (default "1 2 3 4 5")
#   KDIR        an unpacked, depmod'ed Debian linux-image-6.1.0-*-amd64 tree to use
#               instead of downloading one into the cache
#   KEEP=1      keep the work dir (logs) even on success
#   DLM_SHELL=1 phase 1 only boots the guest and starts the cluster, then waits for
#               $DLM_WORK/stop (drive the guest with integration/dlm-cluster/vmsh.py)
# The guest test client is examples/guest_io.rs (cargo build --example guest_io; copied into
# the guests with the other binaries, never installed).
# Needs (ci/dlm-tests.sh installs them on Debian 12): qemu-system-x86_64 (run with
# -accel tcg -cpu max), debootstrap, busybox-static, kmod, cpio, e2fsprogs, python3, cargo;
# network access to deb.debian.org on the first run (kernel and rootfs are cached).
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, guest images)" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
H=$ROOT/integration/dlm-cluster
CACHE=${DLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-md/dlm-cluster}
GUEST_CACHE=$CACHE
. "$ROOT/integration/lib/debian-guest.sh" # guest kernel, rootfs (GUEST_PKGS), initramfs
PHASES=${DLM_PHASES:-1 2 3 4 5}
VM_TIMEOUT=${DLM_VM_TIMEOUT:-1800}
MODULES="virtio_pci virtio_blk virtio_net ext4 dlm md-mod raid1 md-cluster"
W=${DLM_WORK:-$(mktemp -d /tmp/vumd-dlm.XXXXXX)}
mkdir -p "$W"

T0=$(date +%s.%N)
log() { printf '[%6.1fs] %s\n' "$(awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { print a - b }')" "$*"; }
passed=0 failed=0 fail_logs=0
pass() { passed=$((passed + 1)); log "PASS: $*"; }
fail() { failed=$((failed + 1)); fail_logs=1; log "FAIL: $*"; }

# ---------------------------------------------------------------- guests
NODES_UP=""
LEG_ARGS="" # shared legs (phases 3, 4): /dev/vdc and /dev/vdd in every guest
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
        -drive "file=$W/root.ext4,if=none,id=root,format=raw,snapshot=on" -device virtio-blk-pci,drive=root \
        -drive "file=$W/bin.ext4,if=none,id=bin,format=raw,readonly=on" -device virtio-blk-pci,drive=bin \
        $LEG_ARGS \
        -netdev "$net" -device "virtio-net-pci,netdev=n0,mac=52:54:00:00:00:0$n" \
        -chardev "socket,id=s0,path=$W/node$n.ser,server=on,wait=off,logfile=$W/node$n.log" \
        -serial chardev:s0 -chardev "file,id=s1,path=$W/node$n.ttyS1" -serial chardev:s1 \
        -display none -monitor none -no-reboot \
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
IO_BIN=$(NAME=guest_io artifact build --example guest_io)
if [ ! -x "$TEST_BIN" ] || [ ! -x "$MD_BIN" ] || [ ! -x "$IO_BIN" ]; then echo "build failed" >&2; exit 1; fi

log "guest kernel and rootfs (cache: $CACHE)"
guest_kernel
guest_rootfs

log "images (kernel $KVER)"
R=$ROOTFS
install -m 755 "$H/guest-init" "$R/sbin/guest-init"
mkdir -p "$R/etc/dlm" "$R/etc/corosync"
install -m 644 "$H/corosync-1node.conf" "$H/corosync-2node.conf" "$R/etc/corosync/"
install -m 644 "$H/dlm.conf" "$R/etc/dlm/dlm.conf"
mkdir -p "$R/usr/local/sbin"
install -m 755 "$H/fence-delay" "$R/usr/local/sbin/vumd-fence-delay"
printf '10.0.0.1 node1\n10.0.0.2 node2\n127.0.0.1 localhost\n' >"$R/etc/hosts"
guest_ext4 "$W/root.ext4" "$R" vumdroot 1G
# binaries under test on their own read-only disk (vdb -> /opt/vumd in the guest)
B=$W/bindisk
rm -rf "$B"
mkdir -p "$B"
cp "$TEST_BIN" "$B/dlm_conformance"
cp "$MD_BIN" "$B/vhost-user-md"
cp "$IO_BIN" "$B/guest_io"
guest_ext4 "$W/bin.ext4" "$B" vumdbin
rm -rf "$B"
# initramfs: busybox, the modules, then switch_root into the rootfs (guest-init)
guest_initrd "$W/initrd.cpio.gz" /sbin/guest-init "$MODULES"
log "images ready in $W"

# ---------------------------------------------------------------- phase 1: one node
phase1() {
    log "phase 1: one guest, one-node cluster"
    LEG_ARGS=""
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
# two_guests PHASE: boots node1 and node2 on one QEMU socket network, starts the cluster
two_guests() {
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    start_node 1 2 "socket,id=n0,listen=127.0.0.1:$port"
    for _ in $(seq 100); do [ -S "$W/node1.ser" ] && break; sleep 0.1; done
    sleep 0.5
    start_node 2 2 "socket,id=n0,connect=127.0.0.1:$port"
    if ! wait_ready 1 || ! wait_ready 2; then fail "$1: guest boot"; return 1; fi
    log "node1, node2 up"
    cluster_up 2 || { fail "$1: corosync + dlm_controld on two nodes"; return 1; }
}
phase2() {
    log "phase 2: two guests"
    LEG_ARGS=""
    two_guests "phase 2" || return
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

# ---------------------------------------------------------------- phases 3, 4: shared legs
MIB=1048576
SOCK=/tmp/md.sock
# new_legs: two fresh 64 MiB image files, attached to the next guests as /dev/vdc, /dev/vdd
new_legs() {
    rm -f "$W/leg0.img" "$W/leg1.img"
    truncate -s 64M "$W/leg0.img" "$W/leg1.img"
    LEG_ARGS=""
    for i in 0 1; do
        LEG_ARGS="$LEG_ARGS -drive file=$W/leg$i.img,if=none,id=leg$i,format=raw,cache=none,file.locking=off"
        LEG_ARGS="$LEG_ARGS -device virtio-blk-pci,drive=leg$i,share-rw=on"
    done
}
# examine EXPR: EXPR (python, d = `examine --json` of leg 0, read on the host)
examine() {
    "$MD_BIN" examine --json "$W/leg0.img" |
        python3 -c 'import json, sys; d = json.load(sys.stdin)["legs"][0]; print(eval(sys.argv[1]))' "$1"
}
dirty() { examine "d['bitmap']['slots'][$1]['dirty']"; } # dirty chunks of node slot $1
slots_dirty() { examine "' '.join(str(s['dirty']) for s in d['bitmap']['slots'])"; } # of every slot
# serve_cmd N: start our node on guest N (lock manager dlm) in the background. The nodes
# write disjoint ranges at the same time, as md-cluster allows: --shared-writes (the
# writer role of one VM per disk is exclusive otherwise; WRITES= for that).
WRITES=--shared-writes
serve_cmd() {
    # (in a subshell: no job notice from the guest's shell when it is killed)
    on "$1" "(RUST_LOG=info vhost-user-md serve --lock-manager dlm $WRITES --socket $SOCK /dev/vdc /dev/vdd </dev/null >>/tmp/serve.log 2>&1 & echo \$! >/tmp/serve.pid)" 30 >/dev/null
}
serve_start() { # N: start our node on guest N, wait until it answers
    serve_cmd "$1"
    until_ok "$1" "vhost-user-md status --format json $SOCK >/dev/null" 240 && return 0
    on "$1" 'tail -20 /tmp/serve.log' 20 | sed "s/^/    node$1| /"
    return 1
}
status() { # N EXPR: EXPR (python, d = `status --format json` of our node on guest N)
    on "$1" "vhost-user-md status --format json $SOCK" 60 |
        python3 -c 'import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1]))' "$2"
}
wait_status() { # N EXPR SECONDS
    local end=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt $end ]; do
        [ "$(status "$1" "bool($2)" 2>/dev/null)" = True ] && return 0
        sleep 2
    done
    log "timeout (${3}s) on node$1 waiting for: $2"
    on "$1" "vhost-user-md status $SOCK; tail -20 /tmp/serve.log" 30 | sed "s/^/    node$1| /"
    return 1
}
wait_host() { # 'cmd' SECONDS: until cmd (on the host) succeeds
    local end=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt $end ]; do
        eval "$1" && return 0
        sleep 1
    done
    log "timeout (${2}s) waiting for: $1"
    return 1
}
serve_stop() { # N: SIGTERM our node on guest N, wait for it to exit
    on "$1" 'kill $(cat /tmp/serve.pid)' 30 >/dev/null
    until_ok "$1" '! kill -0 $(cat /tmp/serve.pid) 2>/dev/null' 120
}
# lines of the acknowledgement record node1 wrote to its second serial port (host file)
ttys1_acks() { python3 -c 'import sys; print(open(sys.argv[1], "rb").read().count(b"\n"))' "$W/node1.ttyS1"; }

# death_mid_write KIND SEED MIB: node1 writes 128 KiB blocks in a loop over the 8 chunks
# at MIB..MIB+8 (1 MiB chunks) and dies mid-write (KIND process: kill -9 of its serve;
# guest: its whole guest is killed). node2 must resync exactly those 8 chunks, and every
# write node1 acknowledged must read back through node2.
death_mid_write() {
    local kind=$1 seed=$2 acks k b0 copied
    local args="--seed $seed --first $(($3 * 8)) --blocks 64 --block-size 131072"
    if [ "$kind" = process ]; then acks=/tmp/acks$seed; else acks=/dev/ttyS1; fi
    on 1 "(guest_io write $SOCK $args --passes 0 --acks $acks </dev/null >/tmp/writer.out 2>&1 & echo \$! >/tmp/writer.pid)" 30 >/dev/null
    if [ "$kind" = process ]; then
        until_ok 1 "[ \$(wc -l <$acks) -ge 128 ]" 300
    else
        wait_host '[ "$(ttys1_acks)" -ge 128 ]' 300
    fi || { fail "$kind death: node1's writer ($(on 1 'cat /tmp/writer.out' 10))"; return 1; }
    # only the writer's 8 chunks dirty in node1's slot (earlier bits cleared by its daemon)
    if ! wait_host '[ "$(dirty 1)" = 8 ]' 180; then
        fail "$kind death: node1's slot never had exactly its 8 written chunks dirty ($(dirty 1))"
        return 1
    fi
    b0=$(status 2 "d['resync']['bytes_copied']")
    if [ "$kind" = process ]; then
        on 1 'kill -9 $(cat /tmp/serve.pid)' 30
        sleep 1
        k=$(on 1 "wc -l <$acks" 30 | tail -1)
        on 1 'kill -9 $(cat /tmp/writer.pid)' 30
    else
        kill -9 "$(pgrep -P "$(cat "$W/node1.pid")" qemu-system)"
        sleep 1
        k=$(ttys1_acks)
    fi
    case $k in '' | *[!0-9]*) fail "$kind death: no acknowledgement count ($k)"; return 1 ;; esac
    log "node1 killed ($kind) with 8 dirty chunks, after $k acknowledged writes"
    if ! wait_status 2 "d['resync']['bytes_copied'] - $b0 >= 8 * $MIB and not d['resync']['active'] and d['resync']['remaining_chunks'] == 0" 300; then
        fail "$kind death: node2 did not recover node1's slot"
        return 1
    fi
    copied=$(status 2 "d['resync']['bytes_copied'] - $b0")
    if [ "$copied" = $((8 * MIB)) ] && on 2 "grep -q 'node slot 1 died with 8 dirty chunks' /tmp/serve.log" 30; then
        pass "$kind death of node1 mid-write: node2 resynced exactly its 8 dirty chunks ($copied bytes)"
    else
        fail "$kind death of node1: node2 copied $copied bytes, want $((8 * MIB)) ($(on 2 'grep "died with" /tmp/serve.log' 10))"
    fi
    # corosync reports a dead host before the DLM has recovered its locks: node2 reads
    # from one leg from then until node1's bits are taken over (a killed process's
    # locks go at once, so that case may not see the window)
    local seq
    seq=$(on 2 "grep -o 'read balancing suspended\|node slot 1 died with\|read balancing resumed' /tmp/serve.log | tail -3 | tr '\n' ," 30 | tr -d '\r' | tail -1)
    log "node2's read balancing around the $kind death: $seq"
    if [ "$kind" = guest ]; then
        case $seq in
        "read balancing suspended,node slot 1 died with,read balancing resumed,"*)
            pass "guest death: node2 read from one leg from corosync's report until node1's bits were its own" ;;
        *) fail "guest death: node2's read balancing was not suspended until the recovery ($seq)" ;;
        esac
    fi
    local out rc=0
    out=$(on 2 "guest_io verify $SOCK $args --acked $k" 600) || rc=$?
    echo "$out" | sed 's/^/    node2| /'
    if [ $rc = 0 ] && [ "$k" -ge 128 ]; then
        pass "$kind death: all $k writes node1 acknowledged read back through node2"
    else
        fail "$kind death: writes node1 acknowledged are missing (rc=$rc)"
    fi
}

# writer_role: the lock a live migration hands from host to host (`vumd-writer`), over the
# real DLM: while node1's front-end has its vrings started, writes through node2 fail;
# once node1's front-end is gone, node2's takes the role and its writes land. (A serve
# has one front-end at a time: node1 is not read while its writer is connected.)
writer_role() {
    local n rc=0
    for n in 1 2; do serve_stop $n || { fail "writer role: node$n's serve does not stop"; return 1; }; done
    WRITES=
    for n in 1 2; do serve_start $n || { fail "writer role: node$n: serve (exclusive writer)"; WRITES=--shared-writes; return 1; }; done
    WRITES=--shared-writes
    on 1 "(guest_io write $SOCK --seed 5 --first 0 --blocks 16 --passes 0 </dev/null >/tmp/holder.out 2>&1 & echo \$! >/tmp/holder.pid)" 30 >/dev/null
    if ! wait_status 1 "d['writer_role'] == 'held'" 120; then
        fail "writer role: node1's writing front-end does not hold it ($(on 1 'cat /tmp/holder.out' 10))"
        return 1
    fi
    local out
    out=$(on 2 "guest_io write $SOCK --seed 6 --first 100 --blocks 4" 120) || rc=$?
    echo "$out" | tail -2 | sed 's/^/    node2| /'
    if [ $rc != 0 ] && on 2 "grep -q 'writer role refused' /tmp/serve.log" 30 &&
        ! on 2 "guest_io verify $SOCK --seed 6 --first 100 --blocks 1 --acked 1" 120 >/dev/null 2>&1; then
        pass "writer role held on node1: node2's front-end is refused it, its writes fail and none lands"
    else
        fail "writer role: node2 wrote while node1 held the role (rc $rc; $(on 2 'grep "writer role" /tmp/serve.log' 10))"
    fi
    on 1 'kill $(cat /tmp/holder.pid)' 30 >/dev/null
    wait_status 1 "d['writer_role'] == 'idle'" 120 || fail "writer role: node1 keeps it after its front-end left"
    if on 2 "guest_io write $SOCK --seed 6 --first 100 --blocks 4" 120 >/dev/null &&
        on 1 "guest_io verify $SOCK --seed 6 --first 100 --blocks 4 --acked 4" 120 >/dev/null; then
        pass "writer role: node1's front-end gone, node2's takes the role; node1 reads what it wrote"
    else
        fail "writer role: node2 cannot write after node1's front-end left"
    fi
    for n in 1 2; do serve_stop $n || { fail "writer role: node$n's serve does not stop"; return 1; }; done
    for n in 1 2; do serve_start $n || { fail "node$n: serve --shared-writes again"; return 1; }; done
}

# guest_time N: the clock of guest N (seconds since the epoch)
guest_time() { on "$1" 'date +%s.%N' 30 | tr -d '\r' | tail -1; }
# log_time N PATTERN: the time (seconds since the epoch) of the last line of node N's serve
# log that matches PATTERN (a grep -E pattern), from its millisecond timestamp
log_time() {
    on "$1" "grep -E '$2' /tmp/serve.log | tail -1" 30 | tr -d '\r' | python3 -c '
import sys, datetime
line = sys.stdin.read().strip()
ts = line[1:].split()[0] if line.startswith("[") else ""
print(datetime.datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp() if ts else "")'
}
# serve_threads N: where the threads of our node on guest N wait (for failure reports)
serve_threads() {
    on "$1" 'for t in /proc/$(cat /tmp/serve.pid)/task/*; do echo "$(cat $t/comm) $(cat $t/wchan) $(grep -v "^\[<0>\] \(__schedule\|schedule\)" $t/stack 2>/dev/null | head -3 | tr "\n" " ")"; done; pidof corosync dlm_controld; tail -15 /tmp/serve.log' 30 | sed "s/^/    node$1| /"
}
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }

# stack_loss: node1's cluster stack fails under a writer: corosync stops, and dlm_controld
# exits with it ("cluster is down"). node1 must stop writing at once (fenced: its writes
# fail, status says so); node2 recovers node1's slot and goes on writing. The kernel stops
# a lockspace whose dlm_controld is gone, for good: it can be neither released (closing its
# device blocks) nor run again (a restarted dlm_controld refuses to run beside it), so
# node1's status must say that its host needs a reboot. Both guests are then restarted
# (node2 first stops cleanly) and node1 serves again in its slot.
stack_loss() {
    local w1="--seed 7 --first 240 --blocks 16 --block-size 131072" # MiB 30-31
    local w2="--seed 8 --first 272 --blocks 8 --block-size 131072"  # MiB 34
    local died k t_loss t_fence out rc=0
    died=$(on 2 "grep -c 'node slot 1 died' /tmp/serve.log" 30 | tr -d '\r' | tail -1)
    on 1 "(guest_io write $SOCK $w1 --passes 0 --acks /tmp/acks7 </dev/null >/tmp/writer.out 2>&1 & echo \$! >/tmp/writer.pid)" 30 >/dev/null
    if ! until_ok 1 '[ $(wc -l </tmp/acks7) -ge 32 ]' 300 || ! wait_status 1 "d['writer_role'] == 'held'" 60; then
        fail "stack loss: node1's writer ($(on 1 'cat /tmp/writer.out' 10))"
        return 1
    fi
    t_loss=$(guest_time 1)
    on 1 'kill $(pidof corosync)' 30 >/dev/null
    log "node1: corosync stopped under a writer"
    if wait_status 1 "d['writer_role'] == 'fenced' and d['fenced']" 60; then
        t_fence=$(log_time 1 'fenced: DLM lost')
        pass "stack loss: node1 fenced $(secs "$t_fence" "$t_loss") s after corosync was told to stop ($(status 1 "d['fenced']"))"
    else
        fail "stack loss: node1 not fenced after corosync stopped"
        return 1
    fi
    until_ok 1 '! kill -0 $(cat /tmp/writer.pid) 2>/dev/null' 60 || on 1 'kill -9 $(cat /tmp/writer.pid)' 30 >/dev/null
    k=$(on 1 'wc -l </tmp/acks7' 30 | tr -d '\r' | tail -1)
    out=$(on 1 "timeout 60 guest_io write $SOCK --seed 10 --first 280 --blocks 1 --block-size 131072" 90) || rc=$?
    if [ $rc != 0 ] && [ $rc != 124 ] && on 1 "grep -q failed /tmp/writer.out" 10; then
        pass "stack loss: node1's writes fail once fenced (writer stopped after $k acknowledged writes; a new write: $(echo "$out" | tail -1 | tr -d '\r'))"
    else
        fail "stack loss: node1's writes do not fail at once (rc $rc; writer: $(on 1 'cat /tmp/writer.out' 10))"
        serve_threads 1
    fi
    if wait_status 1 "'reboot this host' in d['fenced'] and 'dlm_controld is not running' in d['fenced']" 60; then
        pass "stack loss: node1 says its DLM lockspace is abandoned and its host needs a reboot"
    else
        fail "stack loss: node1's status does not say that its host needs a reboot"
    fi
    # node2: not fenced, recovers node1's slot, and writes
    if until_ok 2 "[ \$(grep -c 'node slot 1 died' /tmp/serve.log) -gt $died ]" 120 &&
        [ "$(status 2 "d['writer_role'] != 'fenced' and not d['fenced']")" = True ] &&
        on 2 "guest_io write $SOCK $w2" 120 >/dev/null &&
        on 2 "guest_io verify $SOCK $w1 --acked $k" 300 >/dev/null; then
        pass "stack loss: node2 unaffected: recovered node1's slot, writes, reads all $k writes node1 acknowledged"
    else
        fail "stack loss: node2 ($(on 2 'vhost-user-md status '$SOCK'; tail -5 /tmp/serve.log' 10))"
    fi
    # node1's host "reboots" (both guests restart: they share one point-to-point link)
    serve_stop 2 || { fail "stack loss: node2's serve does not stop"; return 1; }
    stop_nodes
    : >"$W/node1.ttyS1"
    two_guests "phase 3 (after the stack loss)" || return 1
    serve_start 1 && serve_start 2 || { fail "stack loss: our nodes do not start after the reboot"; return 1; }
    local s1 s2
    s1=$(status 1 "d['node_slot']")
    s2=$(status 2 "d['node_slot']")
    if [ "$s1 $s2" = "1 2" ] && on 1 "guest_io write $SOCK $w2" 120 >/dev/null &&
        on 1 "guest_io verify $SOCK $w1 --acked $k" 300 >/dev/null; then
        pass "stack loss: after the reboot node1 serves in slot 1 again, writes, and reads what it acknowledged before the loss"
    else
        fail "stack loss: after the reboot node1 slot $s1, node2 slot $s2"
        return 1
    fi
}

phase3() {
    log "phase 3: two of our nodes share an array over the DLM (profile U32); node deaths mid-write"
    new_legs
    "$MD_BIN" create --assume-clean --cluster-name vumdclu --bitmap-chunk 1M \
        "$W/leg0.img" "$W/leg1.img" >/dev/null || { fail "phase 3: create the array"; return; }
    local ls
    ls=$(examine "d['superblock']['lockspace']")
    : >"$W/node1.ttyS1"
    two_guests "phase 3" || return
    serve_start 1 || { fail "node1: serve --lock-manager dlm"; return; }
    serve_start 2 || { fail "node2: serve --lock-manager dlm"; return; }
    local s1 s2 members
    s1=$(status 1 "d['node_slot']")
    s2=$(status 2 "d['node_slot']")
    members=$(on 1 "dlm_tool ls | sed -n '/^name *$ls/,/^\$/p' | sed -n 's/^members *//p'" 30 | tr -s ' ')
    if [ "$s1 $s2" = "1 2" ] && [ "$(echo $members)" = "1 2" ]; then
        pass "two nodes joined lockspace $ls over libdlm (members $members): node1 slot 1, node2 slot 2 (slot 0 last)"
    else
        fail "join: node1 slot $s1, node2 slot $s2, lockspace members '$members'"
        return
    fi
    if on 1 "guest_io write $SOCK --seed 1 --first 0 --blocks 32" 300 >/dev/null &&
        on 2 "guest_io verify $SOCK --seed 1 --first 0 --blocks 32 --acked 32" 300 | sed 's/^/    node2| /'; then
        pass "node2 reads the 4 MiB node1 wrote"
    else
        fail "node2 does not read what node1 wrote"
    fi
    writer_role || return

    death_mid_write process 2 20 || return
    # node1 comes back (the survivor released slot 1) and dies again, this time the guest
    serve_start 1 || { fail "node1: serve again after its kill"; return; }
    s1=$(status 1 "d['node_slot']")
    [ "$s1" = 1 ] && pass "node1 restarted: takes slot 1 again" || fail "node1 restarted in slot $s1"
    if on 2 "grep -q 'node slot 1 joined (node id 1, pid [1-9]' /tmp/serve.log" 30; then
        pass "node2 learned node1's corosync node id from its NODE_JOINED"
    else
        fail "node2's NODE_JOINED from node1 lacks its node id ($(on 2 'grep "joined (node id" /tmp/serve.log' 10))"
    fi
    stack_loss || return
    death_mid_write guest 3 40

    # node2 stops cleanly: legs identical, node1's slot clean, no lockspace left behind
    serve_stop 2 || fail "node2: serve does not stop on SIGTERM"
    if on 2 "[ ! -e /sys/kernel/dlm/$ls ]" 30; then
        pass "node2 stopped: its DLM lockspace is released"
    else
        fail "node2 stopped but lockspace $ls is still joined on its host ($(on 2 'dlm_tool ls' 10))"
    fi
    local d cmp
    d=$(slots_dirty)
    cmp=$("$IO_BIN" compare-legs "$W/leg0.img" "$W/leg1.img") && [ "$d" = "0 0 0 0" ] &&
        pass "legs identical, no dirty chunks left ($cmp)" ||
        fail "after the deaths: slot dirty counts $d; $cmp"
}

# refused N MESSAGE: our node on guest N must refuse to serve, saying MESSAGE
refused() {
    local out rc=0
    out=$(on "$1" "timeout 120 vhost-user-md serve --lock-manager dlm --socket /tmp/refused.sock /dev/vdc /dev/vdd </dev/null 2>&1" 180) || rc=$?
    echo "$out" | tail -3 | sed "s/^/    node$1| /"
    [ $rc != 0 ] && [ $rc != 124 ] && echo "$out" | grep -q "$2"
}

phase4() {
    log "phase 4: kernel md-cluster nodes hand the array over to ours and back; our nodes refuse while a kernel node has it"
    new_legs
    two_guests "phase 4" || return
    local md="/dev/md0 /dev/vdc /dev/vdd" blk="--block-size 131072 --blocks 32"
    if ! on 1 "mdadm --create $md --run --assume-clean --bitmap=clustered --nodes=4 --bitmap-chunk=1M --level=1 --raid-devices=2 --metadata=1.2" 180 >/dev/null ||
        ! on 2 "mdadm --assemble $md" 180 >/dev/null ||
        ! on 1 'dmesg | grep -q "md-cluster: Joined cluster .* slot 1"' 30 ||
        ! on 2 'dmesg | grep -q "md-cluster: Joined cluster .* slot 2"' 30; then
        fail "kernel md-cluster array on node1 and node2"
        return
    fi
    local ls
    ls=$(examine "d['superblock']['lockspace']")
    log "kernel md-cluster array $ls active on node1 (slot 1) and node2 (slot 2)"
    if ! on 1 "guest_io write /dev/md0 --seed 11 --first 0 $blk" 300 || ! on 2 "guest_io write /dev/md0 --seed 12 --first 160 $blk" 300; then
        fail "kernel nodes write"
        return
    fi

    # same host: the DLM would not refuse (spec §6.7); we must, before touching it
    local n1
    n1=$(on 1 "dmesg | grep -c $ls" 30)
    if refused 1 "is active on a kernel md-cluster node on this host" &&
        on 1 "! grep -q dlm_$ls /proc/misc && [ \$(dmesg | grep -c $ls) = $n1 ] && grep -q 'md0 : active' /proc/mdstat" 30; then
        pass "same host: our node refuses while kernel md-cluster has the array, without touching the DLM"
    else
        fail "same host: no clean refusal ($(on 1 "grep dlm_ /proc/misc; dmesg | grep $ls | tail -5" 10))"
    fi
    # across hosts: node2 leaves the kernel cluster, node1 keeps the array
    on 2 'mdadm --stop /dev/md0' 120 >/dev/null || { fail "mdadm --stop on node2"; return; }
    n1=$(on 1 "dmesg | grep -c $ls" 30)
    if refused 2 "is active on kernel md-cluster node(s) 1 " &&
        on 2 "[ ! -e /sys/kernel/dlm/$ls ]" 30 && on 1 "[ \$(dmesg | grep -c $ls) = $n1 ]" 30; then
        pass "other host: our node refuses naming kernel node 1, and node1's lockspace saw no join attempt"
    else
        fail "other host: no clean refusal ($(on 1 "dmesg | grep $ls | tail -5" 10))"
    fi
    # kernel -> ours: node1 (kernel) dies mid-write, its guest killed: its slot's bits
    # stay dirty (a clean mdadm --stop clears them). Both guests are restarted.
    local k
    on 1 "(guest_io write /dev/md0 --seed 15 --first 0 $blk --passes 0 --acks /dev/ttyS1 </dev/null >/tmp/writer.out 2>&1 &)" 30 >/dev/null
    wait_host '[ "$(ttys1_acks)" -ge 64 ]' 300 || { fail "kernel writer on node1 ($(on 1 'cat /tmp/writer.out' 10))"; return; }
    kill -9 "$(pgrep -P "$(cat "$W/node1.pid")" qemu-system)"
    sleep 1
    k=$(ttys1_acks)
    stop_nodes
    log "kernel node1 killed mid-write after $k acknowledged writes; restarting both guests"
    two_guests "phase 4 (restart)" || return
    local d0 d1 want
    d0=$(dirty 0)
    d1=$(dirty 1)
    want=$(((d0 + d1) * MIB))
    log "the kernel nodes left $d0 + $d1 dirty chunks (slots 0, 1)"
    [ "$d0" -ge 4 ] || { fail "the dead kernel node left $d0 dirty chunks, want at least the 4 it wrote"; return; }
    # make the legs differ inside a dirty chunk: only its resync makes them identical
    "$IO_BIN" corrupt "$W/leg1.img" 1 >/dev/null
    ! "$IO_BIN" compare-legs "$W/leg0.img" "$W/leg1.img" >/dev/null || { fail "corrupt leg1"; return; }
    serve_start 1 && serve_start 2 || { fail "our nodes do not start on the kernel's array"; return; }
    if wait_status 1 "not d['resync']['active'] and d['resync']['remaining_chunks'] == 0" 300 &&
        wait_status 2 "not d['resync']['active'] and d['resync']['remaining_chunks'] == 0" 300; then
        local c1 c2
        c1=$(status 1 "d['resync']['bytes_copied']")
        c2=$(status 2 "d['resync']['bytes_copied']")
        if [ $((c1 + c2)) = "$want" ]; then
            pass "kernel -> ours: our nodes resynced exactly the kernel's $((d0 + d1)) dirty chunks ($c1 + $c2 bytes)"
        else
            fail "kernel -> ours: copied $c1 + $c2 bytes, want $want"
        fi
    else
        fail "kernel -> ours: resync does not finish"
    fi
    if on 2 "guest_io verify $SOCK --seed 15 --first 0 $blk --acked $k && guest_io verify $SOCK --seed 12 --first 160 $blk --acked 32" 600 | sed 's/^/    node2| /'; then
        pass "kernel -> ours: every block the kernel nodes wrote reads back through our node"
    else
        fail "kernel -> ours: data the kernel nodes wrote is not intact"
    fi

    # ours -> kernel: both our nodes (slots 1 and 2) write in a loop over 8 chunks each
    # and are killed together mid-write, before any bit is cleared: two dirty slots. A kernel node
    # assembling alone takes slot 0, merges both slots' bits and resyncs them (a dirty
    # slot 0 would not be: the kernel drops the bits of the slot it takes when another
    # slot is dirty too, see cluster::membership::claim_order).
    local w1="--seed 13 --first 320 --blocks 64 --block-size 131072" # MiB 40-47
    local w2="--seed 14 --first 400 --blocks 64 --block-size 131072" # MiB 50-57
    on 1 "(guest_io write $SOCK $w1 --passes 0 --acks /tmp/acks13 </dev/null >/tmp/writer.out 2>&1 & echo \$! >/tmp/writer.pid)" 30 >/dev/null
    on 2 "(guest_io write $SOCK $w2 --passes 0 --acks /tmp/acks14 </dev/null >/tmp/writer.out 2>&1 & echo \$! >/tmp/writer.pid)" 30 >/dev/null
    if ! until_ok 1 '[ $(wc -l </tmp/acks13) -ge 64 ]' 300 || ! until_ok 2 '[ $(wc -l </tmp/acks14) -ge 64 ]' 300 ||
        ! wait_host '[ "$(slots_dirty)" = "0 8 8 0" ]' 180; then
        fail "ours -> kernel: our writers ($(on 1 'cat /tmp/writer.out' 10); $(on 2 'cat /tmp/writer.out' 10)); dirty per slot $(slots_dirty)"
        return
    fi
    # frozen first (SIGSTOP), so that neither sees the other die and takes its slot over
    local k1 k2 n
    for n in 1 2; do on "$n" 'kill -STOP $(cat /tmp/serve.pid)' 30; done
    for n in 1 2; do on "$n" 'kill -9 $(cat /tmp/serve.pid)' 30; done
    sleep 1
    k1=$(on 1 'kill -9 $(cat /tmp/writer.pid); wc -l </tmp/acks13' 30 | tail -1)
    k2=$(on 2 'kill -9 $(cat /tmp/writer.pid); wc -l </tmp/acks14' 30 | tail -1)
    local d
    d=$(slots_dirty)
    log "our nodes killed mid-write after $k1 + $k2 acknowledged writes; dirty chunks per slot: $d"
    [ "$d" = "0 8 8 0" ] || { fail "our nodes left dirty chunks per slot $d, want 0 8 8 0"; return; }
    "$IO_BIN" corrupt "$W/leg1.img" 41 >/dev/null && "$IO_BIN" corrupt "$W/leg1.img" 51 >/dev/null
    # a killed node leaves its userspace lockspace joined on its host; a kernel md join
    # there would hang (spec §6.7): the operator releases it first
    for n in 1 2; do
        on "$n" "while [ -e /sys/kernel/dlm/$ls ]; do dlm_tool leave $ls >/dev/null 2>&1 || break; done; [ ! -e /sys/kernel/dlm/$ls ]" 60 ||
            { fail "node$n: dlm_tool leave $ls"; return; }
    done
    if ! on 1 "mdadm --assemble $md" 180 >/dev/null || ! until_ok 1 'dmesg | grep -q "md: md0: resync done"' 300 ||
        ! on 1 'dmesg | grep -q "md-cluster: Joined cluster .* slot 1$"' 30; then
        fail "ours -> kernel: mdadm --assemble (slot 0) and resync on node1 ($(on 1 'cat /proc/mdstat; dmesg | grep -E "md|dlm" | tail -15' 10))"
        return
    fi
    if on 1 "guest_io verify /dev/md0 $w1 --acked $k1 && guest_io verify /dev/md0 $w2 --acked $k2" 600 | sed 's/^/    node1| /'; then
        pass "ours -> kernel: every block our nodes acknowledged reads back through kernel md"
    else
        fail "ours -> kernel: data our nodes wrote is not intact"
    fi
    on 1 'mdadm --stop /dev/md0' 120 >/dev/null || fail "mdadm --stop on node1"
    # the kernel clears its own slot; the slots it merged keep their bits (it merges
    # free slots without clearing them, spec §5.1); their chunks are in sync now
    local cmp
    d=$(slots_dirty)
    if cmp=$("$IO_BIN" compare-legs "$W/leg0.img" "$W/leg1.img") && [ "$d" = "0 8 8 0" ]; then
        pass "ours -> kernel: kernel md resynced the 16 chunks our two nodes left dirty (legs identical; dirty per slot $d)"
    else
        fail "ours -> kernel: dirty chunks per slot $d; $cmp"
    fi
}

# ---------------------------------------------------------------- phase 5: heartbeat legs
# A plain array served alone (lock manager local) on this host keeps its multi-host
# heartbeat in the first 4 KiB of each leg; kernel md (in a guest) assembles the legs
# of a serve that died mid-write, resyncs them and reads what it acknowledged, and
# leaves the heartbeat block alone.
phase5() {
    log "phase 5: kernel md assembles legs that carry our multi-host heartbeat"
    new_legs
    local blk="--block-size 131072 --blocks 32" sock="$W/p5.sock" pid hb
    "$MD_BIN" create --assume-clean --bitmap-chunk 1M "$W/leg0.img" "$W/leg1.img" >/dev/null ||
        { fail "phase 5: create a plain array"; return; }
    RUST_LOG=info "$MD_BIN" serve --socket "$sock" "$W/leg0.img" "$W/leg1.img" </dev/null >"$W/p5.log" 2>&1 &
    pid=$!
    for _ in $(seq 200); do grep -q "serving array" "$W/p5.log" && break; sleep 0.1; done
    if ! "$IO_BIN" write "$sock" --seed 21 --first 0 $blk >/dev/null; then
        fail "phase 5: writes through our serve ($(tail -5 "$W/p5.log"))"
        kill -9 "$pid" 2>/dev/null
        return
    fi
    kill -9 "$pid"
    wait "$pid" 2>/dev/null || true
    hb=$(head -c 4096 "$W/leg0.img" | md5sum)
    if [ "$(head -c 8 "$W/leg0.img")" != VUMDHB01 ] || [ "$(head -c 8 "$W/leg1.img")" != VUMDHB01 ]; then
        fail "phase 5: no heartbeat block on the legs"
        return
    fi
    start_node 1 1 hubport,id=n0,hubid=0
    wait_ready 1 || { fail "phase 5: guest boot"; return; }
    if on 1 "mdadm --stop --scan >/dev/null 2>&1; mdadm --assemble --run /dev/md0 /dev/vdc /dev/vdd >/dev/null 2>&1 && grep -A1 '^md0 : active raid1' /proc/mdstat | grep -q '\[UU\]'" 120 &&
        on 1 "mdadm -E /dev/vdc | grep -q 'Raid Level : raid1' && mdadm -X /dev/vdc | grep -q 'Magic : 6d746962'" 60 &&
        on 1 "guest_io verify /dev/md0 --seed 21 --first 0 $blk --acked 32" 300 | sed 's/^/    node1| /'; then
        pass "kernel md assembles legs with our heartbeat in their first 4 KiB ([UU]) and reads every block our serve acknowledged"
    else
        fail "phase 5: kernel md on heartbeat legs ($(on 1 'cat /proc/mdstat; dmesg | tail -20' 30))"
    fi
    on 1 'mdadm --stop /dev/md0' 120 >/dev/null || fail "phase 5: mdadm --stop"
    stop_nodes
    if [ "$(head -c 4096 "$W/leg0.img" | md5sum)" = "$hb" ]; then
        pass "kernel md left the heartbeat block as it was"
    else
        fail "kernel md changed the first 4 KiB of a leg"
    fi
}

for p in $PHASES; do
    "phase$p"
    if [ $fail_logs = 1 ]; then guest_logs; fail_logs=0; fi
    stop_nodes
done
log "done"
