#!/usr/bin/env bash
# Structure offsets of the guest kernel that the capture needs, from the
# kernel's own headers (the asm-offsets trick: compile a file of DEFINE()s
# to assembly and read the constants back). No boot needed.
#   mm_pgd   offsetof(struct mm_struct, pgd): the plugin reads a dying mm's
#            root there (what a Xen-aware kernel passes to HVMOP_pagetable_dying)
# Output: lines "NAME DECIMAL". Usage: kernel-offsets.sh KERNEL_VERSION OUT
set -euo pipefail
kver=${1:?kernel version}; out=${2:?output file}
kb=$(mktemp -d /var/tmp/shadowtrace-offsets.XXXXXX)
trap 'rm -rf "$kb"' EXIT
cat > "$kb/offsets.c" <<'C'
#include <linux/mm_types.h>
#include <linux/kbuild.h>
void shadowtrace_offsets(void);
void shadowtrace_offsets(void)
{
	DEFINE(mm_pgd, offsetof(struct mm_struct, pgd));
}
C
echo 'obj-m += offsets.o' > "$kb/Kbuild"
make -s -C "/lib/modules/$kver/build" M="$kb" offsets.s >"$kb/log" 2>&1 ||
    { echo "kernel-offsets: cannot compile against the headers of $kver: $(tail -1 "$kb/log")" >&2; exit 1; }
sed -n 's/^.*\.ascii "->\([a-z_]*\) \$\([0-9]*\) .*$/\1 \2/p' "$kb/offsets.s" > "$out.tmp"
grep -q '^mm_pgd [0-9]' "$out.tmp" ||
    { echo "kernel-offsets: no mm_pgd in the compiler's output" >&2; rm -f "$out.tmp"; exit 1; }
mv "$out.tmp" "$out"
