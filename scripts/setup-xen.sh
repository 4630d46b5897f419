#!/usr/bin/env bash
# The real Xen, for comparing the model with Xen's own shadow code.
# Fetches Debian's Xen 4.17 (hypervisor and toolstack, unpacked with dpkg-deb:
# nothing is installed into the host), checks that the hypervisor was built
# with shadow paging and trace buffers, and builds a dom0 initramfs with the
# toolstack, xentrace and the guest kernel's own Xen and virtio modules.
#   build/xen/xen            the hypervisor, gunzipped (QEMU's multiboot loader
#                            does not read xen.gz)
#   build/xen/dom0.cpio.gz   the dom0 initramfs (init: guest/xen-dom0-init)
# Usage: setup-xen.sh KERNEL_VERSION BUILD_DIR
set -euo pipefail

# -- pinned versions: the one place to change them (see README "Real Xen") --
# Not the default apt candidate: the bookworm-security build (4.17.7+...) has
# "# CONFIG_SHADOW_PAGING is not set", so a guest with hap=0 cannot run.
XEN_VERSION=${XEN_VERSION:-4.17.5+72-g01140da4e8-1}
YAJL_VERSION=${YAJL_VERSION:-2.1.0-3+deb12u2}
XEN_PACKAGES=(xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils
    libxencall1 libxenevtchn1 libxenforeignmemory1 libxengnttab1 libxenmisc4.17
    libxenstore4 libxentoollog1 libxenhypfs1 libxentoolcore1 libxendevicemodel1)
# dom0's kernel modules, in load order (each after the modules it depends on;
# checked below against the modules' own "depends=").
DOM0_MODULES=(xen-privcmd xenfs xen-evtchn xen-gntdev xen-gntalloc
    virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk)
XENBIN=usr/lib/xen-4.17/bin
DOM0_PROGRAMS=(xl xenstored xenconsoled xen-init-dom0 xentrace)

kver=${1:?usage: setup-xen.sh KERNEL_VERSION BUILD_DIR}; build=${2:?build dir}
mkdir -p "$build" && build=$(cd "$build" && pwd)  # ldd's paths must be absolute
top=$(cd "$(dirname "$0")/.." && pwd)
xen=$build/xen
debs=$xen/debs
die() { echo "setup-xen: $*" >&2; exit 1; }
# Unpacked packages and the dom0 tree live in a private folder: two runs at
# once (make test in two shells) then only race on the final renames.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
unpacked=$tmp/unpacked

