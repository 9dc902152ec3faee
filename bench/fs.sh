#!/usr/bin/env bash
# vsnap fs vs Rust virtiofsd 1.14 and QEMU 7.2's C virtiofsd, in the same run, on the same share,
# driven by the same FUSE-over-vhost-user frontend (vsnap-fsbench, no VM). Each daemon is measured
# with the machine quiet and again with a CPU-bound process running alongside ("busy"):
#   io   4k and 128k READ and WRITE with 1 and 16 requests in flight (IOPS, median round trip,
#        daemon and frontend CPU, context switches, interrupts and kicks per request); vsnap
#        also with two request queues (16 in flight shared out among them);
#   ops  one request at a time: GETATTR, path lookups by depth (fitted per component),
#        create+release+unlink, reads and writes;
#   floor a null daemon (vsnap-fsfloor: sleep on the kick, one fstatat, signal), per condition:
#        the least CPU any daemon can spend on a LOOKUP round trip here;
#   hold (quiet only) fds, RSS and kernel slab growth while holding 100k and 1M inodes looked up
#        (as root the open-file limit is raised to fs.nr_open first, so that daemons holding an
#        fd per inode get as far as the machine allows).
# Prints Markdown tables; the JSON lines land in target/fsbench/results.jsonl.
# Usage: bench/fs.sh [seconds per io case]. Environment: FS_BENCH_CONDITIONS ("quiet busy"),
# FS_BENCH_HOLD: the hold sizes, in directories of FS_BENCH_FILES (1000) files ("100 1000").
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-3}
conditions=${FS_BENCH_CONDITIONS:-quiet busy}
files=${FS_BENCH_FILES:-1000}
hold_sizes=${FS_BENCH_HOLD:-100 1000}
dirs=$(printf '%s\n' $hold_sizes | sort -n | tail -1)
out="$repo/target/fsbench"
mkdir -p "$out"
(cd "$repo" && cargo build -q --release --bin vsnap && cargo build -q --release -p vsnap-frontend --bin vsnap-fsbench --bin vsnap-fsfloor)
vsnap="$repo/target/release/vsnap" fsbench="$repo/target/release/vsnap-fsbench" fsfloor="$repo/target/release/vsnap-fsfloor"

# The peers: virtiofsd 1.14.0 built from crates.io, QEMU 7.2's C virtiofsd from Debian 12.
rust_vfsd="$repo/target/virtiofsd/bin/virtiofsd"
if ! "$rust_vfsd" --version 2>/dev/null | grep -q '^virtiofsd 1.14.0'; then
  echo "fs bench: installing virtiofsd 1.14.0 (cargo install)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libseccomp-dev libcap-ng-dev >/dev/null
  cargo install -q virtiofsd --version 1.14.0 --locked --root "$repo/target/virtiofsd"
fi
c_vfsd=/usr/lib/qemu/virtiofsd
if [ ! -x "$c_vfsd" ]; then
  echo "fs bench: installing QEMU's C virtiofsd (qemu-system-common)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-system-common >/dev/null
fi

# On the repository's file system (ext4 here), as a share on the host's disk would be; the page
# cache holds it all, so the figures are the daemons' and not the disk's.
share="$out/share"
if [ "$(cat "$share/.complete" 2>/dev/null)" != "$dirs x $files" ]; then
  rm -rf "$share"; mkdir -p "$share"
  python3 - "$share" "$dirs" "$files" <<'PY'
import os, sys
root, dirs, files = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for d in range(dirs):
    p = os.path.join(root, "many", f"d{d}")
    os.makedirs(p)
    for i in range(files):
        open(os.path.join(p, f"f{i}"), "wb").close()
os.makedirs(os.path.join(root, "deep", *[f"c{i}" for i in range(1, 64)]))
with open(os.path.join(root, "data.bin"), "wb") as f:
    f.write(os.urandom(64 << 20))
with open(os.path.join(root, ".complete"), "w") as f:
    f.write(f"{dirs} x {files}")
PY
fi

sock="$out/fs.sock" results="$out/results.jsonl"
: > "$results"
busy_pid=
cleanup() { [ -z "$busy_pid" ] || kill "$busy_pid" 2>/dev/null || true; }
trap cleanup EXIT

# Waits (up to 2 minutes) until the machine was at least 95% idle for a second: other jobs
# would otherwise make a "quiet" figure a busy one. Each result also records how many cores'
# worth the rest of the machine used while it was measured (background_cpus).
wait_quiet() {
  local t0=$SECONDS a b c d e f g h i1 i2 t1 t2
  while [ $((SECONDS - t0)) -lt 120 ]; do
    read -r _ a b c d e f g h _ < /proc/stat; t1=$((a+b+c+d+e+f+g+h)) i1=$((d+e))
    sleep 1
    read -r _ a b c d e f g h _ < /proc/stat; t2=$((a+b+c+d+e+f+g+h)) i2=$((d+e))
    [ $((100 * (i2 - i1) / (t2 - t1))) -ge 95 ] && return 0
  done
  echo "fs bench: the machine did not get quiet; measuring anyway" >&2
}

