#!/usr/bin/env bash
# The Debian package and its systemd units as an operator uses them: a Debian 12 guest
# (QEMU TCG) with systemd as PID 1 installs the .deb that packaging/build-deb.sh makes and
# serves an array from two virtio disks (/dev/vdc, /dev/vdd) with vhost-user-md@.service:
#   - the boot reaches multi-user.target (systemd state "running", no failed unit)
#   - `dpkg -i` installs the package: /usr/bin/vhost-user-md, the units, the man pages
#     (`man vhost-user-md-serve` prints its page)
#   - `vhost-user-md create` makes the array on the two disks; with
#     /etc/vhost-user-md/disk1.conf, `systemctl start vhost-user-md@disk1` returns once the
#     vhost-user socket is up (Type=notify): the unit is active and the socket exists
#   - examples/guest_io writes and verifies blocks through the socket (libblkio);
#     the Prometheus text at http://127.0.0.1:9710/metrics (curl in the guest) is parsed
#     on the host with prometheus_client: the request counters moved by what was written
#     and read
#   - `systemctl stop` leaves the array clean (`examine --json`: both legs clean, in
#     sync, no dirty bitmap bit, one consistent array)
#   - a config with an unknown key (disk2.conf: `queus = 2`) fails the start, the unit is
#     not restarted, and its journal has one line naming the key
#   - two units on one clustered array (vhost-user-md@disk3, @disk4: two nodes of this
#     host) over vhost-user-md-lockd.service, which a Requires= drop-in pulls in: each
#     takes its own node slot and sees the other alive (their metrics), disk4 reads what
#     was written through disk3, and their stop leaves no dirty chunk in any slot
#
# Usage: integration/systemd-guest.sh     (root; ci/dlm-tests.sh installs the host packages)
# Environment:
#   DLM_CACHE    cache of the guest kernel and the debootstrap'ed rootfs, shared with
#                integration/dlm-cluster.sh (see integration/lib/debian-guest.sh)
#   SYSD_WORK    work dir (default: a new /tmp/vumd-sysd.XXXXXX); removed on success
#   SYSD_DEB     a .deb to test instead of building one with packaging/build-deb.sh
#   KDIR         as for integration/dlm-cluster.sh
#   KEEP=1       keep the work dir (logs) even on success
#   SYSD_SHELL=1 boot the guest and install the package, then wait for $SYSD_WORK/stop
#                (drive the guest with integration/dlm-cluster/vmsh.py $SYSD_WORK/cmd.sock)
#   SYSD_SMP     the guest's vCPUs (default 1)
#   SYSD_VM_TIMEOUT  seconds after which QEMU is killed whatever happens (default 900)
# The guest: ttyS0 is the console ($SYSD_WORK/console.log), ttyS1 the command channel
# (systemd-guest/vmsh.service); /dev/vdb (read-only, /opt/vumd) holds the package and guest_io.
# Needs (ci/dlm-tests.sh installs them on Debian 12): qemu-system-x86_64 (run with
# -accel tcg -cpu max), debootstrap, busybox-static, kmod, cpio, e2fsprogs, cargo, and
# python3 with prometheus_client (python3-prometheus-client); what packaging/build-deb.sh
# needs; network access to deb.debian.org on the first run.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "$0: needs root (debootstrap, guest images)" >&2; exit 2; }
ROOT=$(cd "$(dirname "$0")/.." && pwd)
H=$ROOT/integration/systemd-guest
VMSH=$ROOT/integration/dlm-cluster/vmsh.py
GUEST_CACHE=${DLM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vhost-user-md/dlm-cluster}
. "$ROOT/integration/lib/debian-guest.sh"
MODULES="virtio_pci virtio_blk ext4"
VM_TIMEOUT=${SYSD_VM_TIMEOUT:-900}
PORT=9710
PY=
for p in python3 /usr/bin/python3; do
    "$p" -c 'import prometheus_client.parser' 2>/dev/null && { PY=$p; break; }
