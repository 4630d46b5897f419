#!/usr/bin/env bash
# Build one scenario's initramfs: build/guest/NAME.cpio.gz
#   scenarios/NAME/steps.sh   commands the guest's init runs (required)
#   scenarios/NAME/Kbuild     present: build the kernel modules in the folder
#   scenarios/NAME/user/*.c   static programs, installed as /bin/<name>
#   scenarios/NAME/append     (read by the capture, not here)
# Usage: build-scenario.sh NAME KERNEL_VERSION BUILD_DIR [SOURCE_DIR]
#   SOURCE_DIR: a scenario folder elsewhere (default scenarios/NAME), as
#   `shadowtrace capture --scenario DIR` and `--module` use it
set -euo pipefail
name=${1:?scenario}; kver=${2:?kernel version}; build=${3:?build dir}
top=$(cd "$(dirname "$0")/.." && pwd)
src=${4:-$top/scenarios/$name}
[ -f "$src/steps.sh" ] || { echo "build-scenario: no scenario '$name' (missing $src/steps.sh)" >&2; exit 1; }
# One build of NAME at a time on this machine (two checkouts, or two test
# workers, may build it at once; the module is built at a fixed path below):
# the lock is held until the script exits.
mkdir -p /var/tmp/shadowtrace-kbuild
exec 9>"/var/tmp/shadowtrace-kbuild/.$name.lock"
flock 9
work=$build/scenarios/$name
root=$work/root
rm -rf "$work" && mkdir -p "$work/src" "$root"/{bin,proc,sys,dev,scenario}
cp -rL "$src"/. "$work/src/"  # -L: a scenario may link files of another
cp "$top/scenarios/common/stmark.h" "$top/scenarios/common/stmark_module.h" "$work/src/"

if [ -f "$work/src/Kbuild" ]; then
    # Build at a fixed path: paths end up in the module's debug info and
    # build-id, and a guest that loads a different .ko runs differently, so
    # deterministic captures would differ between checkouts.
    kb=/var/tmp/shadowtrace-kbuild/$name
    rm -rf "$kb" && mkdir -p "$kb" && cp -r "$work/src"/. "$kb/"
    make -s -C "/lib/modules/$kver/build" M="$kb" modules >"$work/kbuild.log" 2>&1 ||
        { echo "build-scenario: module build of '$name' failed (see $work/kbuild.log)" >&2; exit 1; }
    cp "$kb"/*.ko "$work/src/"
    cp "$kb"/*.ko "$root/scenario/"
    rm -rf "$kb"
fi
cflags=(-static -O2 -Wall -I"$top/scenarios/common")
for c in "$top"/scenarios/common/user/*.c "$src"/user/*.c; do
    [ -f "$c" ] || continue
    prog=$(basename "$c" .c)
    gcc "${cflags[@]}" -o "$root/bin/$prog" "$c"
done
cp /bin/busybox "$root/bin/busybox"
cp "$top/guest/init" "$root/init"
cp "$src/steps.sh" "$root/scenario/steps.sh"
echo "$name" > "$root/scenario/name"
# Same bytes from every checkout: fixed timestamps, sorted names, gzip -n.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible | gzip -9n) > "$build/guest/$name.cpio.gz.tmp"
mv "$build/guest/$name.cpio.gz.tmp" "$build/guest/$name.cpio.gz"
