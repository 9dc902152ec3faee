#!/usr/bin/env bash
# Instructions vsnap fs executes per FUSE request, counted by callgrind over vsnap-fsbench's ops
# phase (one request at a time: GETATTR, path lookups, create/unlink, reads and writes). Unlike
# CPU time this does not move with the machine's load or its idle states, so two builds compare
# exactly; it counts user-space instructions only (no kernel time, no cache misses).
# Usage: bench/fs-instructions.sh [vsnap binary] (default: a release build of this checkout).
# Prints the total, the requests served and instructions per request, then the functions that
# cost most; the profile stays in target/fs-instructions/callgrind.out.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/target/fs-instructions"
mkdir -p "$out"
command -v valgrind >/dev/null ||
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >/dev/null
(cd "$repo" && cargo build -q --release -p vsnap-frontend --bin vsnap-fsbench)
if [ $# -ge 1 ]; then
  vsnap=$1
else
  (cd "$repo" && cargo build -q --release --bin vsnap)
  vsnap="$repo/target/release/vsnap"
fi

# The tree the ops phase walks: a little of many/, the deep path, the data file.
share="$out/share"
if [ ! -e "$share/.complete" ]; then
  rm -rf "$share"
  python3 - "$share" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(2):
    p = os.path.join(root, "many", f"d{d}")
    os.makedirs(p)
    for i in range(100):
        open(os.path.join(p, f"f{i}"), "wb").close()
os.makedirs(os.path.join(root, "deep", *[f"c{i}" for i in range(1, 64)]))
with open(os.path.join(root, "data.bin"), "wb") as f:
    f.write(os.urandom(64 << 20))
open(os.path.join(root, ".complete"), "w").close()
PY
fi

sock="$out/fs.sock" profile="$out/callgrind.out"
rm -f "$sock" "$profile"
# No seccomp (valgrind makes syscalls of its own) and no look at the empty ring (its spinning
# would count as instructions of whatever the frontend took to answer).
valgrind --tool=callgrind --callgrind-out-file="$profile" "$vsnap" fs --socket-path "$sock" \
  --shared-dir "$share" --sandbox none --seccomp none --poll-max-us 0 2> "$out/valgrind.log" &
pid=$!
for _ in $(seq 300); do [ -S "$sock" ] && break; sleep 0.1; done
"$repo/target/release/vsnap-fsbench" --socket "$sock" --pid "$pid" --phase ops --iters 3000 \
  --dirs 2 --files 100 > "$out/ops.json"
kill -TERM "$pid"
wait "$pid" || true

# The requests: the calls of the device's `process`, one per chain.
callgrind_annotate --tree=calling "$profile" > "$out/tree.txt" 2>/dev/null
total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$out/tree.txt")
requests=$(grep -m1 -E '> .*Device>::process \([0-9,]+x\)' "$out/tree.txt" |
  sed -E 's/.*\(([0-9,]+)x\).*/\1/' | tr -d ,)
echo "fs instructions: $total in all, $requests requests, $((total / requests)) per request"
callgrind_annotate "$profile" 2>/dev/null | sed -n '/^Ir/,$p' | sed -n 3,22p
