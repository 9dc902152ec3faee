# Shared by the guest test drivers: paths, the build, kernel and initramfs, daemons.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
guest="$repo/target/guest"
vsnap="$repo/target/debug/vsnap"
initrd="$guest/initramfs-$(sha256sum "$repo/tests/guest/initramfs.sh" | cut -c1-12).cpio.gz"

prepare() {
  "$repo/tests/guest/deps.sh"
  (cd "$repo" && cargo build -q --bin vsnap)
  "$repo/tests/guest/kernel.sh" "$guest/kernel" >/dev/null
  # Rebuilt whenever the recipe changes (a new tool for a new test).
  [ -f "$initrd" ] || "$repo/tests/guest/initramfs.sh" "$guest/kernel" "$initrd"
}

# wait_for PATH: until a socket appears (at most 10 s).
wait_for() {
  for _ in $(seq 100); do [ -S "$1" ] && return 0; sleep 0.1; done
  echo "timed out waiting for $1" >&2; return 1
}

# guest SCRIPT LOG TIMEOUT [qemu args]: boot with the script (env lines prepended from GUEST_ENV).
guest() {
  local script=$1 log=$2 timeout=$3; shift 3
  local s; s=$(mktemp)
  { echo '#!/bin/sh'; printf '%s\n' "${GUEST_ENV[@]}"; cat "$repo/tests/guest/guest-ctl.sh"; tail -n +2 "$script"; } > "$s"
  local rc=0
  "$repo/tests/guest/run-guest.sh" "$guest/kernel" "$initrd" "$s" "$log" "$timeout" "$@" || rc=$?
  rm -f "$s"
  return $rc
}

# guest_initrd SCRIPT OUT: the initramfs with SCRIPT appended as /test.sh (GUEST_ENV lines and
# the say/await channel prepended, as guest() does), for a VMM that boots it itself (libvirt).
# The appended archive must start on a 4-byte boundary or the kernel silently ignores it.
guest_initrd() {
  local script=$1 out=$2 d
  d=$(mktemp -d)
  { echo '#!/bin/sh'; printf '%s\n' "${GUEST_ENV[@]}"; cat "$repo/tests/guest/guest-ctl.sh"; tail -n +2 "$script"; } > "$d/test.sh"
  chmod +x "$d/test.sh"
  cp "$initrd" "$out"
  head -c $(( (4 - $(stat -c %s "$out") % 4) % 4 )) /dev/zero >> "$out"
  (cd "$d" && echo test.sh | cpio -o -H newc --quiet) >> "$out"
  rm -rf "$d"
}

# The host side of the guest's say/await channel (tests/guest/guest-ctl.sh): a second serial
# port backed by FIFOs in $work. Pass "${ctl_qemu[@]}" to guest(), start it in the background,
# then ctl_loop HANDLER: HANDLER runs for every line the guest says (its output goes back to the
# guest) until the guest says DONE or exits.
ctl_start() {
  mkfifo "$work/ctl.in" "$work/ctl.out"
  ctl_qemu=(-chardev "pipe,id=ctl,path=$work/ctl" -serial chardev:ctl)
}
ctl_loop() {
  local line
  exec 3<"$work/ctl.out" 4>"$work/ctl.in"
  while IFS= read -r line <&3; do
    line=${line%$'\r'}
    [ "$line" = DONE ] && break
    "$1" "$line" >&4
  done
  exec 3<&- 4>&-
}

# marker LOG NAME: the value printed as "NAME: value" by the guest.
marker() {
  grep -a -o "$2: [0-9a-f]*" "$1" | tail -1 | awk '{print $2}'
}

# start_work: a fresh $work directory; on exit the guest ($qemu) and the daemon ($daemon) are
# stopped and $work removed (kept, and named, with KEEP=1).
start_work() {
  work=$(mktemp -d)
  daemon= qemu=
  trap cleanup_work EXIT
}
cleanup_work() {
  # $qemu is the background job that runs QEMU: take its whole process tree down.
  if [ -n "${qemu:-}" ]; then kill_tree "$qemu"; fi
  stop_daemon
  if [ -n "${KEEP:-}" ]; then echo "kept $work" >&2; else rm -rf "$work"; fi
}

# kill_tree PID: SIGTERM PID and every process below it (never fails: used in traps).
kill_tree() {
  local c
  for c in $(cat /proc/"$1"/task/*/children 2>/dev/null); do kill_tree "$c"; done
  kill "$1" 2>/dev/null || true
}

# stop_daemon: SIGTERM the daemon in $daemon (if any) and wait for it to persist and exit.
stop_daemon() {
  if [ -n "${daemon:-}" ]; then kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; daemon=; fi
}

fail() { echo "FAIL: $*" >&2; exit 1; }
