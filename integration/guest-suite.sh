#!/usr/bin/env bash
# Guest integration suite: Linux guests under QEMU (TCG) on a vhost-user-md disk.
#
# usage: integration/guest-suite.sh [TEST...]        (default: all tests, in this order)
#   io-q1          1 queue: fio randwrite+verify (2 jobs), ext4 (mkfs, files, sync, remount, md5,
#                  e2fsck), blkdiscard and blkdiscard -z, flush; then on the host, after the
#                  backend's clean shutdown: both legs clean and consistent (examine), data areas
#                  byte-identical, the guest's checksum of the first MiBs equals the legs'
#   io-q4          the same with 4 queues, 4 vCPUs and 4 fio jobs (one per CPU and queue)
#   leg-fail       `manage fail` of leg B while the guest runs fio verify: no guest I/O error, the
#                  same fio keeps writing, status degraded; `manage re-add` once the guest is
#                  idle: recovery ends (not degraded); fio verify again; legs identical at the end
#   backend-restart kill -9 of the backend while the guest is idle, restart on the same socket;
#                  QEMU reconnects (-chardev socket,reconnect-ms=1000) and the guest's I/O goes on
#                  (see test_backend_restart for what is asserted)
#   backend-crash  kill -9 of the backend while the guest's fio verify has writes in flight (a
#                  fault drill stalls one leg's writes past 176 MiB, so some are), restart on
#                  the same socket: QEMU hands the inflight buffer (INFLIGHT_SHMFD) to the new
#                  backend, which resubmits them; fio verifies every block, no guest I/O error
#   libvirt        libvirt as operators run it: the domain in integration/libvirt/vhost-user-md-tcg.xml
#                  (vhostuser disk with 2 queues and reconnect, memfd shared memory, TCG) started
#                  with virsh on Debian's libvirtd (started here, with virtlogd, unless one
#                  answers already); the guest runs the io test; legs checked as in io-q1
#   readd-under-load  like leg-fail, but the re-add happens while a second fio verify writes
#                  the chunks the recovery copies (writes to a chunk under recovery wait for it
#                  without stalling the queue)
#   migrate        live migration between two QEMUs on one host: node 1 and node 2 (two serve
#                  processes over lockd) on the same legs; the guest writes and reads back
#                  numbered blocks the whole time (integration/guest/migrate.sh); migrate to
#                  node 2 (QMP), check every block, resume the source (QMP cont): its writes
#                  fail, node 1's writer role is refused; migrate back to a third QEMU on node 1
#                  and kill -9 node 2 right after the switchover (node 1 recovers its slot); the
#                  source's dirty log is watched (integration/tools/vu-log-watch.py) and must have
#                  pages marked, the used ring's page among them; at the end every block verifies
#                  in the guest and on both legs, no STALE block and no guest I/O error anywhere.
#                  Then the same guest and migrations on two qemu-storage-daemon exports of one
#                  file, for comparison. Records total time and downtime (query-migrate).
#
# Environment:
#   VUMD                 backend binary (default target/release/vhost-user-md)
#   VUMD_IMAGES          directory with vmlinuz and initrd.img from vm-images/build.sh
#                        (default: built or reused in ${VUMD_IMAGE_CACHE:-/var/cache/vhost-user-md-images})
#   VUMD_GUEST_RESULTS   results directory (default target/guest-tests); one subdirectory per
#                        test with guest.log (serial console), backend*.log, qemu.log, test.log.
#                        Leg images and the test's initramfs are deleted when the test passes.
#   VUMD_GUEST_TEST_TIMEOUT  seconds per test before it is killed (default 300)
#
# Every test runs in its own process group under a deadline; when it ends (or times out) the
# whole group is killed, so no QEMU or backend outlives its test. For each failing test the
# suite prints the failed checks and the tails of the guest serial log and the backend log.
# The last line is "N passed, N failed"; the exit code is non-zero if any test failed.
# QEMU: always -accel tcg -cpu max; guest RAM is a shared memfd (the backend maps it).
set -uo pipefail
SELF=$(readlink -f "$0")
ROOT=$(cd "$(dirname "$SELF")/.." && pwd)
GUEST_DIR=$ROOT/integration/guest
VUMD=${VUMD:-$ROOT/target/release/vhost-user-md}
RESULTS=${VUMD_GUEST_RESULTS:-$ROOT/target/guest-tests}
TEST_TIMEOUT=${VUMD_GUEST_TEST_TIMEOUT:-300}
ALL_TESTS="io-q1 io-q4 leg-fail readd-under-load backend-restart backend-crash migrate libvirt"
LEG_SIZE=256M
GUEST_MEM=512M

now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- inside one test (--one)
# Runs in its own process group; output goes to $D/test.log.
ok() { echo "ok   $*"; }
fail() { echo "FAIL $*"; FAILS=$((FAILS + 1)); }
info() { echo "info $*"; }
note() { echo "note $*"; } # printed by the suite under the test's PASS/FAIL line
check() { # check WHAT COMMAND...
    local what=$1
    shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}

cleanup_one() {
    [ -n "${DOMAIN:-}" ] && timeout --foreground 30 virsh -c qemu:///system destroy "$DOMAIN" > /dev/null 2>&1
    [ -n "${QPID:-}" ] && kill -KILL "$QPID" 2>/dev/null
    [ -n "${BPID:-}" ] && kill -KILL "$BPID" 2>/dev/null
    [ -n "${DAEMONS:-}" ] && kill -TERM $DAEMONS 2>/dev/null
    [ -n "${KILL_PIDS:-}" ] && kill -KILL $KILL_PIDS 2>/dev/null
    wait 2>/dev/null
}

# start_backend LOGNAME [--create-size SIZE]: serve legs A and B on $SOCK with $QUEUES queues.
start_backend() {
    local name=$1
    shift
    RUST_LOG=${RUST_LOG:-debug} "$VUMD" serve --socket "$SOCK" --queues "$QUEUES" "$@" "$LA" "$LB" \
        > "$D/$name.out" 2> "$D/$name.log" &
    BPID=$!
    # (the sockets appear before the array is assembled: wait for the announcement)
    for _ in $(seq 100); do
        grep -q "serving array" "$D/$name.out" 2>/dev/null && { info "$name up (pid $BPID)"; return 0; }
        kill -0 "$BPID" 2>/dev/null || break
        sleep 0.1
    done
    fail "$name did not start listening on $SOCK"
    return 1
}

# stop_backend: SIGTERM, wait up to 30 s; the clean shutdown must exit 0.
stop_backend() {
    local t0 rc
    t0=$(now)
    kill -TERM "$BPID"
    for _ in $(seq 300); do kill -0 "$BPID" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$BPID" 2>/dev/null; then
        fail "backend still running 30 s after SIGTERM"
        kill -KILL "$BPID"
    fi
    wait "$BPID"
    rc=$?
    BPID=
    check "backend exits 0 after SIGTERM (rc=$rc, $(since "$t0") s)" [ "$rc" = 0 ]
}