# Before a hold: the kernel's reclaimable dentries and inodes dropped, then the tree walked from
# the host, so each daemon starts from the same caches and the slab growth it causes is its own
# (a struct file per fd, a dentry per workdir link), not the share's or a previous daemon's.
prime_caches() {
  [ "$(id -u)" = 0 ] || return 0
  sync; echo 2 > /proc/sys/vm/drop_caches
  python3 -c "import os,sys; [os.lstat(os.path.join(d, n)) for d, _, fs in os.walk(sys.argv[1]) for n in fs]" "$share/many"
}

start_condition() { # CONDITION: wait for a quiet machine, then make it busy if asked
  wait_quiet
  # This VM's kernel pages out memory idle for seconds (DAMON's pageout scheme), the share's
  # page cache too: read the data file back so that no daemon's first case pays the disk.
  cat "$share/data.bin" > /dev/null
  if [ "$1" = busy ]; then
    # A CPU-bound process the scheduler places as it likes, as an unrelated build would run.
    sh -c 'while :; do :; done' & busy_pid=$!
  fi
}

end_condition() {
  if [ -n "$busy_pid" ]; then kill "$busy_pid"; wait "$busy_pid" 2>/dev/null || true; busy_pid=; fi
}

run() { # CONDITION PHASE LABEL CMD...: one phase against a fresh daemon
  local cond=$1 phase=$2 label=$3 tag=${run_tag:-}; shift 3
  rm -f "$sock"
  start_condition "$cond"
  [ "$phase" != hold ] || prime_caches
  "$@" > "$out/$label-$cond-$phase$tag.log" 2>&1 &
  local pid=$!
  for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
  echo "fs bench: $label $cond $phase$tag" >&2
  "$fsbench" --socket "$sock" --pid "$pid" --label "$label" --phase "$phase" --seconds "$secs" \
    --dirs "${run_dirs:-$dirs}" --files "$files" --request-queues "$(request_queues "$label")" | python3 -c "
import json, sys
for l in sys.stdin:
    r = json.loads(l); r['condition'] = '$cond'; r['phase'] = '$phase$tag'; print(json.dumps(r))
" >> "$results"
  kill -TERM "$pid" 2>/dev/null || true; wait "$pid" || true
  end_condition
}

# vsnap-2q offers two request queues and the frontend drives each from a thread of its own, as a
# guest whose driver maps its vCPUs to them does (Linux 6.11+); the peers offer one.
request_queues() { case $1 in vsnap-2q) echo 2 ;; *) echo 1 ;; esac; }

daemon() { # LABEL: the command line serving $share on $sock, every daemon with --cache auto
  case $1 in
    vsnap) echo "$vsnap fs --socket-path $sock --shared-dir $share --sandbox none" ;;
    vsnap-2q) echo "$vsnap fs --socket-path $sock --shared-dir $share --sandbox none --num-request-queues 2" ;;
    # The same with looking at the empty ring turned off: what the look buys, and costs.
    vsnap-nolook) echo "$vsnap fs --socket-path $sock --shared-dir $share --sandbox none --poll-max-us 0" ;;
    vsnap-fd) echo "$vsnap fs --socket-path $sock --shared-dir $share --sandbox none --inode-store fd" ;;
    virtiofsd) echo "$rust_vfsd --socket-path $sock --shared-dir $share --sandbox none --cache auto --inode-file-handles=never" ;;
    virtiofsd-handles) echo "$rust_vfsd --socket-path $sock --shared-dir $share --sandbox none --cache auto --inode-file-handles=prefer" ;;
    # QEMU 7.2's C virtiofsd has no --sandbox none: chroot is its lightest.
    c-virtiofsd) echo "$c_vfsd --socket-path=$sock -o source=$share -o cache=auto -o sandbox=chroot" ;;
  esac
}

# As high as the machine allows (raising the hard limit needs CAP_SYS_RESOURCE).
nr_open=$(cat /proc/sys/fs/nr_open)
if ulimit -Hn "$nr_open" 2>/dev/null; then ulimit -Sn "$nr_open"; else ulimit -Sn "$(ulimit -Hn)"; fi
echo "fs bench: open-file limit $(ulimit -Sn) (fs.nr_open $nr_open)" >&2
for n in $hold_sizes; do
  for label in vsnap vsnap-fd virtiofsd virtiofsd-handles c-virtiofsd; do
    # shellcheck disable=SC2046 # the command line is meant to split
    run_dirs=$n run_tag="-$((n * files / 1000))k" run quiet hold "$label" $(daemon "$label")
  done
done
for cond in $conditions; do
  # The least a LOOKUP round trip can cost any daemon here, under the same condition.
  start_condition "$cond"
  echo "fs bench: null daemon $cond" >&2
  "$fsfloor" --dir "$share/deep" --name c1 --data "$share/data.bin" --condition "$cond" >> "$results"
  end_condition
  for phase in io ops; do
    labels="vsnap vsnap-nolook virtiofsd c-virtiofsd"
    [ "$phase" != io ] || labels="$labels vsnap-2q"
    for label in $labels; do
      # shellcheck disable=SC2046
      run "$cond" "$phase" "$label" $(daemon "$label")
    done
  done
done
"$rust_vfsd" --version | head -1 >&2
python3 "$repo/bench/fs-table.py" < "$results"