done
[ -n "$PY" ] || { echo "$0: needs python3 with prometheus_client (apt-get install python3-prometheus-client)" >&2; exit 2; }
W=${SYSD_WORK:-$(mktemp -d /tmp/vumd-sysd.XXXXXX)}
mkdir -p "$W"

T0=$(date +%s.%N)
now() { awk -v a="$(date +%s.%N)" -v b="$T0" 'BEGIN { printf "%.1f", a - b }'; }
log() { printf '[%6ss] %s\n' "$(now)" "$*"; }
passed=0 failed=0
pass() { passed=$((passed + 1)); log "PASS: $*"; }
fail() { failed=$((failed + 1)); log "FAIL: $*"; }

# ---------------------------------------------------------------- the guest
on() { "$VMSH" "$W/cmd.sock" "$@"; } # on 'cmd' [timeout_s]
QEMU_PID=
guest_logs() {
    if [ -S "$W/cmd.sock" ] && [ -n "$QEMU_PID" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        echo "===== guest: failed units, jobs, journal of our units, journal (tail)"
        on 'systemctl --failed --no-legend; systemctl list-jobs --no-legend;
            journalctl --no-pager -u "vhost-user-md*" | tail -150; echo -----; journalctl -b --no-pager | tail -80' 60 || true
    fi
    echo "===== guest: serial console (tail)"
    tail -c 12000 "$W/console.log" 2>/dev/null | tr -d '\r' || true
    echo "===== qemu output"
    cat "$W/qemu.out" 2>/dev/null || true
}
stop_guest() {
    [ -n "$QEMU_PID" ] || return 0
    kill "$QEMU_PID" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$QEMU_PID" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$QEMU_PID" 2>/dev/null || true
    wait "$QEMU_PID" 2>/dev/null || true
    QEMU_PID=
}
finish() {
    local rc=$?
    if [ $failed -gt 0 ] || [ $rc != 0 ]; then guest_logs; fi
    stop_guest
    if [ $failed = 0 ] && [ $rc = 0 ] && [ -z "${KEEP:-}" ] && [ -z "${SYSD_WORK:-}" ]; then
        rm -rf "$W"
    else
        echo "logs and images: $W"
    fi
    [ $rc = 0 ] || [ $failed -gt 0 ] || failed=1
    log "$passed passed, $failed failed"
    [ $failed = 0 ]
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- build
cd "$ROOT"
if [ -n "${SYSD_DEB:-}" ]; then
    DEB=$SYSD_DEB
else
    log "building the package (packaging/build-deb.sh)"
    mkdir -p "$W/deb"
    if ! packaging/build-deb.sh "$W/deb" >"$W/build-deb.log" 2>&1; then
        tail -30 "$W/build-deb.log"
        echo "packaging/build-deb.sh failed" >&2
        exit 1
    fi
    DEB=$(ls "$W"/deb/vhost-user-md_*_*.deb | head -1)
fi
[ -f "$DEB" ] || { echo "no package built ($DEB)" >&2; exit 1; }
log "package: $(basename "$DEB")"
log "building the guest test client (cargo build --example guest_io: the dev build the DLM tests made)"
IO_BIN=$(cargo build --locked --example guest_io --message-format=json | "$PY" -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "guest_io":
        print(m["executable"])' | tail -1)
[ -x "$IO_BIN" ] || { echo "guest_io build failed" >&2; exit 1; }

# ---------------------------------------------------------------- images
log "guest kernel and rootfs (cache: $GUEST_CACHE)"
guest_kernel
guest_rootfs
log "images (kernel $KVER)"
# the shared rootfs stays as it is; this guest's changes go to a copy
R=$W/rootfs
rm -rf "$R"
cp -a "$ROOTFS" "$R"
install -m 755 "$H/vmsh-loop" "$R/usr/local/sbin/vmsh-loop"
install -m 644 "$H/vmsh.service" "$R/etc/systemd/system/vmsh.service"
mkdir -p "$R/etc/systemd/system/sysinit.target.wants" "$R/opt/vumd"
ln -sf ../vmsh.service "$R/etc/systemd/system/sysinit.target.wants/vmsh.service"
# Units that only cost time here, or wait for what this guest has not: gettys and logind
# (ttyS0 is the console, ttyS1 the command channel, nobody logs in), timers, the cluster
# stack (this test's lockd is ours), mdadm's monitor.
for u in getty.target serial-getty@ttyS0.service serial-getty@ttyS1.service getty@tty1.service \
    systemd-logind.service \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer \
    e2scrub_reap.service fstrim.timer man-db.timer systemd-tmpfiles-clean.timer \
    corosync.service dlm.service mdmonitor.service mdmonitor-oneshot.timer \
    mdcheck_start.timer mdcheck_continue.timer systemd-networkd-wait-online.service \
    systemd-firstboot.service; do
    ln -sf /dev/null "$R/etc/systemd/system/$u"
done
# Kernel md must not assemble the legs when udev sees their superblocks: they are ours.
ln -sf /dev/null "$R/etc/udev/rules.d/64-md-raid-assembly.rules"
# The journal in memory: the guest's root is a throwaway snapshot anyway.
mkdir -p "$R/etc/systemd/journald.conf.d"
printf '[Journal]\nStorage=volatile\n' >"$R/etc/systemd/journald.conf.d/volatile.conf"
echo vumd-guest >"$R/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 vumd-guest\n' >"$R/etc/hosts"
guest_ext4 "$W/root.ext4" "$R" vumdroot 1G
rm -rf "$R"
# the package and the test client on a read-only disk (vdb -> /opt/vumd)
B=$W/bindisk
rm -rf "$B"
mkdir -p "$B"
cp "$DEB" "$B/"
cp "$IO_BIN" "$B/guest_io"
guest_ext4 "$W/bin.ext4" "$B" vumdbin
rm -rf "$B"
guest_initrd "$W/initrd.cpio.gz" /sbin/init "$MODULES"
# the array's legs: /dev/vdc, /dev/vdd
rm -f "$W/leg0.img" "$W/leg1.img"
truncate -s 256M "$W/leg0.img" "$W/leg1.img"
log "images ready in $W"

# ---------------------------------------------------------------- boot
log "booting the guest (systemd as PID 1)"
rm -f "$W/cmd.sock" "$W/cmd.log" "$W/console.log"
B0=$(date +%s.%N)
timeout "$VM_TIMEOUT" qemu-system-x86_64 -accel tcg -cpu max -smp "${SYSD_SMP:-1}" -m 1G -machine q35 \
    -kernel "$KDIR/boot/vmlinuz-$KVER" -initrd "$W/initrd.cpio.gz" \
    -append "console=ttyS0 panic=-1 loglevel=4" \
    -drive "file=$W/root.ext4,if=none,id=root,format=raw,snapshot=on" -device virtio-blk-pci,drive=root \
    -drive "file=$W/bin.ext4,if=none,id=bin,format=raw,readonly=on" -device virtio-blk-pci,drive=bin \
    -drive "file=$W/leg0.img,if=none,id=leg0,format=raw" -device virtio-blk-pci,drive=leg0 \
    -drive "file=$W/leg1.img,if=none,id=leg1,format=raw" -device virtio-blk-pci,drive=leg1 \
    -nic none \
    -chardev "file,id=s0,path=$W/console.log" -serial chardev:s0 \
    -chardev "socket,id=s1,path=$W/cmd.sock,server=on,wait=off,logfile=$W/cmd.log" -serial chardev:s1 \
    -display none -monitor none -no-reboot \
    >"$W/qemu.out" 2>&1 &
QEMU_PID=$!
state=
end=$(($(date +%s) + 300))
while [ "$(date +%s)" -lt $end ] && kill -0 "$QEMU_PID" 2>/dev/null; do
    state=$(sed -n 's/.*VMH_READY \([a-z]*\).*/\1/p' "$W/cmd.log" 2>/dev/null | head -1) || true
    [ -n "$state" ] && break
    sleep 0.5
done
BOOT=$(awk -v a="$(date +%s.%N)" -v b="$B0" 'BEGIN { printf "%.1f", a - b }')
if [ -z "$state" ]; then
    fail "boot: no ready marker within 300 s"
    exit 1
fi
log "guest up in ${BOOT}s (systemd: $state; $(on 'systemd-analyze time | head -1' 30 | tr -d '\n'))"
if [ "$state" = running ] && [ "$(on 'readlink /proc/1/exe' 30)" = /usr/lib/systemd/systemd ] &&
    on 'systemctl is-active --quiet multi-user.target' 30; then
    pass "boot: systemd is PID 1 and reached multi-user.target with no failed unit (${BOOT}s)"
else
    fail "boot: systemd state $state, PID 1 $(on 'readlink /proc/1/exe' 30), failed units: $(on 'systemctl --failed --no-legend' 30)"
fi

# ---------------------------------------------------------------- the package
DEBNAME=$(basename "$DEB")
out=$(on "dpkg -i /opt/vumd/$DEBNAME" 300) && rc=0 || rc=$?
echo "$out" | tail -5 | sed 's/^/    guest| /'
if [ $rc = 0 ] && on "dpkg-query -W -f='\${Status}' vhost-user-md | grep -qx 'install ok installed' &&
        [ \"\$(command -v vhost-user-md)\" = /usr/bin/vhost-user-md ] && vhost-user-md --version &&
        systemctl cat vhost-user-md@.service vhost-user-md-lockd.service >/dev/null" 60 | sed 's/^/    guest| /'; then
    pass "dpkg -i $DEBNAME: installed, /usr/bin/vhost-user-md runs, systemd knows vhost-user-md@.service and vhost-user-md-lockd.service"
else
    fail "dpkg -i $DEBNAME (rc $rc)"
fi
out=$(on 'man -P cat vhost-user-md-serve 2>&1 | cat' 120) && rc=0 || rc=$?
if [ $rc = 0 ] && echo "$out" | grep -q '^NAME' && echo "$out" | grep -q -- '--socket'; then
    pass "man vhost-user-md-serve prints the page ($(echo "$out" | wc -l) lines)"
else
    fail "man -P cat vhost-user-md-serve (rc $rc): $(echo "$out" | head -5)"
fi

if [ -n "${SYSD_SHELL:-}" ]; then
    log "guest up: $VMSH $W/cmd.sock 'CMD' [TIMEOUT]; touch $W/stop to end"
    while [ ! -e "$W/stop" ]; do sleep 2; done
    exit 0
fi

# ---------------------------------------------------------------- serving an array
SOCK=/run/vhost-user-md/disk1.sock
# metrics NAME: the guest's /metrics, copied to $W/NAME.prom
metrics() { on "curl -fsS --max-time 20 http://127.0.0.1:$PORT/metrics" 60 >"$W/$1.prom"; }
# requests FILE: "KIND=N ..." of vhost_user_md_requests_total, summed over the queues
requests() {
    "$PY" - "$1" <<'EOF'
import sys
from prometheus_client.parser import text_string_to_metric_families
totals = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        if s.name == "vhost_user_md_requests_total":
            totals[s.labels["kind"]] = totals.get(s.labels["kind"], 0) + int(s.value)
print(" ".join(f"{k}={v}" for k, v in sorted(totals.items())))
EOF
}
count() { echo "$1" | tr ' ' '\n' | sed -n "s/^$2=//p" | grep . || echo 0; } # count "KIND=N ..." KIND

# udev probes a disk that a writer closed (a "change" event), holding a shared flock on it
# meanwhile, which an exclusive claim (create, or serve of a plain array) is refused while
# it lasts: as after any tool that writes metadata to a disk, let udev finish first.
if on 'udevadm settle; vhost-user-md create --assume-clean --bitmap-chunk 1M /dev/vdc /dev/vdd && udevadm settle' 60 | sed 's/^/    guest| /'; then
    pass "vhost-user-md create on /dev/vdc /dev/vdd"
else
    fail "vhost-user-md create on /dev/vdc /dev/vdd"
fi
on "mkdir -p /etc/vhost-user-md && cat >/etc/vhost-user-md/disk1.conf <<'EOF'
socket = \"$SOCK\"
legs = [\"/dev/vdc\", \"/dev/vdd\"]
queues = 2
metrics = \"127.0.0.1:$PORT\"
EOF" 30 >/dev/null
S0=$(date +%s.%N)
out=$(on 'systemctl start vhost-user-md@disk1 && echo "active=$(systemctl is-active vhost-user-md@disk1)" && test -S '"$SOCK"' && echo socket' 120) && rc=0 || rc=$?
S1=$(awk -v a="$(date +%s.%N)" -v b="$S0" 'BEGIN { printf "%.1f", a - b }')
if [ $rc = 0 ] && echo "$out" | grep -qx active=active && echo "$out" | grep -qx socket &&
    [ "$(on 'systemctl show -P Type vhost-user-md@disk1' 30)" = notify ]; then
    pass "systemctl start vhost-user-md@disk1 (Type=notify) returned with the unit active and $SOCK there (${S1}s)"
else
    fail "systemctl start vhost-user-md@disk1: rc $rc, $(echo $out)"
fi
before=
if ! metrics before; then
    fail "metrics before I/O: curl http://127.0.0.1:$PORT/metrics: $(cat "$W/before.prom")"
elif ! before=$(requests "$W/before.prom" 2>&1); then
    fail "metrics before I/O: not Prometheus text: $(echo "$before" | tail -1)"
    before=
fi
IO="--seed 7 --first 0 --blocks 64" # 64 blocks of 64 KiB
if on "guest_io write $SOCK $IO && guest_io verify $SOCK $IO --acked 64" 300 | sed 's/^/    guest| /'; then
    pass "guest_io wrote 64 blocks through $SOCK and read them back"
else
    fail "guest_io through $SOCK"
    on 'journalctl --no-pager -u vhost-user-md@disk1 | tail -30' 30 | sed 's/^/    guest| /'
fi
after=
if ! metrics after; then
    fail "metrics after I/O: curl http://127.0.0.1:$PORT/metrics: $(cat "$W/after.prom")"
elif ! after=$(requests "$W/after.prom" 2>&1); then
    fail "metrics after I/O: not Prometheus text: $(echo "$after" | tail -1)"
    after=
fi
dw=$(($(count "$after" write) - $(count "$before" write)))
dr=$(($(count "$after" read) - $(count "$before" read)))
if [ -n "$before" ] && [ -n "$after" ] && [ "$dw" -ge 64 ] && [ "$dr" -ge 64 ]; then
    pass "metrics (prometheus_client): vhost_user_md_requests_total moved by $dw writes and $dr reads (before: $before; after: $after)"
else
    fail "metrics: requests before '$before', after '$after' (want +64 writes and reads)"
fi

S0=$(date +%s.%N)
if on 'systemctl stop vhost-user-md@disk1; [ "$(systemctl is-active vhost-user-md@disk1)" = inactive ] && [ ! -e '"$SOCK"' ]' 120; then
    pass "systemctl stop vhost-user-md@disk1: inactive (not failed), socket gone ($(awk -v a="$(date +%s.%N)" -v b="$S0" 'BEGIN { printf "%.1f", a - b }')s)"
else
    fail "systemctl stop vhost-user-md@disk1: $(on 'systemctl is-active vhost-user-md@disk1; ls -l /run/vhost-user-md' 30 | tr '\n' ' ')"
fi
# examine_clean NAME [clustered]: "ok" when `examine --json` of the legs (saved in $W/NAME.json)
# shows both legs clean and in sync (a plain array), no dirty chunk in any slot, one
# consistent array
examine_clean() {
    on 'vhost-user-md examine --json /dev/vdc /dev/vdd' 60 >"$W/$1.json" || true
    "$PY" - "$W/$1.json" "${2:-plain}" <<'EOF' || echo "examine output not read: $(head -c 300 "$W/$1.json")"
import json, sys
d = json.load(open(sys.argv[1]))
bad = []
for leg in d["legs"]:
    if leg["error"]:
        bad.append(f"{leg['leg']}: {leg['error']}")
        continue
    sb, bm = leg["superblock"], leg["bitmap"]
    # a plain array's stop marks it clean; md-cluster nodes leave the superblock active
    # for the other nodes (as the kernel does): their per-node bitmaps say what is dirty
    if sys.argv[2] != "clustered" and sb["state"] != "clean":
        bad.append(f"{leg['leg']}: state {sb['state']}")
    if sys.argv[2] != "clustered" and sb["resync_offset"] != 2**64 - 1:
        bad.append(f"{leg['leg']}: resync_offset {sb['resync_offset']}")
    if sb["events"] == 0:
        bad.append(f"{leg['leg']}: events 0 (never assembled)")
    if bm["clustered"] != (sys.argv[2] == "clustered"):
        bad.append(f"{leg['leg']}: clustered {bm['clustered']}")
    for s in bm["slots"]:
        if s["dirty"]:
            bad.append(f"{leg['leg']}: slot {s['slot']} has {s['dirty']} dirty chunks")
if not d["array"]["consistent"] or d["array"]["problems"]:
    bad.append(f"array: {d['array']}")
print("; ".join(bad) if bad else "ok")
EOF
}
clean=$(examine_clean examine)
if [ "$clean" = ok ]; then
    pass "examine --json after the stop: both legs clean and in sync, no dirty bitmap chunk, one consistent array"
else
    fail "examine after the stop: $clean"
fi

# ---------------------------------------------------------------- a broken config
on "cat >/etc/vhost-user-md/disk2.conf <<'EOF'
socket = \"/run/vhost-user-md/disk2.sock\"
legs = [\"/dev/vdc\", \"/dev/vdd\"]
queus = 2
EOF" 30 >/dev/null
# (a config mistake exits 2, which the unit does not restart: the journal has one such line)
out=$(on 'systemctl start vhost-user-md@disk2; echo "rc=$?"; sleep 3; systemctl is-failed vhost-user-md@disk2
          echo "restarts=$(systemctl show -P NRestarts vhost-user-md@disk2)"; journalctl --no-pager -o cat -u vhost-user-md@disk2' 120) || true
echo "$out" | grep queus | head -3 | sed 's/^/    guest| /'
if ! echo "$out" | grep -qx rc=0 && echo "$out" | grep -qx failed && echo "$out" | grep -qx restarts=0 &&
    [ "$(echo "$out" | grep -c 'disk2.conf.*queus')" = 1 ]; then
    pass "vhost-user-md@disk2 with an unknown key (queus) fails to start, is not restarted, and its journal has one line naming the file and the key"
else
    fail "vhost-user-md@disk2 with queus = 2: $(echo "$out" | tail -10)"
fi

# ---------------------------------------------------------------- two nodes over lockd
# A clustered array served by two units of this host (two nodes, as for a migration
# between two QEMUs here), over vhost-user-md-lockd.service, which a drop-in makes each
# disk require.
LOCKD=/run/vhost-user-md/lockd.sock
if on 'udevadm settle; vhost-user-md create --force --cluster-name vumdclu --assume-clean --bitmap-chunk 1M /dev/vdc /dev/vdd && udevadm settle' 60 | sed 's/^/    guest| /'; then
    pass "vhost-user-md create --cluster-name on /dev/vdc /dev/vdd (over the first array: --force)"
else
    fail "vhost-user-md create --cluster-name"
fi
for n in 3 4; do
    on "cat >/etc/vhost-user-md/disk$n.conf <<'EOF'
socket = \"/run/vhost-user-md/disk$n.sock\"
legs = [\"/dev/vdc\", \"/dev/vdd\"]
lock-manager = \"lockd:$LOCKD\"
metrics = \"127.0.0.1:$((PORT + n))\"
EOF
mkdir -p /etc/systemd/system/vhost-user-md@disk$n.service.d
printf '[Unit]\nRequires=vhost-user-md-lockd.service\n' >/etc/systemd/system/vhost-user-md@disk$n.service.d/lockd.conf" 30 >/dev/null
done
out=$(on "systemctl daemon-reload && systemctl start vhost-user-md@disk3 vhost-user-md@disk4; echo rc=\$?; systemctl is-active vhost-user-md-lockd vhost-user-md@disk3 vhost-user-md@disk4; test -S $LOCKD && echo lockd-socket" 180) || true
if echo "$out" | grep -qx rc=0 && [ "$(echo "$out" | grep -cx active)" = 3 ] && echo "$out" | grep -qx lockd-socket; then
    pass "systemctl start vhost-user-md@disk3 vhost-user-md@disk4 (lock-manager lockd) started vhost-user-md-lockd too: all three active"
else
    fail "two disks over lockd: $(echo "$out" | tr '\n' ' ')"
fi
# cluster NAME PORT: "SLOT PEERS" from the node's metrics (vhost_user_md_cluster_slot, _peers_alive)
cluster() {
    on "curl -fsS --max-time 20 http://127.0.0.1:$2/metrics" 60 >"$W/$1.prom" || { echo "no metrics"; return; }
    "$PY" - "$W/$1.prom" <<'EOF'
import sys
from prometheus_client.parser import text_string_to_metric_families
v = {}
for family in text_string_to_metric_families(open(sys.argv[1]).read()):
    for s in family.samples:
        if s.name in ("vhost_user_md_cluster_slot", "vhost_user_md_cluster_peers_alive"):
            v[s.name] = int(s.value)
print(v.get("vhost_user_md_cluster_slot", "none"), v.get("vhost_user_md_cluster_peers_alive", "none"))
EOF
}
c3= c4=
for _ in $(seq 30); do
    c3=$(cluster disk3 $((PORT + 3)) 2>&1) c4=$(cluster disk4 $((PORT + 4)) 2>&1)
    [ "${c3#* }" = 1 ] && [ "${c4#* }" = 1 ] && break
    sleep 1
done
if [ "${c3#* }" = 1 ] && [ "${c4#* }" = 1 ] && [ "${c3% *}" != "${c4% *}" ]; then
    pass "metrics: disk3 in slot ${c3% *}, disk4 in slot ${c4% *}, each sees the other alive"
else
    fail "metrics of the two nodes (slot peers): disk3 '$c3', disk4 '$c4'"
fi
IO="--seed 9 --first 100 --blocks 32"
if on "guest_io write /run/vhost-user-md/disk3.sock $IO && guest_io verify /run/vhost-user-md/disk4.sock $IO --acked 32" 300 | sed 's/^/    guest| /'; then
    pass "guest_io: disk4 reads the 32 blocks written through disk3"
else
    fail "guest_io: written through disk3, read through disk4"
fi
if on 'systemctl stop vhost-user-md@disk3 vhost-user-md@disk4 && systemctl stop vhost-user-md-lockd &&
        [ "$(systemctl is-active vhost-user-md@disk3 vhost-user-md@disk4 vhost-user-md-lockd | sort -u)" = inactive ]' 120; then
    pass "systemctl stop of both disks and lockd: all inactive"
else
    fail "stop of the lockd disks: $(on 'systemctl is-active vhost-user-md@disk3 vhost-user-md@disk4 vhost-user-md-lockd' 30 | tr '\n' ' ')"
fi
clean=$(examine_clean examine-cluster clustered)
if [ "$clean" = ok ]; then
    pass "examine --json after the stop: clustered array consistent, no dirty chunk in any node slot"
else
    fail "examine of the clustered array after the stop: $clean"
fi

log "done (boot ${BOOT}s)"
