#!/usr/bin/env bash
# Restarting vsnap blk under a guest's load: QEMU (TCG) reconnects (`reconnect=1`) while fio
# (randwrite, iodepth 16, --verify) runs in the guest; the daemon is restarted twice with
# SIGTERM. fio must complete, its verification pass, and the guest log no I/O error.
#   KILL9=1 tests/guest/reconnect.sh   restarts with kill -9 instead (needs the block layer's
#                                      crash consistency).
#   WRITE_THROUGH=1 ...                the guest sets write-through first; every restarted
#                                      daemon must come back in write-through.
#   VSNAP=/path/to/vsnap ...           runs another build (e.g. a release, to compare).
source "$(dirname "$0")/lib.sh"
prepare
vsnap=${VSNAP:-$vsnap}
start_work
sig=${KILL9:+KILL}
sig=${sig:-TERM}
restarts=${RESTARTS:-2}
queues=2
sock="$work/blk.sock"
n=0
start_daemon() {
  n=$((n + 1))
  RUST_LOG=info "$vsnap" blk --socket-path "$sock" --size 512M --state-dir "$work/state" \
    --num-queues $queues --serial vsnap-reconnect > "$work/daemon.$n.log" 2>&1 &
  daemon=$!
  # The socket file may be a dead daemon's: wait for this one to listen.
  for _ in $(seq 200); do
    grep -q listening "$work/daemon.$n.log" 2>/dev/null && return 0
    kill -0 "$daemon" 2>/dev/null || { cat "$work/daemon.$n.log"; fail "daemon $n exited"; }
    sleep 0.05
  done
  fail "daemon $n did not listen"
}
restart_daemon() {
  sleep 2
  local t0 t1
  t0=$(date +%s%N)
  kill -"$sig" "$daemon"
  local rc=0
  wait "$daemon" || rc=$?
  t1=$(date +%s%N)
  if [ "$sig" = TERM ]; then
    [ "$rc" -eq 0 ] || fail "daemon $n exited with status $rc after SIGTERM"
    echo "reconnect: daemon $n exited $(( (t1 - t0) / 1000000 )) ms after SIGTERM under load" >&2
  fi
  daemon=
  start_daemon
}
start_daemon
wait_for "$sock"
ctl_start
on_guest() { # fio is running: restart the daemon under it
  [ "$1" = START ] || return 0
  for _ in $(seq "$restarts"); do restart_daemon; done
  # Let QEMU reconnect to the last one before the guest checks on fio.
  sleep 2
  echo RESTARTED
}
GUEST_ENV=("FIO_SIZE=${FIO_SIZE:-256M}" "WRITE_THROUGH=${WRITE_THROUGH:-}")
guest "$repo/tests/guest/reconnect-guest.sh" "$work/guest.log" "${GUEST_TIMEOUT:-900}" \
  -chardev "socket,id=c0,path=$sock,reconnect=1" \
  -device "vhost-user-blk-pci,chardev=c0,num-queues=$queues" "${ctl_qemu[@]}" &
qemu=$!
ctl_loop on_guest
rc=0; wait "$qemu" || rc=$?
# The guest is gone; cleared so the cleanup (lib.sh) does not trip over killing it.
qemu=
[ "$rc" -eq 0 ] || { cat "$work/guest.log"; tail -n 20 "$work"/daemon.*.log; fail "guest script failed"; }
grep -a -E "fio verify ok|no guest I/O errors|still running" "$work/guest.log"
connections=$(cat "$work"/daemon.*.log | grep -c "frontend connected" || true)
[ "$connections" -ge $((restarts + 1)) ] || fail "expected $((restarts + 1)) connections, saw $connections"
mode=write-back
if [ -n "${WRITE_THROUGH:-}" ]; then
  mode=write-through
  grep -q "guest set the cache mode writeback=false" "$work/daemon.1.log" || fail "the guest did not set write-through"
  for i in $(seq 2 "$n"); do
    grep -q "cache mode the guest set earlier writeback=false" "$work/daemon.$i.log" ||
      fail "daemon $i did not come back in write-through"
  done
fi
echo "reconnect guest test ($sig x$restarts, $mode): 1 passed, 0 failed"
