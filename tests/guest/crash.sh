#!/usr/bin/env bash
# Completed writes survive kill -9 of vsnap blk, in a real guest: QEMU (TCG) with a
# vhost-user-blk disk on a reconnecting chardev; the guest writes without ever flushing
# (tests/guest/crash-guest.sh), says so, the host checks that the daemon saw no FLUSH, kills it
# with SIGKILL and starts it again on the same state dir and socket, QEMU reconnects and the
# guest reads everything back. Twice in one boot. Then the image materialized on the host after
# a clean stop must equal the guest's model of its disk.
#
# QEMU 7.2 reconnect: `reconnect=1` on the socket chardev (seconds between attempts) is all it
# takes, no other option; QEMU is back about 1 s after the new daemon listens (the daemon removes
# the dead one's socket file). When the daemon dies QEMU logs "Failed to set msg fds." and "vhost
# VQ n ring restore failed: -22": it cannot ask a dead backend for the ring state. Expected.
source "$(dirname "$0")/lib.sh"
prepare
start_work
ctl() { "$vsnap" ctl --api-socket "$work/api.sock" "$@"; }
sock="$work/blk.sock"
n=0

die() {
  echo "FAIL: $*" >&2
  echo "--- guest log (tail) ---" >&2
  tail -n 60 "$work/guest.log" >&2 || true
  for f in "$work"/daemon.*.log; do echo "--- $f (tail) ---" >&2; tail -n 15 "$f" >&2; done
  exit 1
}

# wait_log N PATTERN SECONDS: until daemon N's log holds PATTERN (and daemon N still runs).
wait_log() {
  for _ in $(seq $(($3 * 20))); do
    grep -q "$2" "$work/daemon.$1.log" 2>/dev/null && return 0
    kill -0 "$daemon" 2>/dev/null || die "daemon $1 exited while waiting for '$2'"
    sleep 0.05
  done
  die "daemon $1: no '$2' in its log within $3 s"
}

start_daemon() {
  n=$((n + 1))
  RUST_LOG=info "$vsnap" blk --socket-path "$sock" --size 128M --state-dir "$work/state" \
    --api-socket "$work/api.sock" --num-queues 2 --serial vsnap-crash \
    > "$work/daemon.$n.log" 2>&1 &
  daemon=$!
  # The socket file may still be the killed daemon's: wait for this one to listen.
  wait_log "$n" listening 20
}

# The guest has written round $1 and has nothing in flight: check no FLUSH reached the daemon
# (else the writes were made durable the old way), then kill -9 and restart it.
crash_and_restart() {
  local r=$1 stats flushes writes
  stats=$(ctl --json stats) || die "round $r: vsnap ctl stats failed"
  read -r flushes writes < <(python3 -c 'import json, sys; r = json.load(sys.stdin)["requests"]; print(r["flushes"], r["writes"])' <<<"$stats") ||
    die "round $r: unexpected stats: $stats"
  # The guest sees a write-back cache and never flushes: a flush per write means vsnap serves
  # it write-through (see the guest's "cache" line) and the crash would prove nothing.
  [ "$flushes" = 0 ] ||
    die "round $r: the daemon counted $flushes flushes for $writes writes; the guest sent none"
  [ "$writes" -gt 0 ] || die "round $r: the daemon saw no writes"
  kill -KILL "$daemon"
  wait "$daemon" 2>/dev/null || true
  daemon=
  echo "crash: round $r: $writes writes, 0 flushes; daemon $n killed with SIGKILL" >&2
  start_daemon
  grep -q "recovered every completed write from the live block states" "$work/daemon.$n.log" ||
    die "daemon $n did not recover from the live block states"
  # QEMU retries every second; the guest's next request must find the queues running.
  wait_log "$n" "frontend connected" 30
  sleep 1
  echo "crash: round $r: daemon $n recovered and QEMU reconnected" >&2
}

on_guest() {
  case "$1" in
    "WRITTEN "[12]) crash_and_restart "${1#WRITTEN }"; echo "RESTARTED ${1#WRITTEN }" ;;
  esac
}

start_daemon
ctl_start
guest "$repo/tests/guest/crash-guest.sh" "$work/guest.log" 900 \
  -chardev "socket,id=c0,path=$sock,reconnect=1" \
  -device vhost-user-blk-pci,chardev=c0,num-queues=2 "${ctl_qemu[@]}" &
qemu=$!
ctl_loop on_guest
wait "$qemu" || die "the guest script failed (status $?)"
qemu=
grep -a -E "^(disk|round [12]):" "$work/guest.log"
want=$(marker "$work/guest.log" MODEL-SHA256)
[ -n "$want" ] || die "no model checksum from the guest"
[ "$n" = 3 ] || die "expected two restarts, saw $((n - 1))"

kill -TERM "$daemon"
wait "$daemon" || die "daemon exit status $? after SIGTERM"
daemon=
"$vsnap" materialize --state-dir "$work/state" --out "$work/disk.img" 2>/dev/null ||
  die "vsnap materialize failed"
got=$(sha256sum "$work/disk.img" | cut -d' ' -f1)
[ "$got" = "$want" ] || die "materialized image $got != the guest's model of its disk $want"
echo "crash: the materialized image equals what the guest wrote ($want)"
echo "crash guest test: 1 passed, 0 failed"
