#!/usr/bin/env bash
# `make install` into a scratch DESTDIR: the binaries land in PREFIX/bin, the vhost-user JSON
# descriptor (QEMU's docs/interop/vhost-user.json) names the installed vsnap-virtiofsd, and that
# binary answers --print-capabilities with the spec's JSON.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
prefix=/opt/vsnap-test
make -s -C "$repo" install PROFILE=debug DESTDIR="$dest" PREFIX="$prefix" >/dev/null
fail() { echo "FAIL: $*" >&2; exit 1; }
for b in vsnap vsnap-virtiofsd; do
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
echo "install test: 1 passed, 0 failed"
