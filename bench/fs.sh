#!/usr/bin/env bash
# vsnap fs vs virtiofsd in the same run, through the project's FUSE frontend (vsnap-fsbench):
# fds and RSS holding 100,000 looked-up files, first-lookup, getattr and path-lookup cost by
# depth, create/unlink, 4k and 128k reads and writes. Prints a Markdown table; the JSON lines
# land in target/fsbench/results.jsonl. The shared tree lives in /dev/shm/vsnap-fsbench (about
# 170 MiB of RAM; removed by hand).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
out="$repo/target/fsbench"
mkdir -p "$out"
(cd "$repo" && cargo build -q --release --bin vsnap && cargo build -q --release -p vsnap-frontend --bin vsnap-fsbench)
vsnap="$repo/target/release/vsnap" fsbench="$repo/target/release/vsnap-fsbench"
virtiofsd=$(command -v virtiofsd || echo "$repo/target/virtiofsd/bin/virtiofsd")
if [ ! -x "$virtiofsd" ]; then
  echo "fs bench: installing virtiofsd (cargo install; needs libseccomp-dev libcap-ng-dev)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libseccomp-dev libcap-ng-dev >/dev/null
  cargo install -q virtiofsd --root "$repo/target/virtiofsd"
  virtiofsd="$repo/target/virtiofsd/bin/virtiofsd"
fi
# On tmpfs, so the figures are the daemons' and not the host disk's.
share=/dev/shm/vsnap-fsbench
if [ ! -f "$share/.complete" ]; then
  rm -rf "$share"; mkdir -p "$share"
  python3 - "$share" <<'PY'
import os, sys
root = sys.argv[1]
for d in range(100):
    p = os.path.join(root, "many", f"d{d}")
    os.makedirs(p)
    for i in range(1000):
        open(os.path.join(p, f"f{i}"), "wb").close()
os.makedirs(os.path.join(root, "deep", *[f"c{i}" for i in range(1, 64)]))
with open(os.path.join(root, "data.bin"), "wb") as f:
    f.write(os.urandom(64 << 20))
open(os.path.join(root, ".complete"), "w").close()
PY
fi
results="$out/results.jsonl"
: > "$results"
run() { # LABEL CMD...: each phase against a fresh daemon
  local label=$1; shift
  local sock="$out/fs.sock" phase pid
  for phase in hold ops; do
    rm -f "$sock"
    "$@" > "$out/$label-$phase.log" 2>&1 &
    pid=$!
    for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
    echo "fs bench: $label $phase" >&2
    "$fsbench" --socket "$sock" --pid "$pid" --label "$label" --phase "$phase" >> "$results"
    kill -TERM "$pid"; wait "$pid" || true
  done
}
run vsnap-workdir "$vsnap" fs --socket-path "$out/fs.sock" --shared-dir "$share" --sandbox none
run vsnap-fd "$vsnap" fs --socket-path "$out/fs.sock" --shared-dir "$share" --sandbox none --inode-store fd
run virtiofsd-fd "$virtiofsd" --socket-path "$out/fs.sock" --shared-dir "$share" --sandbox none --inode-file-handles=never
run virtiofsd-handles "$virtiofsd" --socket-path "$out/fs.sock" --shared-dir "$share" --sandbox none --inode-file-handles=prefer
"$virtiofsd" --version | head -1 >&2
python3 "$repo/bench/fs-table.py" < "$results"
