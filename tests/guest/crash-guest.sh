#!/bin/sh
# In the guest (tests/guest/crash.sh drives it): two rounds of writes that are never flushed,
# each followed by the host killing vsnap with SIGKILL and starting it again; after each restart
# everything written so far must read back. Every write goes to the device with O_DIRECT (it has
# completed when dd or fio returns) and to a model of the disk in guest RAM; nothing calls fsync,
# and no file system is mounted (ext4 would flush on its own with every journal commit).
#
# Layout of the 128 MiB disk, round r at base = (r - 1) * 64 MiB:
#   base + 0      24 MiB  fio randwrite 4k, iodepth 16, with crc32c verification headers
#   base + 32M    16 MiB  random pattern written as 64 chunks of 256 KiB in shuffled order
#   base + 48M     8 MiB  16 writes of 1..15 sectors at random sector offsets (partial blocks)
# Round 2 also changes round 1's pattern: zeros written, discarded and zeroed-out ranges (data
# blocks that become zero blocks), new data over old, a sector written into a zeroed block.
set -eEu
trap 'echo "FAIL: line $LINENO: \"$BASH_COMMAND\" exited with status $?"' ERR
dev=/dev/vda
model=/tmp/model.img
MiB=1048576

# The test only means something with a write-back cache: in write-through mode vsnap flushes
# after every write and there would be nothing unflushed to lose.
serial=$(cat /sys/block/vda/serial)
cache=$(cat /sys/block/vda/queue/write_cache)
echo "disk: serial $serial, $(($(cat /sys/block/vda/size) / 2048)) MiB, cache $cache"
[ "$serial" = vsnap-crash ] || { echo "FAIL: /dev/vda is not the vsnap disk"; exit 1; }
[ "$cache" = "write back" ] || { echo "FAIL: the disk is not in write-back mode"; exit 1; }
[ "$(cat /sys/block/vda/size)" -eq $((128 * 2048)) ] || { echo "FAIL: disk is not 128 MiB"; exit 1; }
truncate -s 128M $model

# put FILE OFFSET LEN: the first LEN bytes of FILE to the disk at byte OFFSET (O_DIRECT, no
# sync) and to the model. OFFSET and LEN are multiples of 512.
put() {
  dd if="$1" of=$dev bs="$3" count=1 seek="$2" oflag=direct,seek_bytes conv=notrunc status=none
  dd if="$1" of=$model bs="$3" count=1 seek="$2" oflag=seek_bytes conv=notrunc status=none
}
# zero OFFSET LEN: the same for zeros.
zero() { head -c "$2" /dev/zero > /tmp/z; put /tmp/z "$1" "$2"; }
# fio_job R [fio options]: round R's fio region (the same job each time, so the same offsets).
fio_job() {
  local r=$1; shift
  fio --name="crash$r" --filename=$dev --offset=$(((r - 1) * 64))M --size=24M --rw=randwrite \
      --bs=4k --direct=1 --fsync=0 --end_fsync=0 --ioengine=libaio --iodepth=16 --randrepeat=1 \
      --randseed="$r" --verify=crc32c --do_verify=0 --verify_state_save=0 "$@" > "/tmp/fio$r.out" 2>&1
}

write_round() {
  local r=$1 base=$((($1 - 1) * 64 * MiB)) i n s
  RANDOM=$r
  fio_job "$r" && grep -q "err= 0" "/tmp/fio$r.out" || { cat "/tmp/fio$r.out"; exit 1; }
  # What the device returns for the fio region now, before the crash, goes into the model.
  dd if=$dev of=$model bs=1M count=24 skip=$((base / MiB)) seek=$((base / MiB)) iflag=direct \
     conv=notrunc status=none
  head -c $((16 * MiB)) /dev/urandom > /tmp/pat
  for i in $(seq 0 63 | shuf); do
    dd if=/tmp/pat of=/tmp/chunk bs=256k skip="$i" count=1 status=none
    put /tmp/chunk $((base + 32 * MiB + i * 256 * 1024)) $((256 * 1024))
  done
  for i in $(seq 16); do
    n=$((1 + RANDOM % 15)) s=$((RANDOM % 16384))
    head -c $((n * 512)) /dev/urandom > /tmp/chunk
    put /tmp/chunk $((base + 48 * MiB + s * 512)) $((n * 512))
  done
  if [ "$r" -eq 2 ]; then # over round 1's pattern at 32M..48M
    zero $((32 * MiB)) $MiB                                     # data -> zero blocks
    blkdiscard -o $((34 * MiB)) -l $MiB $dev                    # discard: reads as zeros
    dd if=/dev/zero of=$model bs=1M count=1 seek=34 conv=notrunc status=none
    blkdiscard -z -o $((36 * MiB)) -l $MiB $dev                 # write zeroes
    dd if=/dev/zero of=$model bs=1M count=1 seek=36 conv=notrunc status=none
    head -c $((512 * 1024)) /dev/urandom > /tmp/chunk
    put /tmp/chunk $((38 * MiB + 4096)) $((512 * 1024))          # new data over old
    head -c 512 /dev/urandom > /tmp/chunk
    put /tmp/chunk $((32 * MiB + 8192 + 1024)) 512               # one sector into a zero block
  fi
}

# check R: after restart R, everything rounds 1..R wrote reads back: the whole disk equals the
# model, and fio's headers (offset and crc32c of every block) check out.
check_round() {
  local r=$1 j i bad=0 lost
  echo 3 > /proc/sys/vm/drop_caches
  dd if=$dev of=/tmp/disk.img bs=1M iflag=direct status=none
  if ! cmp -s /tmp/disk.img $model; then
    echo "FAIL: after restart $r the disk differs from what the guest wrote: $(cmp /tmp/disk.img $model || true)"
    echo "  MiB that differ:$(for i in $(seq 0 127); do
      [ "$(dd if=/tmp/disk.img bs=1M skip="$i" count=1 status=none | sha256sum)" = \
        "$(dd if=$model bs=1M skip="$i" count=1 status=none | sha256sum)" ] || printf ' %s' "$i"; done)"
    bad=1
  fi
  rm /tmp/disk.img
  for j in $(seq "$r"); do
    # verify_only pretends to write, then reads every block back: all 6144 must be read, and
    # each bad one is a "verify:" line (continue_on_error: count them all, not the first).
    fio_job "$j" --verify_only --do_verify=1 --continue_on_error=verify || true
    lost=$(grep -c "^verify:" "/tmp/fio$j.out" || true)
    if [ "$lost" != 0 ] || ! grep -q "issued rwts: total=6144," "/tmp/fio$j.out"; then
      echo "FAIL: after restart $r fio finds $lost of round $j's 6144 blocks wrong; first:"
      grep -m 3 "^verify:" "/tmp/fio$j.out" || tail -n 20 "/tmp/fio$j.out"
      bad=1
    fi
  done
  [ "$bad" = 0 ] || exit 1
}

for r in 1 2; do
  write_round "$r"
  echo "round $r: written (fio 24 MiB at iodepth 16, 16 MiB pattern, 16 partial writes), nothing flushed"
  # Every write above has completed: nothing is in flight when the host kills the daemon.
  say "WRITTEN $r"
  await "RESTARTED $r"
  check_round "$r"
  echo "round $r: every write of rounds 1..$r read back after kill -9 and restart $r"
done
if dmesg | grep -i -E "I/O error|blk_update_request|virtio_blk.*(error|timeout)|hung_task"; then
  echo "FAIL: the guest kernel logged I/O errors"
  exit 1
fi
echo "MODEL-SHA256: $(sha256sum $model | cut -d' ' -f1)"
say DONE
