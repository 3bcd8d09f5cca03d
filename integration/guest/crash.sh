# shellcheck shell=sh disable=SC2154
# Guest side of "backend-crash": one fio randwrite+verify that runs while the host kills the
# backend with SIGKILL (its requests still in flight) and starts a new one. fio must finish
# with every block verified and the kernel must log no I/O error. /etc/test.env: FIO_SIZE
echo "T_FIO_RUNNING crash"
check "fio randwrite+verify across the backend crash ($FIO_SIZE)" \
    fio_verify crash --size="$FIO_SIZE" --offset=64M --bsrange=4k-64k --iodepth=16
step fio
check "no I/O errors in the kernel log" io_errors
exit $FAILS
