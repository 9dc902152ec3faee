#!/usr/bin/env bash
# vsnap blk vs qemu-storage-daemon, same run, same tmpfs, same load generator (a vhost-user-blk
# frontend, no VM). Prints a markdown table and writes JSON lines to $OUT (default
# target/bench/blk.jsonl). Usage: bench/blk.sh [seconds per point]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
secs=${1:-5}
out=${OUT:-$repo/target/bench/blk.jsonl}
mkdir -p "$(dirname "$out")"
: > "$out"
"$repo/tests/guest/deps.sh"
(cd "$repo" && cargo build -q --release --bin vsnap && cargo build -q --release -p vsnap-frontend --bin vsnap-loadgen)
load="$repo/target/release/vsnap-loadgen"
work=$(mktemp -d -p /dev/shm)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
head -c 1G /dev/urandom > "$work/base.img"

# rw bs qd queues span passes: only the last pass is recorded. The 256 MiB overwrite point
# measures blocks the layer already holds (steady state); the others write into a fresh layer,
# where tmpfs allocates a page for every first write to a block.
points=(
  "randread 4096 1 1 1G 1" "randread 4096 32 1 1G 1" "randread 4096 32 2 1G 1"
  "randwrite 4096 1 1 1G 1" "randwrite 4096 32 1 1G 1" "randwrite 4096 32 2 1G 1"
  "randwrite 4096 32 1 256M 2"
  "write 1048576 4 1 1G 1"
)

run_points() { # label
  for p in "${points[@]}"; do
    set -- $p
    local span; span=$(numfmt --from=iec "$5")
    for pass in $(seq "$6"); do
      "$load" --socket "$work/sock" --rw "$1" --bs "$2" --qd "$3" --queues "$4" --span "$span" \
        --seconds "$secs" --pid "$pid" --label "$label" > "$work/point.json"
    done
    cat "$work/point.json" >> "$out"
  done
}

start_vsnap() {
  rm -rf "$work/state"
  "$repo/target/release/vsnap" blk --socket-path "$work/sock" --base "$work/base.img" \
    --state-dir "$work/state" --num-queues 2 2>"$work/vsnap.log" &
  pid=$!
}

start_qsd() {
  cp --sparse=always "$work/base.img" "$work/qsd.img"
  qemu-storage-daemon \
    --blockdev "driver=file,filename=$work/qsd.img,node-name=disk,discard=unmap,cache.direct=off" \
    --export "type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path=$work/sock,writable=on,num-queues=2" \
    2>"$work/qsd.log" &
  pid=$!
}

start_qsd_overlay() {
  qemu-img create -q -f qcow2 -b "$work/base.img" -F raw "$work/overlay.qcow2"
  qemu-storage-daemon \
    --blockdev "driver=qcow2,node-name=disk,discard=unmap,file.driver=file,file.filename=$work/overlay.qcow2,file.cache.direct=off" \
    --export "type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path=$work/sock,writable=on,num-queues=2" \
    2>"$work/qsd.log" &
  pid=$!
}

# qemu-storage-daemon twice: on a raw copy of the image (fully allocated: writes overwrite), and
# on a qcow2 overlay over the base, which is vsnap's design (base + writable layer) in QEMU terms.
for label in vsnap qsd-raw qsd-qcow2-overlay; do
  rm -f "$work/sock"
  case "$label" in
    vsnap) start_vsnap ;;
    qsd-raw) start_qsd ;;
    *) start_qsd_overlay ;;
  esac
  for _ in $(seq 100); do [ -S "$work/sock" ] && break; sleep 0.1; done
  run_points
  kill "$pid"; wait "$pid" 2>/dev/null || true; pid=
  rm -f "$work/qsd.img" "$work/overlay.qcow2"
done

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["rw"], r["bs"], r["qd"], r["queues"], r["span"]), {})[r["label"]] = r
print("| workload | backend | IOPS | MiB/s | p50 µs | p99 µs | backend CPU µs/IO | IOPS per backend CPU-second |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for (rw, bs, qd, q, span), d in by.items():
    for label in ("vsnap", "qsd-raw", "qsd-qcow2-overlay"):
        r = d.get(label)
        if not r: continue
        cpu = r["backend_cpu_us_per_io"]
        per_cpu = (1e6 / cpu) if cpu else float("nan")
        size = f"{bs//1024}k" if bs < 1<<20 else f"{bs>>20}M"
        note = "" if span >= 1 << 30 else f" (overwrite, {span >> 20}M)"
        print(f"| {rw} {size} QD{qd} {q}q{note} | {label} | {r['iops']:.0f} | {r['mib_s']:.0f} | {r['lat_p50_us']:.0f} | {r['lat_p99_us']:.0f} | {cpu:.1f} | {per_cpu:.0f} |")
PY
