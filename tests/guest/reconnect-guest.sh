#!/bin/sh
# In the guest: fio randwrite at iodepth 16 with verification while the host restarts the
# vhost-user daemon (QEMU reconnects). Says START when fio runs, waits for RESTARTED, then fio
# must finish with its verification passing and the kernel must have logged no I/O error.
# WRITE_THROUGH=1: the guest switches the disk to write-through first.
set -eu
dev=/dev/vda
if [ -n "${WRITE_THROUGH:-}" ]; then
  echo "write through" > /sys/block/vda/cache_type
  echo "cache type: $(cat /sys/block/vda/cache_type)"
fi
rm -f /tmp/fio.end
(
  rc=0
  fio --name=reconnect --filename=$dev --size="${FIO_SIZE:-256M}" --rw=randwrite --bs=4k \
      --direct=1 --ioengine=libaio --iodepth=16 --numjobs=1 --verify=crc32c --do_verify=1 \
      --verify_fatal=1 --randrepeat=0 >/tmp/fio.out 2>&1 || rc=$?
  echo "$rc" > /tmp/fio.end
) &
fio=$!
# Let fio get going before the host starts restarting.
sleep 2
say START
await RESTARTED
if [ -e /tmp/fio.end ]; then
  echo "fio had finished before the restarts were over: make FIO_SIZE larger"
  exit 1
fi
echo "fio still running after the restarts"
wait $fio
rc=$(cat /tmp/fio.end)
tail -n 25 /tmp/fio.out
[ "$rc" -eq 0 ] || { echo "fio failed ($rc)"; exit 1; }
grep -q "err= 0" /tmp/fio.out || { echo "fio reported errors"; exit 1; }
echo "fio verify ok"
if dmesg | grep -i -E "I/O error|blk_update_request|virtio_blk.*(error|timeout)|hung_task"; then
  echo "guest kernel logged I/O errors"
  exit 1
fi
echo "no guest I/O errors"
say DONE
