#!/bin/sh
# The demo guest: an ext4 file system that keeps changing while the host cuts twice.
set -eu
dev=/dev/vda

echo "guest: mkfs.ext4 -E discard, mount, write files"
mkfs.ext4 -q -F -E discard $dev
mount -o noatime $dev /mnt
mkdir /mnt/app /mnt/logs /mnt/tmp
dd if=/dev/urandom of=/mnt/app/data bs=1M count=16 2>/dev/null
i=0; while [ $i -lt 300 ]; do echo "config $i" > /mnt/app/conf.$i; i=$((i + 1)); done
dd if=/dev/zero of=/mnt/tmp/zeros bs=1M count=24 2>/dev/null
sync
# Keep writing while the host cuts.
( n=0; while [ ! -e /tmp/stop ]; do
    echo "log line $n $(date)" >> /mnt/logs/app.log
    dd if=/dev/urandom of=/mnt/tmp/scratch.$((n % 8)) bs=64k count=4 2>/dev/null
    n=$((n + 1)); sync
  done ) &
writer=$!
say CUT1
await NEXT
dd if=/dev/urandom of=/mnt/app/data bs=1M count=4 seek=6 conv=notrunc 2>/dev/null
rm -f /mnt/tmp/zeros /mnt/app/conf.1*
fstrim /mnt
say CUT2
await NEXT
touch /tmp/stop; wait $writer
echo "guest: deleted files, trimmed; unmounting"
umount /mnt
say DONE
