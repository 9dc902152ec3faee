#!/bin/sh
# In the guest: files, freeze, let the host cut, thaw, more changes. Talks to the host over
# /dev/ttyS1 (a pipe chardev): prints FROZEN, waits for CUT.
set -eu
dev=/dev/vda

mkfs.ext4 -q -F -E discard $dev
mount $dev /mnt
mkdir /mnt/before
dd if=/dev/urandom of=/mnt/before/big bs=1M count=8 2>/dev/null
i=0; while [ $i -lt 100 ]; do echo "before $i" > /mnt/before/f$i; i=$((i + 1)); done
(cd /mnt/before && sha256sum big f* > /mnt/before.sha)
sync
fsfreeze -f /mnt
say FROZEN
await CUT
fsfreeze -u /mnt
echo "thawed; writing more"
mkdir /mnt/after
dd if=/dev/urandom of=/mnt/after/big bs=1M count=8 2>/dev/null
dd if=/dev/zero of=/mnt/after/zeros bs=1M count=4 2>/dev/null
rm /mnt/before/f1*
echo changed >> /mnt/before/f5
sync
fstrim /mnt
umount /mnt
e2fsck -fn $dev >/dev/null
echo "GUEST-DEV-SHA256: $(sha256sum $dev | cut -d' ' -f1)"
say DONE
