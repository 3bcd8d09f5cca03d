# shellcheck shell=sh disable=SC2034,SC3045
# Helpers for the guest side of integration/guest-suite.sh (busybox sh, sourced first in /test.sh).
#
# Line protocol on the serial console (ttyS0, the host's guest.log):
#   T_OK <what>            a guest-side check passed
#   T_FAIL <what>          a guest-side check failed (the test script then exits non-zero)
#   T_WAIT <name>          the guest waits for the host to write "<name>" to ttyS1
#   T_<WORD> ...           values the host checks (T_FIO, T_DISK_MD5, T_ERRORS, ...)
#   T_STEP <name> <secs>   guest time spent in a step
# ttyS1 is the host->guest channel (a QEMU pipe chardev): the host writes one name per line.
#
# Tools come from Debian packages and are called by full path: busybox sh runs its own
# applets of the same name (blkdiscard, mke2fs) before it searches PATH.
FIO=/usr/bin/fio
MKFS_EXT4=/usr/sbin/mkfs.ext4
E2FSCK=/usr/sbin/e2fsck
BLKDISCARD=/usr/sbin/blkdiscard
DEV=/dev/vda
MiB=1048576
FAILS=0
[ -f /etc/test.env ] && . /etc/test.env

ok() { echo "T_OK $*"; }
fail() { echo "T_FAIL $*"; FAILS=$((FAILS + 1)); }
check() { # check WHAT COMMAND...
    what=$1; shift
    if "$@"; then ok "$what"; else fail "$what"; fi
}
quiet() { # quiet COMMAND...: run it; show its output only if it fails
    "$@" > /tmp/quiet.out 2>&1 && return 0
    rc=$?
    sed 's/^/T_OUT /' /tmp/quiet.out
    return $rc
}
uptime_s() { cut -d' ' -f1 /proc/uptime; }
T_STEP0=$(uptime_s)
step() {
    now=$(uptime_s)
    echo "T_STEP $1 $(awk -v a="$T_STEP0" -v b="$now" 'BEGIN { printf "%.1f", b - a }')"
    T_STEP0=$now
}

# Host->guest channel: kept open for the whole test so no line is lost between reads.
if [ -c /dev/ttyS1 ]; then
    stty -F /dev/ttyS1 -echo 2>/dev/null
    exec 3</dev/ttyS1
fi
# wait_host NAME [TIMEOUT_SECONDS]: announce T_WAIT NAME, then read lines until NAME arrives.
wait_host() {
    echo "T_WAIT $1"
    end=$(($(date +%s) + ${2:-300}))
    while [ "$(date +%s)" -lt "$end" ]; do
        line=
        read -r -t 5 line <&3 || true
        line=$(echo "$line" | tr -d '\r')
        [ "$line" = "$1" ] && { echo "T_GOT $1"; return 0; }
        [ -n "$line" ] && echo "T_GOT_OTHER $line"
    done
    echo "T_WAIT_TIMEOUT $1"
    return 1
}

# fio_verify NAME ARGS...: randwrite + verify on $DEV with direct I/O; each job writes its own
# region (offset_increment = size) so jobs never overwrite each other's verified blocks.
# Prints "T_FIO NAME rc=N ..." and on failure the end of fio's output.
fio_verify() {
    name=$1; shift
    $FIO --name="$name" --filename=$DEV --direct=1 --ioengine=libaio --rw=randwrite \
        --verify=crc32c --do_verify=1 --verify_fatal=1 --group_reporting \
        --output=/tmp/fio-"$name".log "$@" > /tmp/fio-"$name".out 2>&1
    rc=$?
    echo "T_FIO $name rc=$rc $(grep -E '^ +(write|read):' /tmp/fio-"$name".log | tr -s ' \n' ' ')"
    if [ $rc != 0 ]; then
        tail -n 30 /tmp/fio-"$name".out /tmp/fio-"$name".log | sed 's/^/T_FIO_LOG /'
    fi
    return $rc
}

# Kernel log lines about I/O errors on the disk (the guest must never see one).
IO_ERROR_RE='I/O error|blk_update_request|print_req_error|Buffer I/O|EXT4-fs error|critical (medium|target)'
io_errors() {
    dmesg | grep -iE "$IO_ERROR_RE" | head -n 20 | sed 's/^/T_DMESG /'
    n=$(dmesg | grep -ciE "$IO_ERROR_RE")
    echo "T_ERRORS $n"
    [ "$n" = 0 ]
}

rd_md5() { # rd_md5 MIB_OFFSET MIB_COUNT: md5 of that range, read with O_DIRECT
    dd if=$DEV bs=1M skip="$1" count="$2" iflag=direct 2>/dev/null | md5sum | cut -d' ' -f1
}
