#!/usr/bin/env bash
# Fallback for `make xen` when no Debian build of Xen 4.17 in the registry has
# shadow paging: build the hypervisor alone from Debian's xen source package
# (the toolstack's own version, XEN_VERSION of setup-xen.sh) with Debian's
# config plus CONFIG_SHADOW_PAGING=y and CONFIG_TRACEBUFFER=y.
#   build/xen/local/xen          the hypervisor image (multiboot ELF)
#   build/xen/local/xen.config   its config
# setup-xen.sh uses these instead of the package's hypervisor when present
# (`rm -r build/xen/local` to go back). Root only (installs build tools and
# a deb-src entry). Usage: build-xen-hypervisor.sh BUILD_DIR [VERSION]
set -euo pipefail
build=${1:?usage: build-xen-hypervisor.sh BUILD_DIR [VERSION]}
top=$(cd "$(dirname "$0")/.." && pwd)
# The pin lives in setup-xen.sh alone.
pinned=$(sed -n 's/^XEN_VERSION=\${XEN_VERSION:-\(.*\)}$/\1/p' "$top/scripts/setup-xen.sh")
ver=${2:-${XEN_VERSION:-$pinned}}
mkdir -p "$build" && build=$(cd "$build" && pwd)
xen=$build/xen
src=$xen/src
die() { echo "build-xen-hypervisor: $*" >&2; exit 1; }
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

[ "$(id -u)" = 0 ] || die "run as root (installs build tools and a deb-src entry)"

need_tools() {
    local need=()
    for p in dpkg-dev gcc make python3 bison flex xz-utils; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep 'install ok installed' >/dev/null || need+=("$p")
    done
    [ ${#need[@]} -eq 0 ] && return
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        >/dev/null || die "cannot install ${need[*]}"
}

# apt-get source needs deb-src lines; the machine's own mirrors, bookworm's
# suites (the security suite has the newest 4.17 point releases).
# (grep without -q: with pipefail, -q's early exit fails apt-cache on SIGPIPE)
src_listed() { apt-cache showsrc xen 2>/dev/null | grep -x "Version: $ver" >/dev/null; }

need_deb_src() {
    src_listed && return
    local list=/etc/apt/sources.list.d/shadowtrace-xen-src.sources mirror security
    mirror=$(grep -hoE 'https?://[^ ]+/debian/?$' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)
    security=$(grep -hoE 'https?://[^ ]+/debian-security/?$' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null | head -n1 || true)
    cat > "$list" <<SRC
Types: deb-src
URIs: ${mirror:-http://deb.debian.org/debian}
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb-src
URIs: ${security:-http://deb.debian.org/debian-security}
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    apt-get update -qq >/dev/null 2>&1 || true
    src_listed || die "no xen source package $ver in the registry (apt-cache showsrc xen lists what there is)"
}

fetch_source() {
    mkdir -p "$src"
    ls "$src"/xen_"${ver#*:}".dsc >/dev/null 2>&1 ||
        (cd "$src" && apt-get source --download-only "xen=$ver" >/dev/null 2>&1) ||
        die "cannot download the xen $ver source package"
    dpkg-source -x "$src/xen_${ver#*:}.dsc" "$tmp/xen" >/dev/null ||
        die "cannot unpack the xen $ver source package"
}

# Debian's own config for this version (from its hypervisor package), with
# the two options we need switched on.
configure() {
    local deb config=$tmp/xen/xen/.config
    mkdir -p "$xen/debs"
    deb=$(ls "$xen"/debs/xen-hypervisor-4.17-amd64_"$ver"_*.deb 2>/dev/null | head -n1 || true)
    if [ -z "$deb" ]; then
        (cd "$xen/debs" && apt-get download "xen-hypervisor-4.17-amd64=$ver" >/dev/null 2>&1) ||
            die "cannot download xen-hypervisor-4.17-amd64=$ver (for its config)"
        deb=$(ls "$xen"/debs/xen-hypervisor-4.17-amd64_"$ver"_*.deb | head -n1)
    fi
    dpkg-deb --fsys-tarfile "$deb" | tar -xO --wildcards '*/boot/xen-4.17-amd64.config' > "$config"
    [ -s "$config" ] || die "no boot/xen-4.17-amd64.config in $(basename "$deb")"
    for opt in CONFIG_SHADOW_PAGING CONFIG_TRACEBUFFER; do
        sed -i "/^# $opt is not set\$/d; /^$opt=/d" "$config"
        echo "$opt=y" >> "$config"
    done
    make -s -C "$tmp/xen/xen" olddefconfig >/dev/null
    for opt in CONFIG_SHADOW_PAGING CONFIG_TRACEBUFFER; do
        grep -qx "$opt=y" "$config" || die "$opt=y did not survive olddefconfig (a dependency is off)"
    done
}

build_hypervisor() {
    make -s -C "$tmp/xen/xen" -j"$(nproc)" > "$tmp/build.log" 2>&1 ||
        die "hypervisor build failed: $(grep -m1 -i error "$tmp/build.log" || tail -n1 "$tmp/build.log")"
    mkdir -p "$xen/local"
    install -m 644 "$tmp/xen/xen/xen" "$xen/local/xen"
    install -m 644 "$tmp/xen/xen/.config" "$xen/local/xen.config"
    echo "$ver" > "$xen/local/version"
}

need_tools
need_deb_src
fetch_source
configure
build_hypervisor
echo "build-xen-hypervisor: Xen $ver hypervisor with shadow paging in $xen/local; now run 'make xen'"