# (timeout --foreground keeps the command in the test's process group, so the group kill reaches it)
status_json() { timeout --foreground 10 "$VUMD" status "$SOCK" --format json 2>> "$D/control.log"; }
manage() { # manage OP LEG
    local out rc
    out=$(timeout --foreground 10 "$VUMD" manage "$SOCK" "$1" "$2" 2>&1)
    rc=$?
    info "manage $1 $(basename "$2"): rc=$rc $out"
    return $rc
}

# backend_stacks: every thread's stack of a stuck backend (needs gdb) -> $D/backend-stacks.txt
backend_stacks() {
    command -v gdb >/dev/null || return 0
    timeout --foreground 60 gdb -p "$BPID" -batch -ex 'thread apply all bt' > "$D/backend-stacks.txt" 2>&1
    info "backend thread stacks in $D/backend-stacks.txt; threads waiting in vhost_user_md code:"
    grep -E '^Thread|^#[0-9]+ .* vhost_user_md::(bitmap|raid1|serve|vhost)' "$D/backend-stacks.txt" |
        awk '/^Thread/ { t = $0; next } !seen[t]++ { print "info   " t " -> " $0 }' | cut -c1-220
}

# make_initrd TEST_SCRIPT VAR=VALUE...: the image's initramfs plus a cpio with /test.sh
# (lib.sh + TEST_SCRIPT) and /etc/test.env.
make_initrd() {
    local script=$1
    shift
    local s=$D/test-root
    rm -rf "$s"
    mkdir -p "$s/etc"
    cat "$GUEST_DIR/lib.sh" "$GUEST_DIR/$script" > "$s/test.sh"
    printf '%s\n' "$@" > "$s/etc/test.env"
    (cd "$s" && find . | LC_ALL=C sort | cpio -o -H newc --quiet) > "$D/test.cpio"
    cat "$IMAGES/initrd.img" "$D/test.cpio" > "$D/initrd.img"
}

# tcg_accel SMP: the -accel value for a guest with SMP vCPUs. More vCPUs than this machine has
# cores run on one TCG thread: with a thread per vCPU (MTTCG) a guest with 4 vCPUs on 2 host
# cores stalled once in CI (the guest's RCU: "timer wakeup didn't happen ... Possible timer
# handling issue on cpu=1", and its I/O stopped for good). One thread runs every vCPU in turn
# (and was faster here: 23-26 s against 27-43 s); the backend still gets the four queues'
# requests in flight together.
tcg_accel() {
    if [ "$1" -gt "$(nproc)" ]; then echo "tcg,thread=single"; else echo tcg; fi
}

# start_qemu SMP [CHARDEV_OPTIONS]: boots the guest on $SOCK with $QUEUES queues, in the
# background (wait_qemu bounds its life; it stays in the test's process group, so it is killed
# with the test). ttyS0 -> guest.log; ttyS1 <- $D/ctl.in (send_guest).
start_qemu() {
    local smp=$1 chopts=${2:-}
    rm -f "$D/ctl.in" "$D/ctl.out"
    mkfifo "$D/ctl.in"
    : > "$D/ctl.out"
    : > "$D/guest.log"
    qemu-system-x86_64 -accel "$(tcg_accel "$smp")" -cpu max -smp "$smp" -m $GUEST_MEM \
        -object memory-backend-memfd,id=mem,size=$GUEST_MEM,share=on -machine q35,memory-backend=mem \
        -chardev "socket,id=vumd0,path=$SOCK$chopts" \
        -device vhost-user-blk-pci,chardev=vumd0,num-queues="$QUEUES" \
        -kernel "$IMAGES/vmlinuz" -initrd "$D/initrd.img" \
        -append "console=ttyS0 panic=-1 loglevel=4" \
        -display none -monitor none -no-reboot \
        -serial "file:$D/guest.log" -chardev "pipe,id=ctl,path=$D/ctl" -serial chardev:ctl \
        > "$D/qemu.log" 2>&1 &
    QPID=$!
    QEMU_T0=$(now)
    info "qemu started (pid $QPID, $smp vCPUs, $QUEUES queues${chopts:+, $chopts})"
}

# glog: the guest's serial log without the console's carriage returns.
glog() { tr -d '\r' < "$D/guest.log"; }
glog_has() { glog | grep -aqE "$1"; }

# wait_guest REGEX TIMEOUT: wait until a guest.log line matches; fails if QEMU exits first.
wait_guest() {
    local re=$1 end=$(($(date +%s) + $2))
    while [ "$(date +%s)" -lt "$end" ]; do
        glog | grep -aqE "$re" && return 0
        kill -0 "$QPID" 2>/dev/null || { glog | grep -aqE "$re"; return; }
        sleep 0.2
    done
    return 1
}

# send_guest NAME: answer the guest's wait_host NAME (it reads ttyS1).
send_guest() {
    timeout --foreground 5 sh -c 'echo "$1" > "$2"' sh "$1" "$D/ctl.in" || fail "cannot write to the guest's ttyS1"
}

# wait_qemu TIMEOUT: the guest powers off by itself when its test script ends.
wait_qemu() {
    local rc
    for _ in $(seq $(($1 * 5))); do kill -0 "$QPID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$QPID" 2>/dev/null; then
        fail "guest did not power off within $1 s"
        kill -KILL "$QPID"
    fi
    wait "$QPID"
    rc=$?
    QPID=
    info "qemu exited rc=$rc after $(since "$QEMU_T0") s;" \
        "guest $(glog | grep -ao 'T_INIT_DONE.*') $(glog | grep -ao 'T_END.*')"
    [ -s "$D/qemu.log" ] && sed 's/^/info qemu: /' "$D/qemu.log"
    return 0
}

# guest_results: the guest's own checks, its steps, and its exit code.
guest_results() {
    local l
    info "guest steps (s): $(glog | grep -a '^T_STEP' | cut -d' ' -f2- | tr '\n' ';')"
    glog | grep -aE '^T_(INFO|FIO|HCTX|DISK_MD5|ERRORS|DMESG)' | sed 's/^/info guest: /'
    while IFS= read -r l; do ok "guest: ${l#T_OK }"; done < <(glog | grep -a '^T_OK')
    while IFS= read -r l; do fail "guest: ${l#T_FAIL }"; done < <(glog | grep -a '^T_FAIL')
    check "guest test script exit code 0" glog_has '^T_TEST_RC=0$'
}

# data_area LEG: the guest-visible bytes of a leg (from the superblock's data_offset).
data_area() {
    local leg=$1 doff size
    doff=$(jq -r --arg l "$leg" '.legs[] | select(.leg == $l) | .superblock.data_offset' "$D/examine.json")
    size=$(jq -r --arg l "$leg" '.legs[] | select(.leg == $l) | .superblock.data_size' "$D/examine.json")
    dd if="$leg" bs=1M iflag=skip_bytes,count_bytes skip=$((doff * 512)) count=$((size * 512)) 2>/dev/null
}

