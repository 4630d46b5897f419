#!/usr/bin/env bash
# Take qemu-plugin.h from the Debian source package of the installed QEMU
# (no binary package ships it). Only the orig tarball is needed.
# Usage: fetch-plugin-header.sh SUITE SRC_DIR OUT_DIR
set -euo pipefail
suite=${1:?suite}; src=${2:?src dir}; out=${3:?out dir}
ver=$(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null) ||
    { echo "fetch-plugin-header: qemu-system-x86 is not installed; run 'make setup'" >&2; exit 1; }
upstream=${ver#*:}; upstream=${upstream%%-*}      # 1:10.0.2+ds-2... -> 10.0.2+ds
mkdir -p "$src" "$out"
tarball=$src/qemu_${upstream}.orig.tar.xz
if [ ! -s "$tarball" ]; then
    # apt-get may fail on the .dsc while the orig tarball arrives: judge by the file.
    (cd "$src" && apt-get source --download-only -t "$suite" "qemu=$ver" >/dev/null 2>&1) || true
fi
[ -s "$tarball" ] || { echo "fetch-plugin-header: could not download the QEMU $ver source package" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
tar -xJf "$tarball" -C "$tmp" --wildcards '*/include/qemu/qemu-plugin.h'
install -m 644 "$tmp"/*/include/qemu/qemu-plugin.h "$out/qemu-plugin.h"
