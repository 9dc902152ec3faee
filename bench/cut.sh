#!/usr/bin/env bash
# Cut pause and drain under a 4k QD32 random-write load (2 queues), and export throughput.
# Everything on tmpfs. Usage: bench/cut.sh [cuts]
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cuts=${1:-30}
(cd "$repo" && cargo build -q --release --bin vsnap && cargo build -q --release -p vsnap-frontend --bin vsnap-loadgen)
vsnap="$repo/target/release/vsnap"
work=$(mktemp -d -p /dev/shm)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
"$vsnap" blk --socket-path "$work/sock" --size 1G --state-dir "$work/state" --num-queues 2 \
  --api-socket "$work/api.sock" 2>"$work/log" &
pid=$!
for _ in $(seq 100); do [ -S "$work/api.sock" ] && break; sleep 0.1; done
secs=$(( cuts / 2 + 4 ))
"$repo/target/release/vsnap-loadgen" --socket "$work/sock" --rw randwrite --qd 32 --queues 2 \
  --seconds "$secs" --pid "$pid" > "$work/load.json" &
load=$!
sleep 2
for durable in false true; do
  for i in $(seq $((cuts / 2))); do
    if [ "$durable" = true ]; then d=--durable; else d=; fi
    "$vsnap" ctl --api-socket "$work/api.sock" --json cut $d | tr -d '\n' >> "$work/cuts.json"
    echo >> "$work/cuts.json"
    sleep 0.4
  done
done
wait "$load"
# Export the largest frozen generation, timed.
gen=$("$vsnap" ctl --api-socket "$work/api.sock" --json generations | python3 -c '
import json,sys; g=[l for l in json.load(sys.stdin) if not l["active"]]; print(max(g, key=lambda l: l["dirty_blocks"])["generation"])')
t0=$(date +%s.%N)
"$vsnap" ctl --api-socket "$work/api.sock" export "$gen" --path "$work/g.diff" --wait >/dev/null
t1=$(date +%s.%N)
bytes=$("$vsnap" diff inspect --json "$work/g.diff" | python3 -c 'import json,sys; print(json.load(sys.stdin)["data_bytes"])')
python3 - "$work/cuts.json" "$work/load.json" "$bytes" "$t0" "$t1" <<'PY'
import json, sys
cuts = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
load = json.load(open(sys.argv[2]))
data, t0, t1 = int(sys.argv[3]), float(sys.argv[4]), float(sys.argv[5])
def pct(v, p): v = sorted(v); return v[min(len(v) - 1, int(len(v) * p))]
print(f"load: randwrite 4k QD32 x 2 queues, {load['iops']:.0f} IOPS, p99 {load['lat_p99_us']:.0f} µs, {load['errors']} errors")
print("| cut | n | drained (median / max) | drain µs p50 / p99 / max | pause µs p50 / p99 / max |")
print("|---|---:|---:|---:|---:|")
for durable in (False, True):
    c = [x for x in cuts if x["durable"] == durable]
    dr = [x["drained"] for x in c]; d = [x["drain_us"] for x in c]; p = [x["pause_us"] for x in c]
    print(f"| {'durable (fsync)' if durable else 'plain'} | {len(c)} | {pct(dr,.5)} / {max(dr)} | {pct(d,.5)} / {pct(d,.99)} / {max(d)} | {pct(p,.5)} / {pct(p,.99)} / {max(p)} |")
dt = t1 - t0
print(f"\nexport: {data / 2**20:.0f} MiB of dirty data in {dt:.2f} s = {data / dt / 1e9:.2f} GB/s (including the CLI's 100 ms polling)")
PY
