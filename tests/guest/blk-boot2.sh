#!/bin/sh
# Second boot on the same socket and disk: the first boot's files are there and intact.
set -eu
dev=/dev/vda
e2fsck -fn $dev
mount $dev /mnt
[ "$(sha256sum /mnt/data/big | cut -d' ' -f1)" = "$(cat /mnt/big.sha)" ]
[ "$(cat /mnt/data/small.42)" = "file 42" ]
[ ! -e /mnt/data/gone ] && [ ! -e /mnt/data/small.15 ]
echo "second boot sees the first boot's files"
echo "boot 2" > /mnt/data/boot2
umount /mnt
e2fsck -fn $dev
echo "GUEST-DEV-SHA256: $(sha256sum $dev | cut -d' ' -f1)"
