#!/usr/bin/env bash
# vsnap fs in a real guest: QEMU (TCG) + Debian kernel mount the share over vhost-user-fs; the
# guest exercises it (tests/guest/fs-guest.sh), the host then checks the tree is exactly what the
# guest reported, the fd count while the guest held 20,000 inodes, the empty workdir, and that
# nothing the guest wrote to the device nodes it made on the share reached the host's devices.
source "$(dirname "$0")/lib.sh"
prepare
start_work
# The host's kernel log from now on, read from /dev/kmsg (dmesg -C elsewhere cannot hide a record
# from this reader); a control line proves the reader sees new records.
timeout 1800 cat /dev/kmsg > "$work/kmsg" &
kmsg_reader=$!
trap 'kill "$kmsg_reader" 2>/dev/null; cleanup_work' EXIT
control="vsnap-fs-kmsg-control-$$-$RANDOM"
echo "$control" > /dev/kmsg
for _ in $(seq 50); do grep -q "$control" "$work/kmsg" && break; sleep 0.1; done
grep -q "$control" "$work/kmsg" || fail "the host's kernel log is not readable: the device check would be blind"
share="$work/share"
mkdir -p "$share/many"
echo "made on the host" > "$share/from-host.txt"
for d in $(seq 0 99); do
  mkdir "$share/many/$d"
  (cd "$share/many/$d" && touch $(seq -f "f%g" 0 199))
done
sock="$work/fs.sock"
RUST_LOG=info "$vsnap" fs --socket-path "$sock" --shared-dir "$share" --xattr --sandbox namespace \
  > "$work/daemon.log" 2>&1 &
daemon=$!
wait_for "$sock"
ctl_start
# The daemon's own fds, its cache of 64 directory fds and the 64 newest files, held by fd until
# they are linked: far below one per held inode.
fd_limit=192 young=64
on_guest() {
  [ "$1" = HOLDING ] || return 0
  local fds links
  # In namespace mode $daemon is the supervisor; the file system is served by its child.
  local server
  server=$(cat "/proc/$daemon/task/$daemon/children" 2>/dev/null | awk '{print $1}')
  [ -n "$server" ] || server=$daemon
  fds=$(ls "/proc/$server/fd" | wc -l)
  links=$(ls "$share/.vsnap-workdir" | wc -l)
  echo "fs: guest holds 20,000 inodes: daemon has $fds fds open, workdir holds $links links" >&2
  echo "$fds $links" > "$work/held"
  echo COUNTED
}
guest "$repo/tests/guest/fs-guest.sh" "$work/guest.log" 900 \
  -chardev "socket,id=c0,path=$sock" -device vhost-user-fs-pci,chardev=c0,tag=vsnap,queue-size=1024 \
  "${ctl_qemu[@]}" &
qemu=$!
ctl_loop on_guest
wait "$qemu" || { cat "$work/guest.log"; tail -20 "$work/daemon.log"; fail "guest script failed"; }
qemu=
read -r fds links < "$work/held"
[ "$fds" -lt "$fd_limit" ] || fail "the daemon held $fds fds for 20,000 guest inodes (limit $fd_limit)"
[ "$((links + young))" -ge 20000 ] || fail "only $links workdir links while the guest held 20,000 inodes"

# The host's tree, described the way the guest described it.
grep -a -o 'M: .*' "$work/guest.log" | tr -d '\r' | sed 's/^M: //' > "$work/guest.manifest"
(cd "$share" && find . -path ./many -prune -o -path ./.vsnap-workdir -prune -o -print | LC_ALL=C sort | while read -r p; do
  if [ -L "$p" ]; then echo "$p link $(readlink "$p")"
  elif [ -d "$p" ]; then echo "$p dir $(stat -c '%a %u %g' "$p")"
  else echo "$p file $(stat -c '%a %u %g %s %h %Y' "$p") $(sha256sum < "$p" | cut -d' ' -f1)"
  fi
done) > "$work/host.manifest"
LC_ALL=C sort -o "$work/guest.manifest" "$work/guest.manifest"
[ "$(wc -l < "$work/host.manifest")" -gt 80 ] || fail "host manifest too short"
diff "$work/guest.manifest" "$work/host.manifest" || fail "the host's tree differs from what the guest made"
[ "$(getfattr --absolute-names --only-values -n user.vsnap "$share/work/attrs")" = guest-value ] || fail "xattr not on the host"
hex=$(marker "$work/guest.log" KMSG-MARKER)
[ -n "$hex" ] || fail "the guest printed no KMSG-MARKER"
{ grep -a "^special: " "$work/guest.log" || true; } | tr -d '\r' >&2
if grep -q "vsnap-guest-kmsg-$hex" "$work/kmsg"; then
  fail "what the guest wrote to its c 1 11 node on the share reached the host's /dev/kmsg"
fi
echo "fs: the guest's device nodes and FIFO stayed the guest's (no marker in the host's kernel log)"
[ ! -e "$share/work/open-unlinked" ] || fail "unlinked file still on the host"
echo "fs: the host's tree is exactly what the guest made ($(wc -l < "$work/host.manifest") entries)"
left=$(ls -A "$share/.vsnap-workdir" | wc -l)
[ "$left" = 0 ] || fail "$left links left in the workdir after the guest unmounted"
# SIGTERM ends the daemon within 2 s (no worker is stuck in a host open).
kill -TERM "$daemon"
for _ in $(seq 20); do kill -0 "$daemon" 2>/dev/null || break; sleep 0.1; done
if kill -0 "$daemon" 2>/dev/null; then
  kill -KILL "$daemon"; wait "$daemon" || true; daemon=
  fail "the daemon still ran 2 s after SIGTERM"
fi
wait "$daemon" || fail "daemon exit status"; daemon=
echo "fs: workdir empty after unmount; $fds fds for 20,000 held inodes"
echo "fs guest test: 1 passed, 0 failed"
