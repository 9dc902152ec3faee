#!/bin/sh
# In a libvirt domain (tests/guest/libvirt.sh): mount the virtiofs share libvirt's daemon serves,
# write and read back, check what the variant turns on (xattrs, flock, the page cache), and write
# a pattern to the vhost-user disk. Prints FS-SHA256 and BLK-SHA256 markers for the host.
# Environment (from the host): VARIANT, TAG, BLK_SERIAL, BLK_MB (the disk's 1 MiB slot for this
# variant), XATTR=1 (xattrs are served), LOCKS=1 (check flock), CACHE_ALWAYS=1 (the guest keeps
# file data cached across opens), RESTART_BLK=1 (the host restarts vsnap blk mid-write).
set -eu
m=/mnt
check() { [ "$2" = "$3" ] || { echo "FAIL: $1: got '$2', want '$3'"; exit 1; }; }
sum() { sha256sum "$1" | cut -d' ' -f1; }

mount -t virtiofs "$TAG" $m
check "the host's file" "$(cat $m/from-host.txt)" "made on the host for $VARIANT"
say MOUNTED
await INSPECTED

mkdir -p $m/guest/sub
dd if=/dev/urandom of=$m/guest/data bs=64k count=8 2>/dev/null
want=$(sum $m/guest/data)
echo "written by the guest in $VARIANT" > $m/guest/sub/note
sync; echo 3 > /proc/sys/vm/drop_caches
check "data read back" "$(sum $m/guest/data)" "$want"
check "note read back" "$(cat $m/guest/sub/note)" "written by the guest in $VARIANT"
echo "FS-SHA256: $want"

# xattrs are served only when libvirt asked for them (xattr='on' -> -o ...,xattr).
if [ "${XATTR:-}" = 1 ]; then
  setfattr -n user.vsnap -v "$VARIANT" $m/guest/sub/note
  check "getxattr" "$(getfattr --only-values -n user.vsnap $m/guest/sub/note)" "$VARIANT"
  echo "xattr: set and read back"
elif setfattr -n user.vsnap -v "$VARIANT" $m/guest/sub/note 2>/dev/null; then
  echo "FAIL: setxattr succeeded on a share served without xattr"; exit 1
else
  echo "xattr: refused (not asked for)"
fi

# flock: an exclusive lock excludes every other lock on the file until it is released.
if [ "${LOCKS:-}" = 1 ]; then
  f=$m/guest/lockfile
  : > $f
  rm -f /tmp/held
  flock -x $f sh -c 'touch /tmp/held; sleep 3' &
  holder=$!
  i=0; while [ ! -e /tmp/held ]; do i=$((i + 1)); [ $i -le 100 ] || { echo "FAIL: no lock holder"; exit 1; }; sleep 0.1; done
  if flock -n -x $f true; then echo "FAIL: a second exclusive flock succeeded"; exit 1; fi
  if flock -n -s $f true; then echo "FAIL: a shared flock succeeded under an exclusive one"; exit 1; fi
  wait $holder
  flock -n -x $f true || { echo "FAIL: flock after the holder released it"; exit 1; }
  echo "flock: held lock excludes others; released lock can be taken"
fi

# The page cache across opens: with cache=always the daemon answers OPEN with FOPEN_KEEP_CACHE,
# so a change the host makes behind the guest's back stays invisible; with the default (auto)
# every open drops the cached data and the guest reads the host's new bytes.
check "cache probe" "$(cat $m/cache-probe)" host-v1
say CACHE-READ
await CHANGED
sleep 2
if [ "${CACHE_ALWAYS:-}" = 1 ]; then
  check "cache=always keeps the guest's cached data" "$(cat $m/cache-probe)" host-v1
else
  check "cache=auto reads the host's new data" "$(cat $m/cache-probe)" host-v2
fi
echo "cache: probe as expected"

# The vhost-user disk, found by the serial vsnap blk serves.
dev=
for b in /sys/block/vd*; do
  [ "$(cat "$b/serial" 2>/dev/null)" = "$BLK_SERIAL" ] && dev=/dev/${b##*/}
done
[ -n "$dev" ] || { echo "FAIL: no disk with serial $BLK_SERIAL"; ls /sys/block; exit 1; }
dd if=/dev/urandom of=/tmp/pattern bs=512k count=2 2>/dev/null
dd if=/tmp/pattern of="$dev" bs=512k count=1 seek=$((BLK_MB * 2)) oflag=direct conv=fsync 2>/dev/null
if [ "${RESTART_BLK:-}" = 1 ]; then
  # QEMU reconnects (libvirt's <reconnect timeout='1'>) to the restarted daemon.
  say BLK-RESTART
  await RESTARTED
fi
dd if=/tmp/pattern of="$dev" bs=512k count=1 skip=1 seek=$((BLK_MB * 2 + 1)) oflag=direct conv=fsync 2>/dev/null
dd if="$dev" of=/tmp/back bs=1M count=1 skip="$BLK_MB" iflag=direct 2>/dev/null
check "disk read back" "$(sum /tmp/back)" "$(sum /tmp/pattern)"
echo "BLK-SHA256: $(sum /tmp/pattern)"
if dmesg | grep -i -E "I/O error|blk_update_request"; then echo "FAIL: guest I/O errors"; exit 1; fi

umount $m
echo "libvirt guest checks passed ($VARIANT)"
say DONE
