# Shared by the guest test drivers: paths, the build, kernel and initramfs, daemons.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
guest="$repo/target/guest"
vsnap="$repo/target/debug/vsnap"

prepare() {
  "$repo/tests/guest/deps.sh"
  (cd "$repo" && cargo build -q --bin vsnap)
  "$repo/tests/guest/kernel.sh" "$guest/kernel" >/dev/null
  [ -f "$guest/initramfs.cpio.gz" ] || "$repo/tests/guest/initramfs.sh" "$guest/kernel" "$guest/initramfs.cpio.gz"
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
  { echo '#!/bin/sh'; printf '%s\n' "${GUEST_ENV[@]}"; tail -n +2 "$script"; } > "$s"
  local rc=0
  "$repo/tests/guest/run-guest.sh" "$guest/kernel" "$guest/initramfs.cpio.gz" "$s" "$log" "$timeout" "$@" || rc=$?
  rm -f "$s"
  return $rc
}

# marker LOG NAME: the value printed as "NAME: value" by the guest.
marker() {
  grep -a -o "$2: [0-9a-f]*" "$1" | tail -1 | awk '{print $2}'
}

# stop_daemon: SIGTERM the daemon in $daemon (if any) and wait for it to persist and exit.
stop_daemon() {
  if [ -n "${daemon:-}" ]; then kill -TERM "$daemon" 2>/dev/null || true; wait "$daemon" 2>/dev/null || true; daemon=; fi
}

fail() { echo "FAIL: $*" >&2; exit 1; }
