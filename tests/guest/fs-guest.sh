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
# a new symlink's own owner and times (coreutils' -h: lchown, utimensat with
# AT_SYMLINK_NOFOLLOW); the daemon must not reach it through /proc/self/fd, which follows it
ln -s small own-link
chown -h 1234:5678 own-link
touch -h -d '2020-01-02 03:04:05' own-link
check "lchown" "$(stat -c '%u %g' own-link)" "1234 5678"
check "lutimes" "$(stat -c %Y own-link)" "$(date -d '2020-01-02 03:04:05' +%s)"
check "lchown left the target" "$(stat -c '%u' small)" 0

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

# special files made by guest root: a device node or FIFO on the share is the guest's own (its
# kernel opens its own device or pipe); the daemon must never open the host's, which would give
# the guest the host's devices or wedge a daemon thread on a FIFO. Each open runs under timeout;
# one still running after that is blocked on a FUSE request the daemon never answers (not even
# SIGKILL ends it), so the suite stops there. fs.sh checks the host's kernel log for the marker.
hex=$(head -c 8 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "KMSG-MARKER: $hex"
kmark="vsnap-guest-kmsg-$hex"
stuck() {
  echo "FAIL: $1 did not return: the daemon stopped answering"
  # The normal exit path would sync the wedged share first and never reach poweroff.
  echo "VSNAP-GUEST-RESULT: 1"
  poweroff -f
}
# bounded NAME SNIPPET: runs SNIPPET under timeout 10; prints its exit status.
bounded() {
  rm -f /tmp/bounded.rc
  (rc=0; timeout 10 sh -c "$2" < /dev/null > /dev/null 2>&1 || rc=$?; echo $rc > /tmp/bounded.rc) &
  local i=0
  while [ ! -s /tmp/bounded.rc ]; do
    i=$((i + 1)); [ $i -le 150 ] || stuck "$1"
    sleep 0.1
  done
  echo "special: $1: exit $(cat /tmp/bounded.rc)"
}
mkdir $m/special && cd $m/special
mknod kmsg c 1 11 && mknod loop b 7 0 && mkfifo fifo
check "mknod c 1 11" "$(stat -c '%F %t:%T' kmsg)" "character special file 1:b"
check "mknod b 7 0" "$(stat -c '%F %t:%T' loop)" "block special file 7:0"
check "mkfifo" "$(stat -c %F fifo)" "fifo"
# Forget every dentry: the next opens look the nodes up afresh. The driver's O_CREAT open
# (fuse_atomic_open) looks the name up first and then opens the node as the guest's own, so a
# stock kernel sends CREATE over an existing node only when the name appears between the two;
# tests/fs_adversarial.rs sends that CREATE directly.
sync; echo 3 > /proc/sys/vm/drop_caches
bounded "exec 3<>kmsg" "exec 3<>$m/special/kmsg && echo $kmark >&3"
bounded "echo > kmsg" "echo $kmark > $m/special/kmsg"
dmesg | grep -q "$kmark" || { echo "FAIL: the marker is not in the guest's own kernel log"; exit 1; }
bounded "exec 3<>loop" "exec 3<>$m/special/loop && echo $kmark >&3"
sync; echo 3 > /proc/sys/vm/drop_caches
bounded "exec 3<>fifo" "exec 3<>$m/special/fifo && echo $kmark >&3"
# A FIFO on the share is a pipe inside the guest.
(timeout 10 cat $m/special/fifo > /tmp/fifo.out 2>&1 &)
bounded "echo > fifo" "echo $kmark > $m/special/fifo"
i=0; while [ ! -s /tmp/fifo.out ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
check "through the FIFO" "$(cat /tmp/fifo.out)" "$kmark"
sync; echo 3 > /proc/sys/vm/drop_caches
bounded "echo > fifo without a reader" "echo $kmark > $m/special/fifo"
cd $m/work && rm -r $m/special
check "after the special files" "$(cat small)" abcdef

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
