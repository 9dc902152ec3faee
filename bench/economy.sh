#!/usr/bin/env bash
# Diff economy: what real guest workloads cost in vsnap diffs, and what the ext4 knobs change.
# For every row: a guest boots on `vsnap blk` over a fresh copy of the base, runs a workload,
# the host cuts and exports generation 1, then records the diff's data bytes and block counts,
# the least data any diff must carry (changed non-zero blocks, `vsnap image compare`), and what
# two naive schemes would carry: every written block as data (a plain dirty bitmap, zeros and
# trims included) and zero tracking of whole blocks only (partial zero-writes as data). The
# export is vsnap's default (zstd:3 frames, parent dedupe): its stored bytes are recorded beside
# the raw data, and those of a second export without dedupe (compression alone).
#
# Usage: bench/economy.sh [--check] [ROW...]   (no ROW: every row; rows are WORKLOAD/KNOB)
#   --check: assert minimum <= vsnap <= each naive scheme, and stored <= raw, for the rows (used
#   by `make guest`).
# Output: a TSV in target/economy/results.tsv and a Markdown table on stdout.
source "$(dirname "$0")/../tests/guest/lib.sh"
check=
[ "${1:-}" = --check ] && { check=1; shift; }
workloads=(fill-delete zero-file untar rand-overwrite read-tree mixed)
knobs=(default eager-init discard fstrim noatime lazytime no-sync)
rows=("$@")
if [ ${#rows[@]} = 0 ]; then
  for w in "${workloads[@]}"; do for k in "${knobs[@]}"; do rows+=("$w/$k"); done; done
  rows+=(mkfs/default mkfs/eager-init)
fi
prepare
out="$repo/target/economy"
mkdir -p "$out"
start_work
ctl() { "$vsnap" ctl --api-socket "$work/api.sock" "$@"; }
size=1G
uuid=6e2b2549-0000-4000-8000-000000000001

# base INIT: the shared base image (ext4 with big, tree/, tree.tar), made once per init mode.
# nodiscard keeps mke2fs from declaring the inode tables zeroed, so lazy init stays lazy.
base() {
  local img="$out/base-$1.img"
  if [ ! -f "$img" ]; then
    [ -d "$out/content" ] || python3 "$repo/bench/economy-tree.py" "$out/content"
    local lazy=1; [ "$1" = eager ] && lazy=0
    E2FSPROGS_FAKE_TIME=1700000000 mkfs.ext4 -q -F -b 4096 -U "$uuid" -E "nodiscard,lazy_itable_init=$lazy,lazy_journal_init=$lazy,hash_seed=$uuid,root_owner=0:0" \
      -d "$out/content" "$img.tmp" "$size" >&2 && mv "$img.tmp" "$img"
  fi
  echo "$img"
}

json() { python3 -c 'import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))' "$1"; }

printf 'row\tdiff_data\tdirty\tzero\tsub_block_zero\tmin_data\tplain_dirty\taligned_zero\tstored\tstored_zstd_only\tseconds\n' > "$work/results.tsv"
for row in "${rows[@]}"; do
  wl=${row%/*} knob=${row#*/}
  init=lazy opts=relatime trim=none sync=sync
  case $knob in
    default) ;;
    eager-init) init=eager ;;
    discard) opts=relatime,discard ;;
    fstrim) trim=fstrim ;;
    noatime) opts=noatime ;;
    lazytime) opts=relatime,lazytime ;;
    no-sync) sync=none ;;
    *) fail "unknown knob $knob" ;;
  esac
  start=$(date +%s)
  rm -rf "$work/state" "$work"/*.sock "$work"/ctl.* "$work"/g1.* "$work"/g1-*
  if [ "$wl" = mkfs ]; then
    rowbase="$work/blank.img"
    rm -f "$rowbase"; "$vsnap" image create "$rowbase" --size "$size" 2>/dev/null
    mkfs_opts="-E lazy_itable_init=1,lazy_journal_init=1"
    [ "$init" = eager ] && mkfs_opts="-E lazy_itable_init=0,lazy_journal_init=0"
  else
    rowbase=$(base "$init")
    mkfs_opts=
  fi
  "$vsnap" blk --socket-path "$work/blk.sock" --base "$rowbase" --state-dir "$work/state" \
    --api-socket "$work/api.sock" > "$work/daemon.log" 2>&1 &
  daemon=$!
  wait_for "$work/blk.sock"
  wait_for "$work/api.sock"
  ctl_start
  on_guest() { [ "$1" = READY ] && { ctl cut >/dev/null; echo CUT; }; return 0; }
  GUEST_ENV=("WORKLOAD=$wl" "MOUNT_OPTS=$opts" "TRIM=$trim" "SYNC=$sync" "MKFS_OPTS='$mkfs_opts'")
  guest "$repo/bench/economy-guest.sh" "$work/guest.log" 900 \
    -chardev "socket,id=c0,path=$work/blk.sock" -device vhost-user-blk-pci,chardev=c0 "${ctl_qemu[@]}" &
  qemu=$!
  ctl_loop on_guest
  wait "$qemu" || { cat "$work/guest.log"; fail "$row: guest script failed"; }
  qemu=
  ctl export 1 --path "$work/g1.diff" --wait >/dev/null
  ctl export 1 --path "$work/g1-nodedupe.diff" --no-dedupe --wait >/dev/null
  sub=$(ctl --json generations | json '[l for l in d if l["generation"] == 1][0]["sub_block_zero_blocks"]')
  stop_daemon
  "$vsnap" diff inspect --json "$work/g1.diff" > "$work/g1.json"
  zstd_only=$("$vsnap" diff inspect --json "$work/g1-nodedupe.diff" | json 'd["stored_bytes"]')
  read -r data dirty zero bs stored < <(json '"%d %d %d %d %d" % (d["data_bytes"], d["dirty_blocks"], d["zero_blocks"], d["block_size"], d["stored_bytes"])' < "$work/g1.json")
  "$vsnap" diff apply --base "$rowbase" --out "$work/g1.img" "$work/g1.diff" 2>/dev/null
  min=$("$vsnap" image compare --base "$rowbase" "$work/g1.img" --block-size "$bs" --json 2>/dev/null | json 'd["min_data_bytes"]')
  plain=$(( (dirty + zero) * bs )) aligned=$(( (dirty + sub) * bs ))
  secs=$(( $(date +%s) - start ))
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$row" "$data" "$dirty" "$zero" "$sub" "$min" "$plain" "$aligned" "$stored" "$zstd_only" "$secs" | tee -a "$work/results.tsv" >&2
  if [ -n "$check" ]; then
    [ "$min" -le "$data" ] || fail "$row: diff data $data is below the minimum $min: a changed block is missing"
    [ "$data" -le "$aligned" ] && [ "$aligned" -le "$plain" ] || fail "$row: naive schemes ($aligned, $plain) below vsnap ($data)"
    [ "$stored" -le "$zstd_only" ] && [ "$zstd_only" -le "$data" ] || fail "$row: stored $stored (dedupe), $zstd_only (zstd alone) for $data bytes of data"
  fi
  # Both exports are diffs of the same generation: each applies to the same disk.
  if [ -n "$check" ]; then
    "$vsnap" diff apply --base "$rowbase" --out "$work/g1-nd.img" "$work/g1-nodedupe.diff" 2>/dev/null
    cmp -s "$work/g1.img" "$work/g1-nd.img" || fail "$row: the deduplicated diff applies to another disk"
  fi
  rm -f "$work/g1.img" "$work/g1-nd.img"
done
[ -n "$check" ] || cp "$work/results.tsv" "$out/results.tsv"
python3 "$repo/bench/economy-table.py" < "$work/results.tsv"
