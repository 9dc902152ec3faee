#!/usr/bin/env bash
# `make install` into a scratch DESTDIR: the binaries land in PREFIX/bin, the vhost-user JSON
# descriptors (QEMU's docs/interop/vhost-user.json) name the installed vsnap-virtiofsd and
# vsnap-blk, those binaries answer --print-capabilities with the spec's JSON (the block one with
# the features its descriptor lists), and the systemd units start PREFIX/bin/vsnap.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
prefix=/opt/vsnap-test
make -s -C "$repo" install PROFILE=debug DESTDIR="$dest" PREFIX="$prefix" >/dev/null
fail() { echo "FAIL: $*" >&2; exit 1; }
for b in vsnap vsnap-virtiofsd vsnap-blk; do
  [ -x "$dest$prefix/bin/$b" ] || fail "$b not installed in PREFIX/bin"
done
json="$dest/usr/share/qemu/vhost-user/50-vsnap-fs.json"
[ -f "$json" ] || fail "no vhost-user descriptor"
python3 - "$json" "$prefix" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["type"] == "fs", d
assert d["binary"] == sys.argv[2] + "/bin/vsnap-virtiofsd", d
assert d["description"], d
PY
"$dest$prefix/bin/vsnap-virtiofsd" --print-capabilities | python3 -c '
import json, sys
c = json.load(sys.stdin)
assert c["type"] == "fs" and isinstance(c["features"], list), c'
blk_json="$dest/usr/share/qemu/vhost-user/50-vsnap-blk.json"
[ -f "$blk_json" ] || fail "no vhost-user-blk descriptor"
"$dest$prefix/bin/vsnap-blk" --print-capabilities --socket-path=/nonexistent/x \
  | python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d["type"] == "block", d
assert d["binary"] == sys.argv[2] + "/bin/vsnap-blk", d
assert d["description"], d
c = json.load(sys.stdin)
assert c["type"] == "block", c
assert sorted(c["features"]) == sorted(d["features"]) == ["blk-file", "read-only"], (c, d)
' "$blk_json" "$prefix"
units="$dest$prefix/lib/systemd/system"
for u in vsnap-blk@.service vsnap-blk@.socket vsnap-fs@.service vsnap-fs@.socket; do
  [ -f "$units/$u" ] || fail "$u not installed in PREFIX/lib/systemd/system"
done
for u in vsnap-blk@.service vsnap-fs@.service; do
  grep -q "^ExecStart=$prefix/bin/vsnap " "$units/$u" || fail "$u does not start PREFIX/bin/vsnap"
done
echo "install test: 1 passed, 0 failed"