# check_legs: after the backend stopped: both legs clean and one consistent array (examine),
# data areas byte-identical, and (if the guest printed T_DISK_MD5) the guest's checksum.
check_legs() {
    "$VUMD" examine "$LA" "$LB" > "$D/examine.txt" 2>&1
    "$VUMD" examine --json "$LA" "$LB" > "$D/examine.json" 2>> "$D/examine.txt"
    local states
    states=$(jq -r '[.legs[].superblock.state] | join(",")' "$D/examine.json")
    check "examine: both legs clean ($states)" [ "$states" = clean,clean ]
    check "examine: the legs form one consistent array" \
        [ "$(jq -r '.array.consistent' "$D/examine.json")" = true ]
    info "examine: events $(jq -r '[.legs[].superblock.events] | join(",")' "$D/examine.json")," \
        "array_state $(jq -r '[.legs[].superblock.array_state] | join(",")' "$D/examine.json")," \
        "problems $(jq -c '.array.problems' "$D/examine.json")"
    check "leg A and leg B data areas byte-identical" cmp -s <(data_area "$LA") <(data_area "$LB")
    local g mib
    g=$(glog | grep -a '^T_DISK_MD5' | head -1)
    if [ -n "$g" ]; then
        mib=${g##*mib=}
        set -- $g
        check "guest md5 of the first $mib MiB equals leg A's" \
            [ "$2" = "$(data_area "$LA" | head -c $((mib * 1048576)) | md5sum | cut -d' ' -f1)" ]
    fi
}

# zeroes_on_legs MIB_OFFSET: 1 MiB at that guest offset is zero on both legs.
zeroes_on_legs() {
    local leg
    for leg in "$LA" "$LB"; do
        cmp -s <(data_area "$leg" | tail -c +$(($1 * 1048576 + 1)) | head -c 1048576) \
            <(head -c 1048576 /dev/zero) || return 1
    done
}

# ---- tests

# io-q1 / io-q4
test_io() {
    QUEUES=$1
    local jobs=$((QUEUES > 1 ? QUEUES : 2))
    make_initrd io.sh "QUEUES=$QUEUES" "FIO_JOBS=$jobs" "FIO_SIZE=$((192 / jobs))M" "MD5_MIB=32"
    start_backend backend --create-size $LEG_SIZE || return
    start_qemu "$QUEUES"
    wait_qemu 240
    guest_results
    check "guest saw $QUEUES hardware queue(s)" glog_has "^T_OK blk-mq hardware queues: $QUEUES,"
    info "requests completed by the backend: $(status_json | jq -r .requests_completed)"
    stop_backend
    check_legs
    check "write-zeroes range is zero on both legs" zeroes_on_legs 204
}

# leg-fail: `manage fail` of leg B while the guest runs fio verify; `manage re-add` once the
# guest is idle, then fio verify again on the rebuilt mirror.
# readd-under-load (test_leg_fail 1): the re-add happens while the guest's second fio verify
# writes the chunks the recovery copies.
test_leg_fail() {
    local under_load=${1:-0}
    QUEUES=2
    make_initrd leg-fail.sh "FIO_SIZE=96M" "FIO_SIZE2=48M" "READD_UNDER_LOAD=$under_load" "FIO2_IODEPTH=$((under_load ? 32 : 8))"
    start_backend backend --create-size $LEG_SIZE || return
    start_qemu 2
    if ! wait_guest '^T_FIO_RUNNING fail' 90; then
        fail "guest never started fio"
        wait_qemu 5
        return
    fi
    sleep 1 # fio writes to both legs for a while
    check "manage fail leg B during guest fio" manage fail "$LB"
    local s n
    s=$(status_json)
    check "status: degraded after fail" [ "$(jq -r .degraded <<<"$s")" = true ]
    check "status: leg B faulty" [ "$(jq -r --arg l "$LB" '.legs[] | select(.name == $l) | .state' <<<"$s")" = faulty ]
    wait_guest '^T_WAIT leg-failed' 30 && send_guest leg-failed
    check "guest fio was still running when leg B failed" wait_guest '^T_FIO_STILL_RUNNING fail' 30
    wait_guest '^T_WRITES_AFTER_FAIL' 180
    n=$(glog | sed -n 's/^T_WRITES_AFTER_FAIL //p')
    check "the same guest fio wrote after leg B failed (${n:-?} write requests)" [ "${n:-0}" -gt 0 ]
    local ready='^T_WAIT recovered'
    [ "$under_load" = 1 ] && ready='^T_FIO_RUNNING readd'
    if ! wait_guest "$ready" 180; then
        fail "guest did not get to the re-add"
        wait_qemu 5
        return
    fi
    check "status: still degraded" [ "$(status_json | jq -r .degraded)" = true ]
    check "manage re-add leg B$([ "$under_load" = 1 ] && echo ' during guest fio')" manage re-add "$LB"
    local t0 deg=true
    t0=$(now)
    for _ in $(seq 300); do
        s=$(status_json)
        deg=$(jq -r .degraded <<<"$s")
        [ "$deg" = false ] && break
        sleep 0.2
    done
    info "status after the re-add: $(jq -c '{degraded, legs: [.legs[] | .state], resync, bitmap_dirty}' <<<"$s")"
    if [ "$deg" != false ]; then
        fail "recovery did not finish within 60 s"
        backend_stacks
        return
    fi
    ok "recovery finished ($(since "$t0") s)"
    note "re-add: recovery copied $(($(jq -r .resync.bytes_copied <<<"$s") / 1048576)) MiB in $(since "$t0") s"
    wait_guest '^T_WAIT recovered' 30 && send_guest recovered
    [ "$under_load" = 1 ] && wait_guest '^T_FIO_(STILL_RUNNING|FINISHED_EARLY) readd' 30 &&
        info "guest fio during the re-add: $(glog | grep -aoE 'T_FIO_(STILL_RUNNING|FINISHED_EARLY) readd') when the recovery ended"
    wait_qemu 120
    guest_results
    stop_backend
    check_legs
}

# backend-restart: kill -9 of the backend while the guest is idle, then a new backend on the
# same socket. Observed with QEMU 10.0.2 and reconnect-ms=1000, and asserted below: QEMU
# survives the backend's death (it logs "Failed to set msg fds" and "vhost VQ 0 ring restore
# failed: -22" as it stops the device on the dead connection, then "Connection refused" while
# nothing listens), reconnects within about a second of the restart and replays the
# vhost-user set-up (features, memory table, vrings) on the new connection; the guest notices
# nothing: data written before the kill reads back intact, new writes and a fio verify pass,
# the kernel logs no I/O error. The new backend first resyncs the chunks the killed one left
# dirty in the bitmap (if the bitmap daemon had not cleared them yet).
test_backend_restart() {
    QUEUES=1
    make_initrd restart.sh "FIO_SIZE=16M"
    start_backend backend --create-size $LEG_SIZE || return
    start_qemu 1 ",reconnect-ms=1000"
    if ! wait_guest '^T_WAIT backend-restarted' 120; then
        fail "guest did not finish its first writes"
        wait_qemu 5
        return
    fi
    info "backend requests completed before the kill: $(status_json | jq -r .requests_completed)"
    kill -KILL "$BPID"
    wait "$BPID" 2>/dev/null
    info "backend killed with SIGKILL"
    BPID=
    sleep 2 # the guest stays idle while no backend runs
    check "QEMU survives the backend's death" kill -0 "$QPID"
    start_backend backend2 || return
    local t0
    t0=$(now)
    for _ in $(seq 100); do grep -q 'front-end connected' "$D/backend2.log" && break; sleep 0.1; done
    check "QEMU reconnected to the new backend ($(since "$t0") s)" grep -q 'front-end connected' "$D/backend2.log"
    local reconnect_s
    reconnect_s=$(since "$t0")
    info "new backend: $(grep -o 'assembled: .*' "$D/backend2.log")"
    sleep 1
    send_guest backend-restarted
    if ! wait_guest '^T_PHASE2_DONE' 90; then
        fail "guest I/O after the restart did not finish within 90 s"
        glog | grep -a -A3 'T_GOT backend-restarted' | sed 's/^/info guest: /'
    fi
    wait_qemu 60
    guest_results
    info "backend requests completed after the restart: $(status_json | jq -r .requests_completed)"
    stop_backend
    check_legs
    [ "$FAILS" = 0 ] && note "observed: QEMU reconnected ${reconnect_s} s after the new backend started;" \
        "the guest's I/O resumed (earlier data intact, new writes and fio verify pass, no I/O error)"
}

# backend-crash: the guest's fio randwrite+verify writes 64-192 MiB; the first backend runs with
# a fault drill that blocks leg B's writes at or beyond leg byte 176 MiB, so the first fio write
# there stalls the queue with that write and the ones taken with it in flight. Then kill -9, a
# new backend without the drill; QEMU reconnects, hands it the inflight buffer and restarts the
# ring at the used index; the new backend resubmits the heads still marked (asserted from its
# log). fio must finish with every block verified, the kernel must log no I/O error, and the
# legs end identical.
test_backend_crash() {
    QUEUES=1
    make_initrd crash.sh "FIO_SIZE=128M"
    start_backend backend --create-size $LEG_SIZE --inject-fault 1:stall-writes-from=$((176 * 1048576)) || return
    start_qemu 1 ",reconnect-ms=1000"
    if ! wait_guest '^T_FIO_RUNNING crash' 120; then
        fail "guest never started fio"
        wait_qemu 5
        return
    fi
    local t0
    t0=$(now)
    for _ in $(seq 600); do grep -q 'stalls until the process ends' "$D/backend.log" && break; sleep 0.1; done
    if ! check "a guest write stalled on leg B ($(since "$t0") s after fio started)"         grep -q 'stalls until the process ends' "$D/backend.log"; then
        wait_qemu 5
        return
    fi
    sleep 1 # more requests pile up in the ring behind the stalled one
    info "backend requests completed before the kill: $(status_json | jq -r .requests_completed)"
    kill -KILL "$BPID"
    wait "$BPID" 2>/dev/null
    info "backend killed with SIGKILL"
    BPID=
    sleep 1
    check "QEMU survives the backend's death" kill -0 "$QPID"
    start_backend backend2 || return
    t0=$(now)
    for _ in $(seq 100); do grep -q 'front-end connected' "$D/backend2.log" && break; sleep 0.1; done
    check "QEMU reconnected to the new backend ($(since "$t0") s)" grep -q 'front-end connected' "$D/backend2.log"
    local n
    for _ in $(seq 100); do grep -q 'resubmitting [0-9]* inflight requests' "$D/backend2.log" && break; sleep 0.1; done
    n=$(sed -n 's/.*resubmitting \([0-9]*\) inflight requests.*/\1/p' "$D/backend2.log" | head -1)
    check "the new backend resubmitted the requests in flight at the kill (${n:-none})" [ "${n:-0}" -gt 0 ]
    wait_qemu 180
    guest_results
    info "backend requests completed after the restart: $(status_json | jq -r .requests_completed)"
    stop_backend
    check_legs
    [ "$FAILS" = 0 ] && note "resubmitted ${n} requests in flight at the kill; fio verified every block, no guest I/O error"
}

# libvirt: the repo's example domain XML, booted with virsh.
test_libvirt() {
    QUEUES=2
    local v="virsh -c qemu:///system"
    if ! timeout --foreground 10 $v version > /dev/null 2>&1; then
        # no running libvirtd: start virtlogd and libvirtd here (in the test's process group)
        command -v libvirtd > /dev/null || { fail "libvirtd not installed (ci/guest-tests.sh installs it)"; return; }
        /usr/sbin/virtlogd > "$D/virtlogd.log" 2>&1 &
        DAEMONS="$!"
        /usr/sbin/libvirtd > "$D/libvirtd.log" 2>&1 &
        DAEMONS="$DAEMONS $!"
        for _ in $(seq 100); do timeout --foreground 10 $v version > /dev/null 2>&1 && break; sleep 0.2; done
    fi
    check "libvirtd answers ($(timeout --foreground 10 $v version 2>/dev/null | grep -i 'running hypervisor' | xargs))" \
        timeout --foreground 10 $v version
    make_initrd io.sh "QUEUES=$QUEUES" "FIO_JOBS=2" "FIO_SIZE=48M" "MD5_MIB=32"
    # QEMU runs as libvirt's unprivileged user: it must be able to connect to the socket
    # (0600 and root's by default)
    local owner=
    id -u libvirt-qemu > /dev/null 2>&1 && owner="--socket-owner libvirt-qemu"
    start_backend backend --create-size $LEG_SIZE $owner || return
    local name=vumd-guest-suite-$$
    DOMAIN=$name
    sed -e "s|@NAME@|$name|; s|@KERNEL@|$IMAGES/vmlinuz|; s|@INITRD@|$D/initrd.img|" \
        -e "s|@SOCKET@|$SOCK|; s|@SERIAL_LOG@|$D/guest.log|" \
        "$ROOT/integration/libvirt/vhost-user-md-tcg.xml" > "$D/domain.xml"
    local t0
    t0=$(now)
    if ! check "virsh create (the repo's example domain XML)" \
        timeout --foreground 60 $v create "$D/domain.xml"; then
        DOMAIN=
        return
    fi
    for _ in $(seq 900); do
        timeout --foreground 10 $v domstate "$DOMAIN" > /dev/null 2>&1 || break
        sleep 0.2
    done
    if timeout --foreground 10 $v domstate "$DOMAIN" > /dev/null 2>&1; then
        fail "the domain did not power off within 180 s"
    else
        DOMAIN=
        info "domain ran $(since "$t0") s;" \
            "guest $(glog | grep -ao 'T_INIT_DONE.*') $(glog | grep -ao 'T_END.*')"
    fi
    cp "/var/log/libvirt/qemu/$name.log" "$D/libvirt-qemu.log" 2>/dev/null &&
        info "libvirt's QEMU: $(grep -oE -- '-accel [a-z]+|-cpu [a-z]+|memory-backend-memfd|"share":true|reconnect-ms=[0-9]+|"num-queues":[0-9]+' \
            "$D/libvirt-qemu.log" | sort -u | tr '\n' ' ')"
    guest_results
    check "guest saw $QUEUES hardware queues" glog_has "^T_OK blk-mq hardware queues: $QUEUES,"
    stop_backend
    check_legs
}

# ---- migrate
QMP_PY=$ROOT/integration/tools/qmp.py
WATCH_PY=$ROOT/integration/tools/vu-log-watch.py
qmp() { # qmp NAME CMD...: QMP commands to VM NAME, one JSON answer per line
    local sock=$D/qmp-$1.sock
    shift
    timeout --foreground 60 python3 "$QMP_PY" "$sock" "$@"
}
declare -A VMPID
vlog() { tr -d '\r' < "$D/guest-$1.log" 2>/dev/null; }

# spawn NAME COMMAND...: a helper process (killed when the test ends), output to $D/NAME.log.
spawn() {
    local name=$1
    shift
    "$@" > "$D/$name.log" 2>&1 &
    SPAWNED=$!
    KILL_PIDS="$KILL_PIDS $SPAWNED"
}

wait_sock() { # wait_sock PATH PID: until PATH is a socket (10 s), while PID lives
    for _ in $(seq 100); do
        [ -S "$1" ] && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

wait_serving() { # wait_serving LOG PID: until serve's LOG says it serves (10 s), while PID lives
    for _ in $(seq 100); do
        grep -q "serving array" "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# start_node NAME: serve node NAME on $D/NAME.sock over lockd.
start_node() {
    RUST_LOG=${RUST_LOG:-info} spawn "backend-$1" "$VUMD" serve --socket "$D/$1.sock" \
        --lock-manager "lockd:$D/lockd.sock" "$LA" "$LB"
    NODEPID[$1]=$SPAWNED
    if wait_serving "$D/backend-$1.log" "$SPAWNED"; then
        info "node $1 up (pid $SPAWNED)"
    else
        fail "node $1 did not start"
        return 1
    fi
}
declare -A NODEPID
node_status() { timeout --foreground 10 "$VUMD" status "$D/$1.sock" --format json 2>> "$D/control.log"; }
node_wait() { # node_wait NAME JQ_CONDITION TIMEOUT: until status matches
    local end=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt "$end" ]; do
        node_status "$1" | jq -e "$2" > /dev/null 2>&1 && return 0
        sleep 0.2
    done
    return 1
}

# watch_proxy NAME BACKEND: a dirty-log watcher (it logs every message) listening on
# $D/pNAME.sock in front of $D/BACKEND.sock; what it saw goes to $D/watch-NAME.json.
watch_proxy() {
    spawn "proxy-$1" python3 "$WATCH_PY" "$D/p$1.sock" "$D/$2.sock" "$D/watch-$1.json" "$D/vu-$1.log"
    wait_sock "$D/p$1.sock" "$SPAWNED" || { fail "proxy $1 did not start"; return 1; }
}

# start_vm NAME SOCKET [QEMU ARGS]: the test guest on that vhost-user socket; serial log
# guest-NAME.log, host->guest pipe ctl-NAME, QMP qmp-NAME.sock.
start_vm() {
    local name=$1 sock=$2
    shift 2
    rm -f "$D/ctl-$name.in" "$D/ctl-$name.out"
    mkfifo "$D/ctl-$name.in"
    : > "$D/ctl-$name.out"
    : > "$D/guest-$name.log"
    timeout --foreground 600 qemu-system-x86_64 -accel tcg -cpu max -smp 1 -m $GUEST_MEM \
        -object memory-backend-memfd,id=mem,size=$GUEST_MEM,share=on -machine q35,memory-backend=mem \
        -chardev "socket,id=vumd0,path=$sock" -device vhost-user-blk-pci,chardev=vumd0,num-queues=1 \
        -kernel "$IMAGES/vmlinuz" -initrd "$D/initrd.img" -append "console=ttyS0 panic=-1 loglevel=4" \
        -display none -monitor none -no-reboot \
        -serial "file:$D/guest-$name.log" -chardev "pipe,id=ctl,path=$D/ctl-$name" -serial chardev:ctl \
        -qmp "unix:$D/qmp-$name.sock,server=on,wait=off" "$@" > "$D/qemu-$name.log" 2>&1 &
    VMPID[$name]=$!
    KILL_PIDS="$KILL_PIDS $!"
    wait_sock "$D/qmp-$name.sock" "$!" || fail "VM $name: no QMP socket"
    info "VM $name started on $(basename "$sock") (pid $!${*:+, $*})"
}
send_vm() { timeout --foreground 5 sh -c 'echo "$1" > "$2"' sh "$2" "$D/ctl-$1.in" || fail "cannot write to VM $1's ttyS1"; }
wait_vm() { # wait_vm NAME REGEX TIMEOUT: a line of VM NAME's serial log matches
    local end=$(($(date +%s) + $3))
    while [ "$(date +%s)" -lt "$end" ]; do
        vlog "$1" | grep -aqE "$2" && return 0
        kill -0 "${VMPID[$1]}" 2>/dev/null || { vlog "$1" | grep -aqE "$2"; return; }
        sleep 0.2
    done
    return 1
}
last_block() { vlog "$1" | sed -n 's/^W \([0-9]*\) .*/\1/p' | tail -1; }
wait_blocks() { # wait_blocks NAME N TIMEOUT: the guest on VM NAME wrote block N
    local end=$(($(date +%s) + $3)) b
    while [ "$(date +%s)" -lt "$end" ]; do
        b=$(last_block "$1")
        [ "${b:-0}" -ge "$2" ] && return 0
        kill -0 "${VMPID[$1]}" 2>/dev/null || return 1
        sleep 0.2
    done
    return 1
}
quit_vm() {
    qmp "$1" quit > /dev/null 2>&1
    for _ in $(seq 100); do kill -0 "${VMPID[$1]}" 2>/dev/null || break; sleep 0.1; done
    # (the pid is QEMU's `timeout` wrapper: SIGTERM reaches QEMU through it)
    kill -TERM "${VMPID[$1]}" 2>/dev/null && sleep 1
    kill -KILL "${VMPID[$1]}" 2>/dev/null
    wait "${VMPID[$1]}" 2>/dev/null
    info "VM $1 ended"
}

# migrate SRC DST LABEL: live-migrates VM SRC to VM DST (started with -incoming defer);
# checks completion; MIG_TOTAL / MIG_DOWN (ms) from query-migrate.
migrate() {
    local src=$1 dst=$2 label=$3 r st s t0
    MIG_TOTAL= MIG_DOWN=
    qmp "$dst" "migrate-incoming {\"uri\": \"unix:$D/mig-$dst.sock\"}" > /dev/null
    t0=$(now)
    r=$(qmp "$src" 'migrate-set-parameters {"max-bandwidth": 4294967296, "downtime-limit": 300}' \
        "migrate {\"uri\": \"unix:$D/mig-$dst.sock\"}" | tail -1)
    if [ "$(jq -r '.error.desc // empty' <<<"$r")" != "" ]; then
        fail "$label: migrate refused: $r"
        return 1
    fi
    for _ in $(seq 600); do
        st=$(qmp "$src" query-migrate | tail -1)
        s=$(jq -r '.return.status // "none"' <<<"$st")
        case $s in completed | failed | cancelled | none) break ;; esac
        sleep 0.1
    done
    info "$label: $(jq -c '.return | {status, "total-time", downtime, "setup-time", ram_mb: ((.ram.transferred // 0) / 1048576 | floor), dirty_syncs: .ram["dirty-sync-count"]}' <<<"$st")"
    if ! check "$label: migration completed ($s after $(since "$t0") s)" [ "$s" = completed ]; then
        info "$label: $(jq -c '.return["error-desc"] // empty' <<<"$st")"
        return 1
    fi
    MIG_TOTAL=$(jq -r '.return["total-time"]' <<<"$st")
    MIG_DOWN=$(jq -r '.return.downtime' <<<"$st")
    check "$label: destination runs ($(qmp "$dst" query-status | jq -c -r '.return.status'))" \
        [ "$(qmp "$dst" query-status | jq -r '.return.status')" = running ]
}

# storage_downtime SRC_NODE DST_NODE SRC_VM LABEL: what the migration waited for on the
# storage side, from the nodes' logs (vhost/backend/handover.rs) and the proxy in front of
# the source: the source's drain (GET_VRING_BASE) and release of the writer role, the
# destination's taking of the role and its first request's service; and the wall-clock
# time from the source's GET_VRING_BASE to the destination's first completed request
# (which includes QEMU's own stop-and-copy). Prints a note; sets STORAGE_MS (the storage
# side's share) and VRING_TO_FIRST_MS.
storage_downtime() {
    local out
    out=$(python3 - "$D/backend-$1.log" "$D/backend-$2.log" "$D/vu-$3.log" <<'PY'
import re, sys
src, dst, proxy = (open(p, errors="replace").read().splitlines() for p in sys.argv[1:4])
def last(lines, pat):
    m = None
    for l in lines:
        x = re.search(pat, l)
        if x:
            m = (l, x)
    return m
def secs(hms):
    h, m, s = hms.split(":")
    return int(h) * 3600 + int(m) * 60 + float(s)
stop = last(src, r"queue 0: stopped \(GET_VRING_BASE\) in ([0-9.]+) ms, ([0-9]+) requests")
gave = last(src, r"writer role given back in ([0-9.]+) ms")
took = last(dst, r"queue 0: started; writer role taken in ([0-9.]+) ms")
first = last(dst, r"queue 0: first request since the start ended [0-9.]+ ms after it \(arrived after ([0-9.]+) ms, served in ([0-9.]+) ms\)")
gvb = last(proxy, r"^([0-9:.]+)Z .*GET_VRING_BASE(?! \(reply\))")
if not (stop and gave and took and first):
    print("missing", "stop" if not stop else "", "give-back" if not gave else "",
          "take" if not took else "", "first-request" if not first else "")
    sys.exit(0)
drain, inflight = float(stop[1].group(1)), stop[1].group(2)
give, take = float(gave[1].group(1)), float(took[1].group(1))
arrived, served = float(first[1].group(1)), float(first[1].group(2))
share = drain + give + take + served
wall = "?"
if gvb:
    t_first = re.search(r"T([0-9:.]+)Z", first[0])
    if t_first:
        wall = "%.0f" % ((secs(t_first.group(1)) - secs(gvb[1].group(1))) * 1000)
print("ok %.3f %s source drain (GET_VRING_BASE) %.3f ms with %s request(s) in flight, writer role given back in %.3f ms; destination took the role in %.3f ms and served its first request in %.3f ms (it arrived %.1f ms after the vring start): storage side %.3f ms in all; from the source's GET_VRING_BASE to the destination's first completed request %s ms (QEMU's stop-and-copy included)"
      % (share, wall, drain, inflight, give, take, served, arrived, share, wall))
PY
)
    STORAGE_MS= VRING_TO_FIRST_MS=
    case $out in
    ok*)
        STORAGE_MS=$(awk '{print $2}' <<<"$out")
        VRING_TO_FIRST_MS=$(awk '{print $3}' <<<"$out")
        note "$4 storage: $(cut -d' ' -f4- <<<"$out")"
        ;;
    *) fail "$4: the nodes' logs lack the hand-over timings ($out)" ;;
    esac
}

