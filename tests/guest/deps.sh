#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian 12 machine (root, apt reachable).
# Idempotent: skips the install when everything is already present.
set -euo pipefail

need=(qemu-system-x86_64 qemu-img qemu-storage-daemon busybox cpio mkfs.ext4 fio blkdiscard xz python3 setfattr)
missing=0
for c in "${need[@]}"; do command -v "$c" >/dev/null 2>&1 || missing=1; done
# qemu-img must come from the same QEMU as qemu-system (Debian's 7.2): the machine image may carry
# a newer qemu-utils from backports that Debian's qemu-system-x86 displaces.
qemu-img --version 2>/dev/null | grep -q "version 7\." || missing=1
[ "$missing" = 0 ] && exit 0

export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq qemu-system-x86 qemu-system-common >/dev/null
apt-get install -y -qq qemu-utils busybox-static cpio e2fsprogs fio util-linux xz-utils python3 attr >/dev/null
qemu-img --version | head -1
