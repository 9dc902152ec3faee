#!/bin/sh
# First boot on a blank vsnap disk: limits, raw I/O with verification, discards, a filesystem.
set -eu
dev=/dev/vda
q=/sys/block/vda/queue
echo "discard_max_bytes=$(cat $q/discard_max_bytes) write_zeroes_max_bytes=$(cat $q/write_zeroes_max_bytes) queues=$(ls /sys/block/vda/mq | wc -l)"
[ "$(cat $q/discard_max_bytes)" -gt 0 ]
[ "$(cat $q/write_zeroes_max_bytes)" -gt 0 ]
[ "$(ls /sys/block/vda/mq | wc -l)" -eq "$EXPECT_QUEUES" ]
[ "$(cat $q/physical_block_size)" -eq 4096 ]

# Raw region: random writes with checksums, read back and verified by fio.
fio --name=raw --filename=$dev --offset=192M --size=32M --rw=randwrite --bs=4k --direct=1 \
    --ioengine=libaio --iodepth=16 --numjobs=1 --verify=crc32c --do_verify=1 --verify_fatal=1 \
    --randrepeat=0 --output-format=terse >/tmp/fio.out
echo "fio verify ok"
# Discard and zero-out: both must read back as zeros.
blkdiscard -o 192M -l 16M $dev
blkdiscard -z -o 208M -l 8M $dev
for r in "192 16" "208 8"; do
  set -- $r
  nz=$(dd if=$dev bs=1M skip=$1 count=$2 2>/dev/null | tr -d '\000' | wc -c)
  [ "$nz" -eq 0 ] || { echo "range at ${1}M not zero after discard ($nz bytes)"; exit 1; }
done
echo "discard and zero-out ok"

mkfs.ext4 -q -F -E discard $dev
mount $dev /mnt
mkdir /mnt/data
dd if=/dev/urandom of=/mnt/data/big bs=1M count=24 2>/dev/null
i=0
while [ $i -lt 200 ]; do echo "file $i" > /mnt/data/small.$i; i=$((i + 1)); done
dd if=/dev/urandom of=/mnt/data/gone bs=1M count=16 2>/dev/null
sync
rm /mnt/data/gone /mnt/data/small.1*
sync
fstrim -v /mnt
sha256sum /mnt/data/big | cut -d' ' -f1 > /mnt/big.sha
umount /mnt
e2fsck -fn $dev
echo "GUEST-DEV-SHA256: $(sha256sum $dev | cut -d' ' -f1)"
