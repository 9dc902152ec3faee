#!/usr/bin/env bash
# vsnap blk in a real guest: QEMU (TCG) + Debian kernel + initramfs against vsnap's socket.
source "$(dirname "$0")/lib.sh"
prepare
start_work
queues=2
sock="$work/blk.sock"
RUST_LOG=info "$vsnap" blk --socket-path "$sock" --size 256M --state-dir "$work/state" \
  --num-queues 4 --serial vsnap-guest-test > "$work/daemon.log" 2>&1 &
daemon=$!
wait_for "$sock"
qemu_blk=(-chardev "socket,id=c0,path=$sock" -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues")
GUEST_ENV=("EXPECT_QUEUES=$queues")

echo "blk: boot 1 (limits, fio --verify, discard, zero-out, mkfs -E discard, fstrim, e2fsck)"
guest "$repo/tests/guest/blk-boot1.sh" "$work/boot1.log" 600 "${qemu_blk[@]}" || { cat "$work/boot1.log"; fail "boot 1"; }
grep -a -E "discard_max_bytes|fio verify|discard and zero|second boot" "$work/boot1.log" || true
kill -0 "$daemon" || fail "the daemon exited when the VMM quit"

echo "blk: boot 2 on the same socket (the daemon kept listening)"
guest "$repo/tests/guest/blk-boot2.sh" "$work/boot2.log" 600 "${qemu_blk[@]}" || { cat "$work/boot2.log"; fail "boot 2"; }
want=$(marker "$work/boot2.log" GUEST-DEV-SHA256)
[ -n "$want" ] || fail "no device checksum from the guest"

kill -TERM "$daemon"
wait "$daemon" || fail "daemon exit status $? after SIGTERM"
daemon=
"$vsnap" materialize --state-dir "$work/state" --out "$work/disk.img"
got=$(sha256sum "$work/disk.img" | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "materialized image $got != guest's $want"
grep -c "frontend connected" "$work/daemon.log" | grep -q 2 || fail "expected two connections in the daemon log"
echo "blk: materialized image matches the guest's checksum ($want)"
echo "blk guest test: 1 passed, 0 failed"
