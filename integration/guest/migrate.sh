# shellcheck shell=sh disable=SC2154
# Guest side of "migrate": writes numbered 4 KiB blocks (block i holds "SEQ%08d" of i,
# zero-padded; O_DIRECT, fsync each) and reads each one back at once, until the host says
# "finish"; the host live-migrates the guest meanwhile (and back). Prints "W i TAG uptime"
# every 50 blocks so the host can time its steps.
# Host commands (lines on ttyS1, collected by a background reader as /tmp/cmd/NAME):
#   verify  check every block written so far (T_MID_VERIFY_OK/BAD n)
#   stale   the host resumed this guest on a source whose migration completed: write
#           "STALE%06d" blocks from now on, so any that reach the disk can be told apart
#   finish  stop writing; check every block, the kernel log, power off
# /etc/test.env: MAX_BLOCKS
mkdir -p /tmp/cmd
(
    while read -r line <&3; do
        line=$(echo "$line" | tr -d '\r')
        case $line in '' | *[!a-z]*) continue ;; esac
        : > "/tmp/cmd/$line"
        echo "T_GOT $line"
    done
) &

# verify_upto N: every block 0..N-1 holds its SEQ record (one read, one checksum).
verify_upto() {
    want=$(awk -v n="$1" 'BEGIN { for (i = 0; i < n; i++) printf "SEQ%08d", i }' | md5sum | cut -d' ' -f1)
    got=$(dd if=$DEV bs=4096 count="$1" iflag=direct 2>/dev/null | tr -d '\0' | md5sum | cut -d' ' -f1)
    [ "$want" = "$got" ]
}

i=0
readback_errors=0
write_errors=0
tag=SEQ
width=8
while [ $i -lt "$MAX_BLOCKS" ]; do
    [ -e /tmp/cmd/finish ] && break
    if [ -e /tmp/cmd/stale ] && [ $tag = SEQ ]; then
        tag=STALE
        width=6
        echo "T_STALE_FROM $i"
    fi
    if [ -e /tmp/cmd/verify ]; then
        rm -f /tmp/cmd/verify
        if verify_upto $i; then echo "T_MID_VERIFY_OK $i"; else echo "T_MID_VERIFY_BAD $i"; fi
    fi
    b=$(printf "%s%0${width}d" $tag $i)
    if printf '%s' "$b" | dd of=$DEV bs=4096 seek=$i conv=sync,fsync oflag=direct 2>/dev/null; then
        r=$(dd if=$DEV bs=4096 skip=$i count=1 iflag=direct 2>/dev/null | head -c 11)
        [ "$r" = "$b" ] || { echo "T_READBACK_ERR $i got=[$r]"; readback_errors=$((readback_errors + 1)); }
        [ $tag = STALE ] && echo "T_STALE_WRITTEN $i"
    else
        echo "T_WRITE_ERR $i $tag"
        write_errors=$((write_errors + 1))
    fi
    [ $((i % 50)) = 0 ] && echo "W $i $tag $(uptime_s)"
    i=$((i + 1))
done
echo "T_BLOCKS $i"
echo "T_COUNTS readback_errors=$readback_errors write_errors=$write_errors"
check "no write failed ($write_errors)" [ $write_errors = 0 ]
check "every block read back right after its write ($readback_errors bad)" [ $readback_errors = 0 ]
echo 3 > /proc/sys/vm/drop_caches
check "all $i blocks verify at the end" verify_upto $i
check "no I/O errors in the kernel log" io_errors
exit $FAILS
