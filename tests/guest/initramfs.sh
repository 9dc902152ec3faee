#!/usr/bin/env bash
# Builds a small initramfs: busybox, bash as /bin/sh (busybox's shell runs its own applets ahead
# of real binaries, which broke `blkdiscard -z`), the real tools the tests use with the libraries
# ldd lists, and the kernel modules for virtio-blk, virtio-fs and ext4.
# Usage: initramfs.sh KERNEL_DIR OUT.cpio.gz
set -euo pipefail
kdir=$1 out=$2
rel=$(cat "$kdir/release")
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,mnt,lib,lib64,etc,run}
cp /bin/busybox "$root/bin/busybox"
for a in $("$root/bin/busybox" --list); do
  [ -e "$root/bin/$a" ] || ln -s busybox "$root/bin/$a"
done
tools=(bash mkfs.ext4 e2fsck mke2fs fstrim blkdiscard fio fsfreeze sha256sum stat dd truncate fallocate setfattr getfattr sync readlink
       flock chown touch)
for t in "${tools[@]}"; do
  p=$(command -v "$t" 2>/dev/null) || continue
  rm -f "$root/bin/$t"
  cp -L "$p" "$root/bin/$t"
  ldd "$p" 2>/dev/null | grep -o '/[^ ]*' | while read -r lib; do
    mkdir -p "$root$(dirname "$lib")"
    cp -Ln "$lib" "$root$lib" 2>/dev/null || true
  done
done
ln -sf bash "$root/bin/sh"
# e2fsprogs reads /etc/mke2fs.conf for defaults.
[ -f /etc/mke2fs.conf ] && cp /etc/mke2fs.conf "$root/etc/"
mods="$root/lib/modules/$rel"
mkdir -p "$mods"
for m in crc32c_generic crc32c-intel virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev \
         virtio_pci virtio_blk fuse virtiofs jbd2 mbcache crc16 ext4; do
  f=$(find "$kdir/root/lib/modules/$rel" -name "$m.ko" -o -name "${m//-/_}.ko" | head -1)
  [ -n "$f" ] && cp "$f" "$mods/"
done
cat > "$root/init" <<'INIT'
#!/bin/sh
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in crc32c_generic crc32c-intel virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev \
         virtio_pci virtio_blk fuse virtiofs jbd2 mbcache crc16 ext4; do
  f=/lib/modules/*/$m.ko
  [ -e $f ] && insmod $f 2>/dev/null
done
# The test script is appended as a second archive.
if [ -x /test.sh ]; then
  /test.sh
  rc=$?
else
  echo "no /test.sh in the initramfs"
  rc=99
fi
echo "VSNAP-GUEST-RESULT: $rc"
sync
poweroff -f
INIT
chmod +x "$root/init"
(cd "$root" && find . | cpio -o -H newc --quiet) | gzip -1 > "$out"
