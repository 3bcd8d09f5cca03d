# shellcheck shell=sh disable=SC2154
# Guest side of "leg-fail" and "readd-under-load": fio verify runs while the host fails leg B.
# Then the host re-adds leg B: with READD_UNDER_LOAD=1 while a second fio verify writes the
# same blocks (the recovery copies chunks the guest is writing), otherwise while the guest is
# idle, and the second fio verify runs after the recovery.
# /etc/test.env: FIO_SIZE, FIO_SIZE2 (per job), READD_UNDER_LOAD
writes() { awk '{ print $5 }' /sys/block/vda/stat; }
# start_fio NAME ARGS...: fio_verify in the background; returns once its writes reach the disk
start_fio() {
    w0=$(writes)
    fio_verify "$@" &
    fio_pid=$!
    i=0
    while [ $i -lt 600 ] && [ $(($(writes) - w0)) -lt 200 ] && kill -0 $fio_pid 2>/dev/null; do
        sleep 0.1
        i=$((i + 1))
    done
    echo "T_FIO_RUNNING $1"
}
still_running() {
    if kill -0 $fio_pid 2>/dev/null; then echo "T_FIO_STILL_RUNNING $1"; else echo "T_FIO_FINISHED_EARLY $1"; fi
}

start_fio fail --numjobs=2 --size="$FIO_SIZE" --offset_increment="$FIO_SIZE" --bsrange=4k-64k --iodepth=8
wait_host leg-failed 120
still_running fail
w1=$(writes)
wait $fio_pid
check "fio randwrite+verify while leg B fails (2 jobs x $FIO_SIZE)" [ $? = 0 ]
echo "T_WRITES_AFTER_FAIL $(($(writes) - w1))"
step fio-fail

# the second fio writes blocks of the chunks the recovery copies
fio2="--numjobs=2 --size=$FIO_SIZE2 --offset_increment=$FIO_SIZE2 --bsrange=4k-64k --iodepth=${FIO2_IODEPTH:-8}"
if [ "${READD_UNDER_LOAD:-0}" = 1 ]; then
    # shellcheck disable=SC2086
    start_fio readd $fio2
    wait_host recovered 120
    still_running readd
    wait $fio_pid
    check "fio randwrite+verify while leg B is re-added (2 jobs x $FIO_SIZE2)" [ $? = 0 ]
else
    wait_host recovered 120
    # shellcheck disable=SC2086
    check "fio randwrite+verify after leg B was re-added (2 jobs x $FIO_SIZE2)" fio_verify readd $fio2
fi
step fio-readd
check "flush (fsync of $DEV)" quiet dd if=/dev/null of=$DEV conv=fsync,notrunc
check "no I/O errors in the kernel log" io_errors
exit $FAILS
