#!/usr/bin/env bash
# Installs what the tests and benchmarks need on a fresh Debian 12 machine (root, apt reachable).
# Idempotent: skips the install when everything is already present.
set -euo pipefail

need=(qemu-system-x86_64 qemu-img qemu-storage-daemon busybox cpio mkfs.ext4 fio blkdiscard xz python3 setfattr
      flock virsh libvirtd virtlogd)
missing=0
for c in "${need[@]}"; do command -v "$c" >/dev/null 2>&1 || missing=1; done
# qemu-img must come from the same QEMU as qemu-system (Debian's 7.2): the machine image may carry
# a newer qemu-utils from backports that Debian's qemu-system-x86 displaces.
qemu-img --version 2>/dev/null | grep -q "version 7\." || missing=1
if [ "$missing" = 1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq qemu-system-x86 qemu-system-common >/dev/null
  apt-get install -y -qq qemu-utils busybox-static cpio e2fsprogs fio util-linux xz-utils python3 attr >/dev/null
  # libvirt's daemon and QEMU driver without libvirt-daemon-system, which would make systemd the
  # init; tests/guest/libvirt.sh starts and stops the daemons itself.
  apt-get install -y -qq --no-install-recommends libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients >/dev/null
  qemu-img --version | head -1
fi

# What libvirt-daemon-system's postinst would have set up: libvirtd's QEMU driver resolves its
# built-in user before it reads qemu.conf (which the test points at root), and the daemons log
# into /var/log/libvirt.
getent passwd libvirt-qemu >/dev/null ||
  useradd --system --user-group --no-create-home --home-dir /var/lib/libvirt --shell /usr/sbin/nologin libvirt-qemu
mkdir -p /var/log/libvirt/qemu

# The S3-compatible server the object-storage tests start (moto, in a venv under target/).
"$(dirname "$0")/../s3/deps.sh"
