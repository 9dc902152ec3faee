#!/usr/bin/env bash
# Live snapshot in a real guest: the guest freezes its ext4, the host cuts over the control
# socket, the guest thaws and keeps writing. Then: base + diff 1 is a clean file system holding
# exactly the files written before the freeze; base + diffs 1..2 equals the guest's final disk;
# the qcow2 overlays of the same diffs compare equal under qemu-img.
source "$(dirname "$0")/lib.sh"
prepare
start_work
ctl() { "$vsnap" ctl --api-socket "$work/api.sock" "$@"; }

"$vsnap" image create "$work/base.img" --size 256M
sock="$work/blk.sock"
RUST_LOG=info "$vsnap" blk --socket-path "$sock" --base "$work/base.img" --state-dir "$work/state" \
  --api-socket "$work/api.sock" --num-queues 2 > "$work/daemon.log" 2>&1 &
daemon=$!
wait_for "$sock"
wait_for "$work/api.sock"
[ "$(stat -c %a "$work/api.sock")" = 600 ] || fail "control socket is not 0600"
ctl_start
on_guest() { # the guest froze its file system: cut, then let it thaw
  [ "$1" = FROZEN ] || return 0
  ctl cut --durable | tee "$work/cut1.txt" >&2
  echo CUT
}
guest "$repo/tests/guest/snapshot-guest.sh" "$work/guest.log" 600 \
  -chardev "socket,id=c0,path=$sock" -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
  "${ctl_qemu[@]}" &
qemu=$!
ctl_loop on_guest
wait "$qemu" || { cat "$work/guest.log"; fail "guest script failed"; }
qemu=
want=$(marker "$work/guest.log" GUEST-DEV-SHA256)
[ -n "$want" ] || fail "no device checksum from the guest"
grep -q "froze generation 1" "$work/cut1.txt" || fail "first cut did not freeze generation 1"

ctl cut > "$work/cut2.txt"
ctl export 1 --path "$work/g1.diff" --wait >/dev/null
ctl export 2 --path "$work/g2.diff" --wait >/dev/null
ctl generations
"$vsnap" diff apply --base "$work/base.img" --out "$work/g1.img" "$work/g1.diff"
"$vsnap" diff apply --base "$work/base.img" --out "$work/g2.img" "$work/g1.diff" "$work/g2.diff"

# Generation 1: a clean file system with exactly the files from before the freeze.
e2fsck -fn "$work/g1.img" >/dev/null || fail "e2fsck of generation 1"
mkdir "$work/g1"
debugfs -R "rdump /before $work/g1" "$work/g1.img" 2>/dev/null
debugfs -R "dump /before.sha $work/g1/before.sha" "$work/g1.img" 2>/dev/null
(cd "$work/g1/before" && sha256sum --quiet -c ../before.sha) || fail "generation 1 lost files from before the freeze"
if debugfs -R "stat /after" "$work/g1.img" 2>/dev/null | grep -q Inode; then fail "generation 1 holds files written after the cut"; fi
echo "snapshot: generation 1 is clean and holds exactly the pre-freeze files"

got=$(sha256sum "$work/g2.img" | cut -d' ' -f1)
[ "$got" = "$want" ] || fail "base + all diffs ($got) != the guest's final disk ($want)"
echo "snapshot: base + diffs reproduces the guest's final disk ($want)"

# The same diffs as qcow2 overlays (exported by the daemon), chained over the base.
ctl export 1 --path "$work/g1.qcow2" --format qcow2 --backing "$work/base.img" --wait >/dev/null
ctl export 2 --path "$work/g2.qcow2" --format qcow2 --backing "$work/g1.qcow2" --wait >/dev/null
qemu-img check -q "$work/g2.qcow2" || fail "qemu-img check"
qemu-img compare -q -f raw -F qcow2 "$work/g2.img" "$work/g2.qcow2" || fail "qcow2 chain differs from the raw image"
qemu-img compare -q -f raw -F qcow2 "$work/g1.img" "$work/g1.qcow2" || fail "qcow2 generation 1 differs"
echo "snapshot: qcow2 overlays match (qemu-img compare)"

kill -TERM "$daemon"; wait "$daemon" || fail "daemon exit status"; daemon=
echo "snapshot guest test: 1 passed, 0 failed"