# watched_log NAME LABEL: the dirty log the proxy in front of a source saw.
jq_ok() { jq -e "$1" "$2" > /dev/null 2>&1; }
watched_log() {
    local w=$D/watch-$1.json
    info "$2: dirty log seen by the proxy: $(cat "$w" 2>/dev/null)"
    check "$2: QEMU switched dirty logging on (LOG_ALL, SET_LOG_BASE, used-ring logging)" \
        jq_ok '.log_all and .log_base > 0 and .vring_log' "$w"
    check "$2: the backend marked guest pages in the dirty log ($(jq -r .pages_seen "$w") pages seen)" \
        jq_ok '.pages_seen > 0' "$w"
    check "$2: the used ring's page was marked ($(jq -c .used_rings "$w"))" \
        jq_ok '(.used_ring_pages_seen | length) > 0 and (.used_ring_pages_seen | length) == (.used_rings | length)' "$w"
}

# legs_bad_blocks LEG N: data area blocks 0..N-1 hold exactly SEQ%08d + zeros; prints the
# number of bad blocks.
legs_bad_blocks() {
    python3 - "$1" "$2" "$(jq -r --arg l "$1" '.legs[] | select(.leg == $l) | .superblock.data_offset' "$D/examine.json")" <<'PY'
import sys
leg, n, doff = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) * 512
bad = 0
with open(leg, "rb") as f:
    f.seek(doff)
    for i in range(n):
        if f.read(4096) != (b"SEQ%08d" % i).ljust(4096, b"\0"):
            bad += 1