need_host_tools() {
    local missing=()
    for pair in cpio:cpio gzip:gzip dpkg-deb:dpkg apt-get:apt ldd:libc-bin; do
        command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
    done
    # A static busybox: dom0 has no libc of its own besides the one we copy.
    [ -x /bin/busybox ] && ! ldd /bin/busybox >/dev/null 2>&1 || missing+=(busybox-static)
    [ ${#missing[@]} -eq 0 ] && return
    [ "$(id -u)" = 0 ] || die "missing host packages (${missing[*]}); run 'make xen' as root"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null || die "cannot install ${missing[*]}"
}

# download PKG VERSION: build/xen/debs/PKG_VERSION_*.deb (cached)
download() {
    local pkg=$1 ver=$2
    ls "$debs/${pkg}_${ver}_"*.deb >/dev/null 2>&1 && return
    # apt-get update only when the first try fails (stale lists).
    (cd "$debs" && apt-get download "$pkg=$ver" >/dev/null 2>&1) && return
    apt-get update -qq >/dev/null 2>&1 || true
    (cd "$debs" && apt-get download "$pkg=$ver" >/dev/null 2>&1) ||
        die "cannot download $pkg=$ver (pinned version gone from the registry? see README 'Real Xen')"
}

fetch_and_unpack() {
    mkdir -p "$debs"
    for p in "${XEN_PACKAGES[@]}"; do download "$p" "$XEN_VERSION"; done
    download libyajl2 "$YAJL_VERSION"
    mkdir -p "$unpacked"
    for p in "${XEN_PACKAGES[@]}"; do dpkg-deb -x "$debs/${p}_${XEN_VERSION}_"*.deb "$unpacked"; done
    dpkg-deb -x "$debs/libyajl2_${YAJL_VERSION}_"*.deb "$unpacked"
}

# The hypervisor: the package's, or one build-xen-hypervisor.sh built from
# the same version's source (build/xen/local) when no package has shadow
# paging. Shadow paging is what we compare with; trace buffers are how we
# see it: both must be on.
install_hypervisor() {
    local config named image
    if [ -f "$xen/local/xen" ]; then
        [ "$(cat "$xen/local/version" 2>/dev/null)" = "$XEN_VERSION" ] ||
            die "$xen/local holds a hypervisor of another version than $XEN_VERSION: rebuild it (scripts/build-xen-hypervisor.sh) or remove it"
        config=$xen/local/xen.config
        named="$config (from build-xen-hypervisor.sh)"
        image=$xen/local/xen
    else
        config=$unpacked/boot/xen-4.17-amd64.config
        named="boot/xen-4.17-amd64.config of $(basename "$debs"/xen-hypervisor-4.17-amd64_"$XEN_VERSION"_*.deb)"
        image=""
    fi
    [ -f "$config" ] || die "no $named"
    for opt in CONFIG_SHADOW_PAGING CONFIG_TRACEBUFFER; do
        grep -qx "$opt=y" "$config" ||
            die "$named: $opt is not set (this Xen cannot run a shadow-paged, traced guest; see README 'Real Xen')"
    done
    # QEMU's multiboot loader wants the plain image, not xen.gz.
    if [ -n "$image" ]; then
        install -m 644 "$image" "$xen/xen.$$"
    else
        gzip -dc "$unpacked/boot/xen-4.17-amd64.gz" > "$xen/xen.$$"
    fi
    mv "$xen/xen.$$" "$xen/xen"
}

# copy_with_libs ROOT FILE...: each program at its own path, every library it
# needs (toolstack libraries from the unpacked tree, the rest from the host)
# under /lib/x86_64-linux-gnu, the loader at /lib64.
copy_with_libs() {
    local root=$1; shift
    local libdir=$unpacked/usr/lib/x86_64-linux-gnu lib path needs
    for f in "$@"; do
        install -D -m 755 "$unpacked/$f" "$root/$f"
        needs=$(LD_LIBRARY_PATH=$libdir ldd "$unpacked/$f") || die "ldd $f failed"
        if [[ $needs == *"not found"* ]]; then
            die "$f: a library is missing ($(grep -m1 'not found' <<< "$needs" | xargs))"
        fi
        while read -r lib path; do
            install -D -m 755 "$path" "$root/lib/x86_64-linux-gnu/$lib"
        done < <(awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}' <<< "$needs")
    done
    install -D -m 755 /lib64/ld-linux-x86-64.so.2 "$root/lib64/ld-linux-x86-64.so.2"
    # glibc dlopens libgcc_s for pthread_cancel: without it xl aborts at exit
    # (status 134) although the domain was created.
    path=$(ldconfig -p | awk '/libgcc_s.so.1 .*x86-64/ {print $NF; exit}')
    [ -n "$path" ] || die "libgcc_s.so.1 not found on the host (package libgcc-s1)"
    install -D -m 755 "$path" "$root/lib/x86_64-linux-gnu/libgcc_s.so.1"
}

# The modules come from the guest's own kernel package: dom0 runs that kernel.
copy_modules() {
    local root=$1 deb m f dep
    deb=$(ls "$build"/src/linux-image-"$kver"_*.deb 2>/dev/null | head -n1 || true)
    [ -n "$deb" ] || die "no linux-image-$kver .deb under $build/src; run 'make setup' first"
    # Only the modules we load: the whole package is ~400 MiB unpacked.
    local patterns=()
    for m in "${DOM0_MODULES[@]}"; do patterns+=("*/$m.ko"); done
    mkdir -p "$tmp/kernel"
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp/kernel" --wildcards "${patterns[@]}" ||
        die "cannot unpack the dom0 modules from $(basename "$deb")"
    mkdir -p "$root/lib/modules"
    local loaded=" "
    for m in "${DOM0_MODULES[@]}"; do
        f=$(find "$tmp/kernel/lib/modules/$kver" -name "$m.ko" 2>/dev/null | head -n1)
        [ -n "$f" ] || die "module $m.ko is not in $(basename "$deb")"
        for dep in $(tr '\0' '\n' < "$f" | sed -n 's/^depends=//p' | tr ',' ' '); do
            [[ $loaded == *" $dep "* ]] || die "module $m needs $dep loaded first (fix DOM0_MODULES)"
        done
        loaded+="$m "
        install -m 644 "$f" "$root/lib/modules/$m.ko"
        echo "$m" >> "$root/lib/modules/order"
    done
}

build_initramfs() {
    local root=$tmp/dom0
    mkdir -p "$root"/{bin,proc,sys,dev,etc/xen}
    local progs=()
    for p in "${DOM0_PROGRAMS[@]}"; do progs+=("$XENBIN/$p"); done
    copy_with_libs "$root" "${progs[@]}"
    copy_modules "$root"
    install -m 644 "$unpacked/etc/xen/xl.conf" "$root/etc/xen/xl.conf"
    install -m 755 /bin/busybox "$root/bin/busybox"
    install -m 755 "$top/guest/xen-dom0-init" "$root/init"
    # Same bytes from every run: fixed timestamps, sorted names, gzip -n.
    find "$root" -exec touch -h -d @0 {} +
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --quiet --reproducible | gzip -9n) \
        > "$xen/dom0.cpio.gz.$$"
    mv "$xen/dom0.cpio.gz.$$" "$xen/dom0.cpio.gz"
}

need_host_tools
mkdir -p "$xen"
fetch_and_unpack
install_hypervisor
build_initramfs
echo "$XEN_VERSION" > "$xen/version"
echo "setup-xen: Xen $XEN_VERSION ($(du -h "$xen/dom0.cpio.gz" | cut -f1) dom0 initramfs) in $xen"
