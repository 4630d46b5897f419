#!/usr/bin/env bash
# Unpack the Debian kernel image package (no install into /boot): vmlinuz
# for the test guest (its System.map is a stub: see qmp_tools/symbols.py).
# Usage: fetch-kernel.sh KERNEL_VERSION SRC_DIR GUEST_DIR
set -euo pipefail
kver=${1:?kernel version}; src=${2:?src dir}; guest=${3:?guest dir}
mkdir -p "$src" "$guest"
deb=$(ls "$src"/linux-image-"$kver"_*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    (cd "$src" && apt-get download "linux-image-$kver" >/dev/null) ||
        { echo "fetch-kernel: cannot download linux-image-$kver" >&2; exit 1; }
    deb=$(ls "$src"/linux-image-"$kver"_*.deb | head -n1)
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp"
install -m 644 "$tmp/boot/vmlinuz-$kver" "$guest/vmlinuz"
echo "$kver" > "$guest/kernel-version"
