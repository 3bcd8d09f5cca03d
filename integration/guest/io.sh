# shellcheck shell=sh disable=SC2154
# Guest side of the "io" tests: fio verify on every queue, ext4, discard, write-zeroes, flush.
# /etc/test.env: QUEUES, FIO_JOBS, FIO_SIZE (per job), MD5_MIB
B=/sys/block/vda
echo "T_INFO cpus=$(nproc) sectors=$(cat $B/size) write_cache=$(cat $B/queue/write_cache)" \
    "discard_max=$(cat $B/queue/discard_max_bytes) write_zeroes_max=$(cat $B/queue/write_zeroes_max_bytes)"
mq=$(ls $B/mq | wc -l)
check "blk-mq hardware queues: $mq, want $QUEUES" [ "$mq" = "$QUEUES" ]

# 1. fio: random writes of 4-64 KiB, then every block read back and its crc32c checked.
#    With one job per CPU the jobs are pinned, so each CPU's hardware queue carries one job.
pin=
[ "$(nproc)" -gt 1 ] && [ "$FIO_JOBS" = "$(nproc)" ] &&
    pin="--cpus_allowed=0-$(($(nproc) - 1)) --cpus_allowed_policy=split"
# shellcheck disable=SC2086
check "fio randwrite+verify, $FIO_JOBS jobs x $FIO_SIZE" \
    fio_verify io --numjobs="$FIO_JOBS" --size="$FIO_SIZE" --offset_increment="$FIO_SIZE" \
    --bsrange=4k-64k --iodepth=8 $pin
step fio
# each virtqueue has its own MSI-X vector: every queue must have completed requests
irqs=$(awk '/virtio[0-9]+-req\./ { n = 0; for (i = 2; i <= NF; i++) if ($i ~ /^[0-9]+$/) n += $i; print $NF "=" n }' /proc/interrupts)
echo "T_INFO interrupts per virtqueue: $(echo $irqs)"
check "all $QUEUES virtqueues completed requests" \
    [ "$(echo "$irqs" | grep -c '=[1-9]')" = "$QUEUES" ]

# 2. ext4: mkfs (which discards the whole disk), files, sync, remount with cold caches, md5.
check "mkfs.ext4" $MKFS_EXT4 -q -F $DEV
check "mount ext4" mount -t ext4 $DEV /mnt
mkdir -p /mnt/small
for i in 1 2 3 4; do dd if=/dev/urandom of=/mnt/big$i bs=1M count=4 2>/dev/null; done
i=0
while [ $i -lt 200 ]; do echo "file $i $(date +%s)" > /mnt/small/f$i; i=$((i + 1)); done
(cd /mnt && md5sum big* small/*) > /tmp/sums
sync
check "umount after sync" umount /mnt
echo 3 > /proc/sys/vm/drop_caches
check "mount ext4 read-only again" mount -t ext4 -o ro $DEV /mnt
check "md5 of 204 files after remount" sh -c 'cd /mnt && md5sum -c -s /tmp/sums'
umount /mnt
check "e2fsck -fn finds no problem" quiet $E2FSCK -fn $DEV
step ext4

# 3. discard and write-zeroes (util-linux blkdiscard), each on 1 MiB filled with a pattern first.
ZERO1M=$(head -c $MiB /dev/zero | md5sum | cut -d' ' -f1)
for off in 200 204; do
    yes VUMD-PATTERN | head -c $MiB | dd of=$DEV bs=1M seek=$off oflag=direct conv=fsync 2>/dev/null
done
check "blkdiscard 1 MiB at 200 MiB" quiet $BLKDISCARD -f -o $((200 * MiB)) -l $MiB $DEV
if [ "$(rd_md5 200 1)" = "$ZERO1M" ]; then echo "T_INFO discarded range reads zeroes"
else echo "T_INFO discarded range does not read zeroes"; fi
check "blkdiscard -z (write zeroes) 1 MiB at 204 MiB" quiet $BLKDISCARD -f -z -o $((204 * MiB)) -l $MiB $DEV
check "write-zeroes range reads zeroes" [ "$(rd_md5 204 1)" = "$ZERO1M" ]
step discard

# 4. flush, then a checksum the host compares with the legs.
sync
check "flush (fsync of $DEV)" quiet dd if=/dev/null of=$DEV conv=fsync,notrunc
echo "T_DISK_MD5 $(rd_md5 0 "$MD5_MIB") mib=$MD5_MIB"
step md5
check "no I/O errors in the kernel log" io_errors
exit $FAILS
