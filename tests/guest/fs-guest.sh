#!/bin/sh
# In the guest: exercise the virtio-fs share, print a manifest of the tree for the host to
# compare (lines "M: ..."), and hold 20,000 looked-up inodes while the host counts the daemon's fds.
set -eu
m=/mnt
check() { [ "$2" = "$3" ] || { echo "FAIL: $1: got '$2', want '$3'"; exit 1; }; }
mount -t virtiofs vsnap $m
check "file from the host" "$(cat $m/from-host.txt)" "made on the host"

# create, write, read back
mkdir $m/work && cd $m/work
dd if=/dev/urandom of=data bs=64k count=40 2>/dev/null
sum=$(sha256sum data | cut -d' ' -f1)
sync; echo 3 > /proc/sys/vm/drop_caches
check "read back" "$(sha256sum data | cut -d' ' -f1)" "$sum"
printf 'abc' > small && printf 'def' >> small
check "append" "$(cat small)" "abcdef"

# hard links: the guest sees the true link count (not ours)
echo linked > l1
check "nlink of a new file" "$(stat -c %h l1)" 1
ln l1 l2 && ln l1 l3
check "nlink after two links" "$(stat -c %h l1)" 3
rm l3
check "nlink after unlink" "$(stat -c %h l2)" 2

# symlinks (the guest resolves them; an absolute one points into the guest's namespace)
ln -s small rel-link
ln -s /etc/hostname abs-link
check "readlink" "$(readlink rel-link)" small
check "through a symlink" "$(cat rel-link)" abcdef

# rename, rename over an existing file, rename a directory
echo one > r1 && echo two > r2
mv r1 r2
check "rename over" "$(cat r2)" one
[ ! -e r1 ] || { echo "FAIL: r1 still exists"; exit 1; }
mkdir dir1 && echo in > dir1/f && mv dir1 dir2
check "renamed dir" "$(cat dir2/f)" in

# mkdir / rmdir
mkdir gone && rmdir gone
[ ! -e gone ] || { echo "FAIL: rmdir"; exit 1; }
if rmdir dir2 2>/dev/null; then echo "FAIL: rmdir of a non-empty dir"; exit 1; fi

# attributes: chmod, chown, utimens, truncate, fallocate
echo attrs > attrs && chmod 640 attrs && chown 1234:5678 attrs
check "chmod/chown" "$(stat -c '%a %u %g' attrs)" "640 1234 5678"
touch -d '2020-01-02 03:04:05' attrs
check "utimens" "$(stat -c %Y attrs)" "$(date -d '2020-01-02 03:04:05' +%s)"
truncate -s 100000 trunc && truncate -s 1000 trunc
check "truncate" "$(stat -c %s trunc)" 1000
fallocate -l 1048576 falloc
check "fallocate size" "$(stat -c %s falloc)" 1048576
[ "$(stat -c %b falloc)" -ge 2048 ] || { echo "FAIL: fallocate allocated $(stat -c %b falloc) blocks"; exit 1; }

# xattrs (the daemon runs with --xattr)
setfattr -n user.vsnap -v guest-value attrs
check "getxattr" "$(getfattr --only-values -n user.vsnap attrs)" guest-value
setfattr -n user.tmp -v x attrs && setfattr -x user.tmp attrs
getfattr -d attrs | grep -q user.tmp && { echo "FAIL: removexattr"; exit 1; }

# a deep tree
p=deep; i=0; while [ $i -lt 64 ]; do p=$p/d$i; i=$((i + 1)); done
mkdir -p $p && echo bottom > $p/leaf
check "deep leaf" "$(cat $p/leaf)" bottom

# unlink while open, then read through the open fd
echo still-here > open-unlinked
exec 3< open-unlinked
rm open-unlinked
check "read after unlink" "$(cat <&3)" still-here
exec 3<&-

# the workdir (inside the share on the host) is invisible
ls -a $m | grep -q vsnap-workdir && { echo "FAIL: the workdir is visible"; exit 1; }
cd /

# find over the 20,000 files the host made; keep them looked up while the host counts fds
check "find" "$(find $m/many -type f | wc -l)" 20000
stat $m/many/*/* > /dev/null
say HOLDING
await COUNTED

cd $m
find . -path ./many -prune -o -print | sort | while read -r p; do
  if [ -L "$p" ]; then echo "M: $p link $(readlink "$p")"
  elif [ -d "$p" ]; then echo "M: $p dir $(stat -c '%a %u %g' "$p")"
  else echo "M: $p file $(stat -c '%a %u %g %s %h %Y' "$p") $(sha256sum < "$p" | cut -d' ' -f1)"
  fi
done
cd /
umount $m
echo "fs guest checks passed"
say DONE
