#!/usr/bin/env bash
# Boots the test kernel under QEMU TCG with a guest script and extra QEMU arguments, and returns
# the script's exit status (read from a marker on the serial console; no marker = failure).
# Usage: run-guest.sh KERNEL_DIR INITRAMFS SCRIPT LOG TIMEOUT_S [qemu args...]
set -euo pipefail
kdir=$1 initrd=$2 script=$3 log=$4 timeout=$5
shift 5
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# Append the script as a second cpio archive; it must start on a 4-byte boundary or the kernel
# silently ignores it (gzip output is padded here to be safe).
mkdir -p "$work/root"
cp "$script" "$work/root/test.sh"
chmod +x "$work/root/test.sh"
cp "$initrd" "$work/initrd"
pad=$(( (4 - $(stat -c %s "$work/initrd") % 4) % 4 ))
head -c "$pad" /dev/zero >> "$work/initrd"
(cd "$work/root" && echo test.sh | cpio -o -H newc --quiet) >> "$work/initrd"
mem=${GUEST_MEM:-1G}
timeout --foreground "$timeout" qemu-system-x86_64 \
  -accel tcg -cpu max -m "$mem" -smp "${GUEST_CPUS:-2}" -nographic -no-reboot -nodefaults \
  -object memory-backend-memfd,id=mem,size="$mem",share=on -numa node,memdev=mem \
  -kernel "$kdir/vmlinux" -initrd "$work/initrd" \
  -append "console=ttyS0 panic=-1 quiet loglevel=3" \
  -serial stdio "$@" > "$log" 2>&1 || true
rc=$(grep -a -o 'VSNAP-GUEST-RESULT: [0-9]*' "$log" | tail -1 | awk '{print $2}')
if [ -z "$rc" ]; then
  echo "run-guest: no result marker (guest crashed or timed out); log tail:" >&2
  tail -n 30 "$log" >&2
  exit 98
fi
exit "$rc"