print(bad)
PY
}

test_migrate() {
    QUEUES=1
    make_initrd migrate.sh "MAX_BLOCKS=20000"
    local out
    out=$("$VUMD" create --assume-clean --cluster-name vumd-ci --size $LEG_SIZE --bitmap-chunk 4M "$LA" "$LB" 2>&1) ||
        { fail "create: $out"; return; }
    spawn lockd "$VUMD" lockd --socket "$D/lockd.sock"
    wait_sock "$D/lockd.sock" "$SPAWNED" || { fail "lockd did not start"; return; }
    start_node n1 || return
    start_node n2 || return
    # Dirty-log watchers between each QEMU and its node.
    watch_proxy a n1 || return
    watch_proxy b n2 || return

    start_vm a "$D/pa.sock"
    start_vm b "$D/pb.sock" -incoming defer
    if ! wait_blocks a 100 180; then
        fail "the guest on node 1 did not write 100 blocks"
        return
    fi
    check "node 1 holds the writer role" node_wait n1 '.writer_role == "held"' 5
    check "node 2 does not (idle)" node_wait n2 '.writer_role == "idle"' 5

    # 1. node 1 -> node 2
    migrate a b "migration 1 (node 1 -> node 2)" || return
    local t1=$MIG_TOTAL d1=$MIG_DOWN at1 a_lines
    a_lines=$(vlog a | wc -l)
    at1=$(last_block a)
    info "switchover near block ${at1:-?}"
    check "node 1 gave the writer role back" node_wait n1 '.writer_role == "idle"' 10
    check "node 2 took the writer role" node_wait n2 '.writer_role == "held"' 30
    check "the guest goes on writing on node 2" wait_blocks b $((at1 + 100)) 120
    storage_downtime n1 n2 a "migration 1"
    local s1=$STORAGE_MS w1=$VRING_TO_FIRST_MS
    watched_log a "migration 1"
    send_vm b verify
    wait_vm b '^T_MID_VERIFY_' 120
    check "guest on node 2: every block written before and after the migration verifies" \
        wait_vm b '^T_MID_VERIFY_OK' 1

    # 2. the source resumed after the completed migration (stale writer)
    send_vm a stale
    out=$(qmp a cont | tail -1)
    info "cont on the source: $out"
    wait_vm a '^T_(WRITE_ERR [0-9]+ STALE|STALE_WRITTEN)' 60
    sleep 2
    local stale_err stale_ok
    stale_err=$(vlog a | tail -n +$((a_lines + 1)) | grep -ac '^T_WRITE_ERR')
    stale_ok=$(vlog a | grep -ac '^T_STALE_WRITTEN')
    info "resumed source: $stale_err writes failed, $stale_ok STALE blocks written; $(vlog a | grep -a -m1 '^T_STALE_FROM')"
    check "resumed source: its guest's writes fail ($stale_err I/O errors)" [ "$stale_err" -ge 3 ]
    check "resumed source: none of its STALE blocks was written ($stale_ok)" [ "$stale_ok" = 0 ]
    check "resumed source: node 1's writer role is refused" \
        node_wait n1 '.writer_role == "refused" and .writes_refused > 0' 10
    info "node 1: $(node_status n1 | jq -c '{writer_role, writes_refused}')"
    check "node 2 keeps the writer role" node_wait n2 '.writer_role == "held"' 5
    quit_vm a

    # 3. node 2 -> node 1 (a new QEMU), then kill -9 of node 2 right after the switchover
    watch_proxy c n1 || return
    start_vm c "$D/pc.sock" -incoming defer
    local b0
    b0=$(last_block b)
    wait_blocks b $((b0 + 100)) 120 || fail "the guest on node 2 stalled"
    migrate b c "migration 2 (node 2 -> node 1)" || return
    local t2=$MIG_TOTAL d2=$MIG_DOWN
    local slot2
    slot2=$(node_status n2 | jq -r .node_slot)
    kill -KILL "${NODEPID[n2]}"
    info "node 2 (slot $slot2) killed (SIGKILL) right after the switchover"
    quit_vm b
    watched_log b "migration 2"
    check "node 1 took the writer role back" node_wait n1 '.writer_role == "held"' 30
    wait_blocks c $(($(last_block c) + 5)) 60
    storage_downtime n2 n1 b "migration 2"
    local s2=$STORAGE_MS w2=$VRING_TO_FIRST_MS
    check "node 1 saw node 2 die and recovered its slot" \
        node_wait n1 '(.cluster.peers | length) == 0 and .resync.active == false and .resync.remaining_chunks == 0' 120
    info "node 1 after the recovery: $(node_status n1 | jq -c '{resync: .resync | {bytes_copied, remaining_chunks}, bitmap_dirty, degraded}')"
    check "node 1 recovered node 2's slot ($(grep -o "recovered node slot $slot2: .*" "$D/backend-n1.log"))" \
        grep -q "recovered node slot $slot2:" "$D/backend-n1.log"
    local at2
    at2=$(last_block c)
    check "the guest goes on writing on node 1" wait_blocks c $((${at2:-0} + 100)) 120
    send_vm c verify
    wait_vm c '^T_MID_VERIFY_' 120
    check "guest back on node 1: every block verifies" wait_vm c '^T_MID_VERIFY_OK' 1
    send_vm c finish
    local end=$(($(date +%s) + 180))
    while kill -0 "${VMPID[c]}" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 0.2; done
    kill -0 "${VMPID[c]}" 2>/dev/null && fail "the guest did not power off"
    quit_vm c
    cp "$D/guest-c.log" "$D/guest.log"
    local n
    n=$(vlog c | sed -n 's/^T_BLOCKS //p')
    guest_results
    local io_b rb
    rb=$( (vlog a | head -n "$a_lines"; vlog b; vlog c) | grep -ac '^T_READBACK_ERR')
    io_b=$( (vlog a | head -n "$a_lines"; vlog b; vlog c) | grep -ac '^T_WRITE_ERR')
    check "the migrating guest never saw a failed write or a bad read-back ($io_b, $rb)" [ "$io_b$rb" = 00 ]

    # The legs: node 1 stops cleanly; both legs hold every block, nothing STALE.
    kill -TERM "${NODEPID[n1]}"
    wait "${NODEPID[n1]}"
    check "node 1 exits 0 after SIGTERM" [ $? = 0 ]
    "$VUMD" examine --json "$LA" "$LB" > "$D/examine.json" 2>> "$D/examine.txt"
    check "leg A and leg B data areas byte-identical" cmp -s <(data_area "$LA") <(data_area "$LB")
    if [ -n "$n" ]; then
        check "leg A: all $n blocks hold their SEQ record (bad: $(legs_bad_blocks "$LA" "$n"))" \
            [ "$(legs_bad_blocks "$LA" "$n")" = 0 ]
        check "leg B: all $n blocks hold their SEQ record" [ "$(legs_bad_blocks "$LB" "$n")" = 0 ]
    else
        fail "the guest did not report how many blocks it wrote"
    fi
    check "no STALE block on either leg" [ "$(cat "$LA" "$LB" | grep -ac STALE)" = 0 ]
    note "vhost-user-md: migration 1 total ${t1} ms, downtime ${d1} ms; migration 2 total ${t2} ms, downtime ${d2} ms; ${n:-?} blocks"

    # The same guest on qemu-storage-daemon exports of one file, for comparison.
    local f=$D/qsd.img
    truncate -s $LEG_SIZE "$f"
    local q
    for q in q1 q2; do
        spawn "qsd-$q" qemu-storage-daemon \
            --blockdev "driver=file,node-name=f,filename=$f,cache.direct=on,locking=off" \
            --export "type=vhost-user-blk,id=e,node-name=f,addr.type=unix,addr.path=$D/$q.sock,writable=on,num-queues=1"
        wait_sock "$D/$q.sock" "$SPAWNED" || { fail "qemu-storage-daemon $q did not start"; return; }
    done
    # Same topology as above: the same log-watching proxy in front of each source.
    watch_proxy x q1 || return
    watch_proxy y q2 || return
    start_vm x "$D/px.sock"
    start_vm y "$D/py.sock" -incoming defer
    wait_blocks x 100 180 || { fail "qsd: the guest did not write 100 blocks"; return; }
    migrate x y "qsd migration 1" || return
    local qt1=$MIG_TOTAL qd1=$MIG_DOWN
    info "qsd migration 1: dirty log seen by the proxy: $(cat "$D/watch-x.json")"
    quit_vm x
    watch_proxy z q1 || return
    start_vm z "$D/pz.sock" -incoming defer
    b0=$(last_block y)
    wait_blocks y $((b0 + 100)) 120 || fail "qsd: the guest stalled"
    migrate y z "qsd migration 2" || return
    local qt2=$MIG_TOTAL qd2=$MIG_DOWN
    info "qsd migration 2: dirty log seen by the proxy: $(cat "$D/watch-y.json")"
    quit_vm y
    wait_blocks z $(($(last_block z) + 100)) 120
    send_vm z finish
    end=$(($(date +%s) + 180))
    while kill -0 "${VMPID[z]}" 2>/dev/null && [ "$(date +%s)" -lt "$end" ]; do sleep 0.2; done
    quit_vm z
    check "qsd: the guest's checks pass" eval 'vlog z | grep -aq "^T_TEST_RC=0$"'
    note "qemu-storage-daemon: migration 1 total ${qt1} ms, downtime ${qd1} ms; migration 2 total ${qt2} ms, downtime ${qd2} ms"
    echo "MIGRATION_RESULT backend=vhost-user-md total_ms=$t1,$t2 downtime_ms=$d1,$d2 storage_ms=$s1,$s2 gvb_to_first_request_ms=$w1,$w2" >> "$D/migration-times.txt"
    echo "MIGRATION_RESULT backend=qemu-storage-daemon total_ms=$qt1,$qt2 downtime_ms=$qd1,$qd2" >> "$D/migration-times.txt"
    rm -f "$f"
}

