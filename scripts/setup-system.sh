#!/usr/bin/env bash
# Install the Debian packages shadowtrace needs (idempotent; root only).
#   QEMU 10.0.x from bookworm-backports (plugin API v4), glib headers for the
#   plugin build, msgpack-c, busybox-static, cpio, and the guest kernel's
#   headers. Usage: setup-system.sh KERNEL_VERSION
set -euo pipefail
kver=${1:?usage: setup-system.sh KERNEL_VERSION}

need=()
command -v qemu-system-x86_64 >/dev/null 2>&1 &&
    qemu-system-x86_64 --version | grep -q 'version 10\.' || need+=(qemu)
for p in libglib2.0-dev pkg-config libmsgpack-dev libzstd-dev busybox-static cpio gzip \
         "linux-headers-$kver" make gcc dpkg-dev xz-utils; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
[ ${#need[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages (${need[*]}); run 'make setup' as root" >&2
    exit 1
fi

src=/etc/apt/sources.list.d/shadowtrace-backports.sources
if [ ! -f "$src" ]; then
    # Same mirror as the machine's own Debian source, suite bookworm-backports.
    mirror=$(grep -hoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)
    mirror=${mirror:-http://deb.debian.org/debian}
    cat > "$src" <<SRC
Types: deb deb-src
URIs: $mirror
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends \
    libglib2.0-dev pkg-config libmsgpack-dev libzstd-dev busybox-static cpio gzip \
    "linux-headers-$kver" make gcc dpkg-dev xz-utils >/dev/null
apt-get install -y -qq --no-install-recommends -t bookworm-backports \
    qemu-system-x86 qemu-utils >/dev/null
qemu-system-x86_64 --version | head -n1
