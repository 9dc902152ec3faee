#!/usr/bin/env bash
# Fetches the Debian kernel that linux-image-amd64 points at (no root install) into $OUT and
# extracts an uncompressed vmlinux, which QEMU boots through its PVH entry (about twice as fast
# under TCG as letting the bzImage decompress itself).
# Prints the kernel release. Usage: kernel.sh OUT_DIR
set -euo pipefail
out=$1
mkdir -p "$out"
if [ -f "$out/release" ] && [ -f "$out/vmlinux" ]; then cat "$out/release"; exit 0; fi
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$pkg" ] || { echo "kernel.sh: cannot resolve linux-image-amd64 (run apt-get update)" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download "$pkg" >/dev/null 2>&1)
dpkg -x "$tmp"/*.deb "$out/root"
rel=${pkg#linux-image-}
vmlinuz="$out/root/boot/vmlinuz-$rel"
# The payload is an xz stream inside the bzImage: find its magic and decompress from there.
off=$(LC_ALL=C grep -obUaP '\xfd7zXZ\x00' "$vmlinuz" | head -1 | cut -d: -f1)
tail -c +"$((off + 1))" "$vmlinuz" | xz -dc 2>/dev/null > "$out/vmlinux" || true
if ! head -c 4 "$out/vmlinux" | grep -q ELF; then
  cp "$vmlinuz" "$out/vmlinux"   # fall back to the self-decompressing image
fi
echo "$rel" > "$out/release"
echo "$rel"