run_one() {
    local name=$1
    D=$2
    FAILS=0 QPID="" BPID="" DOMAIN="" DAEMONS="" KILL_PIDS=""
    SOCK=$D/vumd.sock LA=$D/leg-a.img LB=$D/leg-b.img
    trap cleanup_one EXIT
    trap 'exit 143' TERM INT
    case $name in
        io-q1) test_io 1 ;;
        io-q4) test_io 4 ;;
        leg-fail) test_leg_fail 0 ;;
        readd-under-load) test_leg_fail 1 ;;
        backend-restart) test_backend_restart ;;
        backend-crash) test_backend_crash ;;
        migrate) test_migrate ;;
        libvirt) test_libvirt ;;
        *) fail "unknown test $name"; return 1 ;;
    esac
    [ "$FAILS" = 0 ]
}

if [ "${1:-}" = --one ]; then
    run_one "$2" "$3"
    exit
fi

# ---------------------------------------------------------------- the suite
for c in qemu-system-x86_64 jq cpio mkfifo setsid; do
    command -v "$c" >/dev/null || { echo "guest-suite: $c not found (see ci/guest-tests.sh)" >&2; exit 2; }
done
[ -x "$VUMD" ] || { echo "guest-suite: no backend binary at $VUMD (cargo build --release)" >&2; exit 2; }
if [ -z "${VUMD_IMAGES:-}" ]; then
    IMAGES=${VUMD_IMAGE_CACHE:-/var/cache/vhost-user-md-images}
    "$ROOT/vm-images/build.sh" "$IMAGES" || { echo "guest-suite: vm-images/build.sh failed" >&2; exit 2; }
