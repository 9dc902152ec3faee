#!/usr/bin/env bash
# make demo: build vsnap, fetch QEMU and a Debian kernel, build an initramfs, then serve a blank
# disk to a guest that builds an ext4 file system and keeps writing while the host cuts twice;
# export both generations and show what the diffs cost.
source "$(cd "$(dirname "$0")/.." && pwd)/tests/guest/lib.sh"
echo "== preparing: packages, build, kernel, initramfs (first run takes a few minutes)"
prepare
start_work
ctl() { "$vsnap" ctl --api-socket "$work/api.sock" "$@"; }

echo "== vsnap blk: a blank 512 MiB disk"
RUST_LOG=warn "$vsnap" blk --socket-path "$work/blk.sock" --size 512M --state-dir "$work/state" \
  --api-socket "$work/api.sock" --num-queues 2 > "$work/daemon.log" 2>&1 &
daemon=$!
wait_for "$work/blk.sock"
wait_for "$work/api.sock"
ctl_start
n=0
on_guest() { # the guest asks for a cut while it keeps writing
  case "$1" in CUT1|CUT2) ;; *) return 0 ;; esac
  n=$((n + 1))
  ctl --json cut > "$work/cut$n.json"
  python3 -c "import json;r=json.load(open('$work/cut$n.json'));print(f\"   cut $n while the guest writes: froze generation {r['generation']}, guest paused {r['pause_us']} µs ({r['drained']} requests drained)\")" >&2
  sleep 2
  echo NEXT
}
echo "== booting the guest (QEMU TCG)"
guest "$repo/demo/guest.sh" "$work/guest.log" 600 \
  -chardev "socket,id=c0,path=$work/blk.sock" -device vhost-user-blk-pci,chardev=c0,num-queues=2 \
  "${ctl_qemu[@]}" &
qemu=$!
ctl_loop on_guest
wait "$qemu" || { tail -20 "$work/guest.log"; fail "guest failed"; }
qemu=
echo "== exporting generations 1 and 2"
for g in 1 2; do ctl export $g --path "$work/gen$g.diff" --wait >/dev/null; done
for g in 1 2; do "$vsnap" diff inspect --json "$work/gen$g.diff" > "$work/gen$g.json"; done
python3 - "$work" <<'PY'
import json, os, sys
w = sys.argv[1]
def mib(n): return f"{n / 2**20:8.1f} MiB"
print()
print("generation  dirty    zero  untouched   diff file     naive diff*   saved   cut pause")
for g in (1, 2):
    d = json.load(open(f"{w}/gen{g}.json"))
    cut = json.load(open(f"{w}/cut{g}.json"))
    size = os.path.getsize(f"{w}/gen{g}.diff")
    naive = (d["dirty_blocks"] + d["zero_blocks"]) * d["block_size"]
    saved = 1 - size / naive if naive else 0
    print(f"{g:>10} {d['dirty_blocks']:>6} {d['zero_blocks']:>7} {d['untouched_blocks']:>10} {mib(size)} {mib(naive)}  {saved:6.1%}  {cut['pause_us']:>6} µs")
print()
print("* naive: every written block stored as data, as a plain dirty bitmap would (zero writes, discards and trims included).")
PY
echo
stop_daemon
echo "Run with KEEP=1 to keep the diffs; apply them with: vsnap diff apply --out disk.img gen1.diff gen2.diff"
