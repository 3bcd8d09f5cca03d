# shellcheck shell=sh disable=SC2154
# Guest side of "backend-restart": writes, then idles while the host kills the backend with
# SIGKILL and starts a new one, then reads what it wrote and writes again. /etc/test.env: FIO_SIZE
yes VUMD-BEFORE-RESTART | head -c $((4 * MiB)) > /tmp/p1
P1=$(md5sum < /tmp/p1 | cut -d' ' -f1)
check "write 4 MiB at 8 MiB before the restart" dd if=/tmp/p1 of=$DEV bs=1M seek=8 oflag=direct conv=fsync
check "read back before the restart" [ "$(rd_md5 8 4)" = "$P1" ]
check "fio randwrite+verify before the restart ($FIO_SIZE)" \
    fio_verify before --size="$FIO_SIZE" --offset=64M --bsrange=4k-64k --iodepth=8
step before
wait_host backend-restarted 150
step idle
check "data written before the restart reads back intact" [ "$(rd_md5 8 4)" = "$P1" ]
yes VUMD-AFTER-RESTART | head -c $((4 * MiB)) > /tmp/p2
check "write 4 MiB at 16 MiB after the restart" dd if=/tmp/p2 of=$DEV bs=1M seek=16 oflag=direct conv=fsync
check "read back after the restart" [ "$(rd_md5 16 4)" = "$(md5sum < /tmp/p2 | cut -d' ' -f1)" ]
check "fio randwrite+verify after the restart ($FIO_SIZE)" \
    fio_verify after --size="$FIO_SIZE" --offset=96M --bsrange=4k-64k --iodepth=8
echo "T_PHASE2_DONE"
step after
check "no I/O errors in the kernel log" io_errors
exit $FAILS
