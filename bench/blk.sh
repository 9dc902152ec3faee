#!/usr/bin/env bash
# vsnap blk vs qemu-storage-daemon, same run, same tmpfs, same load generator (a vhost-user-blk
# frontend, no VM). Prints a markdown table, the 4k QD32 efficiency ratios and the machine's load,
# and writes JSON lines to $OUT (default target/bench/blk.jsonl). Usage: bench/blk.sh [seconds per point]
#
# All three backends run at once, each on its own socket, and every point runs on each of them in
# turn: on a machine that other jobs load unevenly, the backends of one point see the same load.
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
labels=(vsnap vsnap-nolook qsd-raw qsd-qcow2-overlay)
declare -A pid=()
cleanup() {
  local p
  for p in "${pid[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
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

# vsnap on the base with a fresh layer; vsnap-nolook the same with --poll-max-us 0 (its queue
# workers never look at an empty ring before sleeping: what the look costs and buys).
start_vsnap() { # label [args]
  local label=$1; shift
  "$repo/target/release/vsnap" blk --socket-path "$work/$label.sock" --base "$work/base.img" \
    --state-dir "$work/state-$label" --num-queues 2 "$@" 2>"$work/$label.log" &
  pid[$label]=$!
}
# qemu-storage-daemon twice: on a raw copy of the image (fully allocated: writes overwrite), and
# on a qcow2 overlay over the base, which is vsnap's design (base + writable layer) in QEMU terms.
start_qsd() { # label blockdev
  qemu-storage-daemon --blockdev "$2" \
    --export "type=vhost-user-blk,id=e,node-name=disk,addr.type=unix,addr.path=$work/$1.sock,writable=on,num-queues=2" \
    2>"$work/$1.log" &
  pid[$1]=$!
}
cp --sparse=always "$work/base.img" "$work/qsd.img"
qemu-img create -q -f qcow2 -b "$work/base.img" -F raw "$work/overlay.qcow2"
start_vsnap vsnap
start_vsnap vsnap-nolook --poll-max-us 0
start_qsd qsd-raw "driver=file,filename=$work/qsd.img,node-name=disk,discard=unmap,cache.direct=off"
start_qsd qsd-qcow2-overlay "driver=qcow2,node-name=disk,discard=unmap,file.driver=file,file.filename=$work/overlay.qcow2,file.cache.direct=off"
for label in "${labels[@]}"; do
  for _ in $(seq 100); do [ -S "$work/$label.sock" ] && break; sleep 0.1; done
  [ -S "$work/$label.sock" ] || { cat "$work/$label.log" >&2; echo "$label did not listen" >&2; exit 1; }
done

echo "load before: $(uptime)"
for p in "${points[@]}"; do
  set -- $p
  span=$(numfmt --from=iec "$5")
  for label in "${labels[@]}"; do
    for _ in $(seq "$6"); do
      read -r load1 _ < /proc/loadavg
      "$load" --socket "$work/$label.sock" --rw "$1" --bs "$2" --qd "$3" --queues "$4" \
        --span "$span" --seconds "$secs" --pid "${pid[$label]}" --label "$label" > "$work/point.json"
    done
    # The 1-minute load average when the recorded pass began, for the record.
    python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); r["loadavg_1m"] = float(sys.argv[2]); print(json.dumps(r))' \
      "$work/point.json" "$load1" >> "$out"
  done
done
echo "load after:  $(uptime)"

python3 - "$out" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
by = {}
for r in rows:
    by.setdefault((r["rw"], r["bs"], r["qd"], r["queues"], r["span"]), {})[r["label"]] = r
peers = ("qsd-raw", "qsd-qcow2-overlay")
print()
print("| workload | backend | IOPS | MiB/s | p50 µs | p99 µs | backend CPU µs/IO | IOPS per backend CPU-second |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for (rw, bs, qd, q, span), d in by.items():
    for label in ("vsnap", "vsnap-nolook") + peers:
        r = d.get(label)
        if not r: continue
        cpu = r["backend_cpu_us_per_io"]
        per_cpu = (1e6 / cpu) if cpu else float("nan")
        size = f"{bs//1024}k" if bs < 1<<20 else f"{bs>>20}M"
        note = "" if span >= 1 << 30 else f" (overwrite, {span >> 20}M)"
        print(f"| {rw} {size} QD{qd} {q}q{note} | {label} | {r['iops']:.0f} | {r['mib_s']:.0f} | {r['lat_p50_us']:.0f} | {r['lat_p99_us']:.0f} | {cpu:.1f} | {per_cpu:.0f} |")
print()
for mine in ("vsnap", "vsnap-nolook"):
    print(f"4k QD32, 1 queue: {mine}'s IOPS per backend CPU-second over each peer's (backend CPU µs per I/O, peer / {mine})")
    for rw, span, note in (("randread", 1 << 30, ""), ("randwrite", 1 << 30, " (fresh layer)"), ("randwrite", 256 << 20, " (overwrite)")):
        d = by.get((rw, 4096, 32, 1, span), {})
        v = d.get(mine)
        if not v: continue
        ratios = [f"{d[p]['backend_cpu_us_per_io'] / v['backend_cpu_us_per_io']:.1f}x {p}" for p in peers if p in d]
        print(f"  {rw}{note}: " + ", ".join(ratios))
loads = [r["loadavg_1m"] for r in rows]
print(f"1-minute load average at the recorded passes: {min(loads):.2f} to {max(loads):.2f} (2 cores)")
PY