else
    IMAGES=$VUMD_IMAGES
fi
for f in vmlinuz initrd.img; do
    [ -s "$IMAGES/$f" ] || { echo "guest-suite: no $IMAGES/$f (vm-images/build.sh $IMAGES)" >&2; exit 2; }
done
export VUMD IMAGES
TESTS=${*:-$ALL_TESTS}
mkdir -p "$RESULTS"
RESULTS=$(cd "$RESULTS" && pwd)
echo "guest-suite: $(qemu-system-x86_64 --version | head -1); backend $VUMD; results in $RESULTS"

CUR=
trap '[ -n "$CUR" ] && kill -KILL -- "-$CUR" 2>/dev/null; exit 130' INT TERM
passed=0 failed=0
for t in $TESTS; do
    d=$RESULTS/$t
    rm -rf "$d"
    mkdir -p "$d"
    t0=$(now)
    setsid "$BASH" "$SELF" --one "$t" "$d" > "$d/test.log" 2>&1 < /dev/null &
    CUR=$!
    end=$(($(date +%s) + TEST_TIMEOUT))
    timed_out=
    while kill -0 "$CUR" 2>/dev/null; do
        if [ "$(date +%s)" -ge "$end" ]; then
            timed_out=1
            echo "FAIL test timed out after $TEST_TIMEOUT s" >> "$d/test.log"
            kill -TERM -- "-$CUR" 2>/dev/null
            sleep 2
            break
        fi
        sleep 0.5
    done
    wait "$CUR"
    rc=$?
    kill -KILL -- "-$CUR" 2>/dev/null # whatever is left of the test's process group
    CUR=
    [ -n "$timed_out" ] && rc=124
    if [ "$rc" = 0 ]; then
        passed=$((passed + 1))
        echo "PASS $t ($(since "$t0") s)"
        sed -n 's/^note /    /p' "$d/test.log"
        rm -f "$d"/leg-*.img "$d/initrd.img"
    else
        failed=$((failed + 1))
        echo "FAIL $t ($(since "$t0") s, rc=$rc; logs in $d)"
        sed -n 's/^note /    /p' "$d/test.log"
        grep -a '^FAIL' "$d/test.log" | sed 's/^/    /'
        echo "  --- $t: guest serial log (last 40 lines of $d/guest.log)"
        tail -n 40 "$d/guest.log" 2>/dev/null | sed 's/^/    /'
        for b in "$d"/backend*.log; do
            [ -f "$b" ] || continue
            echo "  --- $t: backend log (last 25 lines of $b)"
            tail -n 25 "$b" | sed 's/^/    /'
        done
    fi
done
echo "$passed passed, $failed failed"
[ "$failed" = 0 ]
