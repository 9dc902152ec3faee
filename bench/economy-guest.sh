#!/bin/sh
# In the guest, for one diff-economy row (bench/economy.sh): mount (unless the workload is mkfs),
# run WORKLOAD, apply the pre-cut knobs (TRIM, SYNC), say READY and wait for the host's CUT.
set -eu
dev=/dev/vda
if [ "$WORKLOAD" = mkfs ]; then
  mkfs.ext4 -q -F $MKFS_OPTS $dev
  mount -o "$MOUNT_OPTS" $dev /mnt
else
  mount -o "$MOUNT_OPTS" $dev /mnt
  case $WORKLOAD in
    fill-delete) # fill 32 files of 2 MiB, let them reach the disk, delete every other one
      mkdir /mnt/fill
      i=0; while [ $i -lt 32 ]; do dd if=/dev/urandom of=/mnt/fill/f$i bs=1M count=2 2>/dev/null; i=$((i + 1)); done
      sync
      i=0; while [ $i -lt 32 ]; do rm /mnt/fill/f$i; i=$((i + 2)); done ;;
    zero-file) # overwrite the 64 MiB random file with zeros, in place
      dd if=/dev/zero of=/mnt/big bs=1M count=64 conv=notrunc 2>/dev/null ;;
    untar) # unpack 5,000 small files
      mkdir /mnt/new
      tar -xf /mnt/tree.tar -C /mnt/new ;;
    rand-overwrite) # 4,096 random 4 KiB writes inside the 64 MiB file
      fio --name=ow --filename=/mnt/big --rw=randwrite --bs=4k --size=64M --io_size=16M \
        --ioengine=psync --randrepeat=1 --refill_buffers --output=/dev/null ;;
    read-tree) # read every file of the tree once
      find /mnt/tree -type f -exec cat {} + > /dev/null ;;
    mixed) # what a user does: install real binaries, write text and random data, copy 40 MiB of
      # a file the disk holds and delete the original
      mkdir /mnt/installed && cp -a /bin /mnt/installed/
      seq 1 400000 > /mnt/numbers.txt
      find /mnt/tree -type f -exec cat {} + > /mnt/notes.txt
      dd if=/dev/urandom of=/mnt/user.bin bs=1M count=16 2>/dev/null
      dd if=/mnt/big of=/mnt/copy bs=1M count=40 2>/dev/null
      sync
      rm /mnt/big ;;
    *) echo "unknown workload $WORKLOAD"; exit 2 ;;
  esac
fi
# fstrim only sees blocks whose freeing the journal has committed: sync first.
[ "$TRIM" = fstrim ] && sync && fstrim /mnt
[ "$SYNC" = sync ] && sync
say READY
await CUT
echo "economy row done"
say DONE
