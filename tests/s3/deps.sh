#!/usr/bin/env bash
# An S3-compatible server for the object-storage tests: moto (PyPI) in server mode, in a venv
# under target/ so nothing is installed system-wide. Idempotent; quick when already there.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
venv="$repo/target/moto-venv"
[ -x "$venv/bin/moto_server" ] && exit 0
if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3-venv >/dev/null
fi
python3 -m venv "$venv"
"$venv/bin/pip" install -q 'moto[server]==5.*'
