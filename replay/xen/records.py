"""The xentrace records shadowtrace reads, defined once.

Written from Xen 4.17.5's public header ``xen/include/public/trace.h`` (event
numbers, ``struct t_rec``), the shadow code's trace helpers
(``xen/arch/x86/mm/shadow/multi.c``: ``trace_shadow_gen``,
``trace_shadow_fixup``, ``trace_not_shadow_fault``,
``trace_shadow_emulate_other``, ``trace_shadow_emulate``; ``common.c``:
``trace_resync``, ``trace_shadow_prealloc_unpin``, ``trace_shadow_wrmap_bf``),
the path flags of ``shadow/private.h`` (``TRCE_SFLAG_*``) and the HVM records
of ``xen/arch/x86/hvm/svm/svm.c`` and ``hvm.c`` (``HVMTRACE_*``).

A record on disk is one 32-bit header word (event number in bits 0-27, the
count of trailing 32-bit data words in bits 28-30, bit 31 set when a 64-bit
TSC follows), then the TSC if any, then the data words. xentrace writes each
per-CPU buffer window after a ``TRC_TRACE_CPU_CHANGE`` record (data: the CPU,
the window's size in bytes).

The shadow records of a 4-level guest carry ``(GUEST_PAGING_LEVELS - 2) << 8``
= ``0x200`` in their event number; the ones of ``common.c`` do not. Xen's own
``xentrace_format`` file has no entries for the 4-level forms.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

# -- classes and the generic records (trace.h) ------------------------------
TRC_GEN = 0x0001F000
TRC_HVM = 0x0008F000
TRC_SHADOW = 0x0040F000
TRC_64_FLAG = 0x100
#: What ``shadowtrace xen`` asks xentrace for: the shadow class and the HVM
#: class (VM exits with their rIP, CPUID, CR writes, page-fault injections).
TRACE_MASK = TRC_SHADOW | TRC_HVM

TRC_LOST_RECORDS = TRC_GEN + 1
TRC_TRACE_WRAP_BUFFER = TRC_GEN + 2
TRC_TRACE_CPU_CHANGE = TRC_GEN + 3

# -- the HVM records (trace.h TRC_HVM_*) -------------------------------------
_ENTRYEXIT = 0x00081000
_HANDLER = 0x00082000
TRC_HVM_VMENTRY = _ENTRYEXIT + 0x01
TRC_HVM_SVM_EXIT64 = _ENTRYEXIT + TRC_64_FLAG + 0x03
TRC_HVM_VMX_EXIT64 = _ENTRYEXIT + TRC_64_FLAG + 0x02
TRC_HVM_PF_XEN64 = _HANDLER + TRC_64_FLAG + 0x01
TRC_HVM_PF_INJECT64 = _HANDLER + TRC_64_FLAG + 0x02
TRC_HVM_INJ_EXC = _HANDLER + 0x03
TRC_HVM_CR_WRITE64 = _HANDLER + TRC_64_FLAG + 0x09
TRC_HVM_CPUID = _HANDLER + 0x0E
TRC_HVM_INVLPG64 = _HANDLER + TRC_64_FLAG + 0x14
TRC_HVM_VMMCALL = _HANDLER + 0x12
TRC_HVM_CR_READ64 = _HANDLER + TRC_64_FLAG + 0x08

#: Mask that drops the nested-guest flag (``TRC_HVM_NESTEDFLAG``).
HVM_NESTED_FLAG = 0x400

# -- the shadow records (trace.h TRC_SHADOW_*) -------------------------------
SHADOW_KINDS: dict[int, str] = {
    1: "not_shadow",          # sh_page_fault: a real guest fault, passed to the guest
    2: "fast_propagate",      # fast path: guest-not-present magic entry, passed to the guest
    3: "fast_mmio",           # fast path: MMIO magic entry
    4: "false_fast_path",     # a magic entry that was stale: slow path after all
    5: "mmio",                # slow path ended in MMIO emulation
    6: "fixup",               # the fault was fixed by building / fixing shadow entries
    7: "domf_dying",          # the domain is dying
    8: "emulate",             # a write to a page table, emulated
    9: "emulate_unshadow_user",       # user-mode write to a page table: unshadowed
    10: "emulate_unshadow_evtinj",    # event pending during emulation: unshadowed
    11: "emulate_unshadow_unhandled",  # emulator could not do it: unshadowed
    12: "wrmap_bf",           # sh_remove_write_access fell back to a brute-force search
    13: "prealloc_unpin",     # _shadow_prealloc unpinned a top-level shadow
    14: "resync_full",        # an out-of-sync page brought back in sync (write-protected)
    15: "resync_only",        # an out-of-sync page's entries synced, page stays OOS
}

#: ``(GUEST_PAGING_LEVELS - 2) << 8`` by guest paging levels: a guest boots
#: through 2- and 3-level paging (PVH starts in 32-bit mode) before 4-level.
LEVEL_BITS: dict[int, int] = {2: 0 << 8, 3: 1 << 8, 4: 2 << 8}


def shadow_layout(number: int, levels: int) -> tuple[str, tuple[str, ...]]:
    """The data layout of shadow record ``number`` for a guest with ``levels``
    paging levels: (struct format, field names), ``<`` = little endian with no
    padding, as Xen's ``__packed`` structs. In multi.c, ``guest_va_t`` is 64
    bits only for 4 levels, ``guest_l1e_t`` and the gfn 32 bits only for 2."""
    va = "Q" if levels == 4 else "I"
    l1e = "I" if levels == 2 else "Q"
    if number in (1, 6):  # trace_not_shadow_fault, trace_shadow_fixup
        return "<" + l1e + va + "I", ("gl1e", "va", "flags")
    if number == 8:  # trace_shadow_emulate
        return "<" + l1e + l1e + va + "I", ("gl1e", "write_val", "va", "flags")
    if number in (9, 10, 11):  # trace_shadow_emulate_other
        return "<" + l1e + va, ("gfn", "va")
    if number in SHADOW_NO_LEVELS:  # common.c: a gfn_t (unsigned long)
        return "<Q", ("gfn",)
    return "<" + va, ("va",)  # trace_shadow_gen


#: Shadow records that ``common.c`` writes without the guest-levels bits.
SHADOW_NO_LEVELS = frozenset({12, 13, 14, 15})

#: TRCE_SFLAG_* of shadow/private.h: bit number -> name (lower case).
PATH_FLAGS: tuple[str, ...] = (
    "set_ad", "set_a", "l1_get_ref", "l1_put_ref", "l2_propagate", "set_changed",
    "set_flush", "set_error", "demote", "promote", "wrmap", "wrmap_guess_found",
    "wrmap_brute_force", "early_unshadow", "emulation_2nd_pt_written",
    "emulation_last_failed", "emulate_full_pt", "prealloc_unhook", "unsync",
    "oos_fixup_add", "oos_fixup_evict",
)
#: The EMULATE record's last word is ``flags:29, emulation_count:3``.
EMULATE_FLAGS_MASK = (1 << 29) - 1

#: SVM exit codes (AMD APM vol. 2, appendix C) seen from a Linux guest. QEMU
#: TCG offers AMD SVM, and Xen records SVM and VMX exits under the same
#: event numbers, so the codes are read as SVM's.
SVM_EXITS: dict[int, str] = {
    0x00: "cr0_read", 0x03: "cr3_read", 0x04: "cr4_read",
    0x10: "cr0_write", 0x13: "cr3_write", 0x14: "cr4_write",
    0x4E: "page_fault", 0x60: "intr", 0x61: "nmi", 0x64: "vintr", 0x6E: "rdtsc",
    0x72: "cpuid", 0x76: "pause", 0x78: "hlt", 0x79: "invlpg", 0x7B: "ioio", 0x7C: "msr",
    0x7F: "shutdown", 0x81: "vmmcall", 0x87: "rdtscp", 0x400: "npf",
}

#: The guest's marker: CPUID with this leaf (scenarios/common/stmark.h,
#: replay/format.py MARKER_LEAF).
MARKER_LEAF = 0x53544D4B


@dataclass(frozen=True)
class HvmLayout:
    kind: str
    fmt: str
    fields: tuple[str, ...]


#: The HVM records decoded field by field; other HVM records keep their kind
#: ``hvm_0xNNNNN`` and raw words only.
HVM_LAYOUTS: dict[int, HvmLayout] = {
    TRC_HVM_VMENTRY: HvmLayout("vmentry", "<", ()),
    TRC_HVM_SVM_EXIT64: HvmLayout("vmexit", "<IQ", ("exit_reason", "rip")),
    TRC_HVM_VMX_EXIT64: HvmLayout("vmexit", "<IQ", ("exit_reason", "rip")),
    TRC_HVM_PF_XEN64: HvmLayout("pf_xen", "<IQ", ("error_code", "va")),
    TRC_HVM_PF_INJECT64: HvmLayout("pf_inject", "<IQ", ("error_code", "va")),
    TRC_HVM_INJ_EXC: HvmLayout("inj_exc", "<II", ("vector", "error_code")),
    TRC_HVM_CR_WRITE64: HvmLayout("cr_write", "<IQ", ("cr", "value")),
    TRC_HVM_CPUID: HvmLayout("cpuid", "<IIIIII", ("leaf", "subleaf", "a", "b", "c", "d")),
    TRC_HVM_INVLPG64: HvmLayout("invlpg", "<IQ", ("invlpga", "va")),
    TRC_HVM_VMMCALL: HvmLayout("vmmcall", "<I", ("value",)),  # the hypercall number (eax)
    _HANDLER + 0x08: HvmLayout("cr_read", "<II", ("cr", "value")),
    TRC_HVM_CR_READ64: HvmLayout("cr_read", "<IQ", ("cr", "value")),
    _HANDLER + 0x0C: HvmLayout("msr_read", "<IQ", ("msr", "value")),
    _HANDLER + 0x0D: HvmLayout("msr_write", "<IQ", ("msr", "value")),
    _HANDLER + 0x0F: HvmLayout("intr", "<", ()),
    _HANDLER + 0x13: HvmLayout("hlt", "<", ()),
    _HANDLER + 0x04: HvmLayout("inj_virq", "<", ()),
    _HANDLER + 0x20: HvmLayout("intr_window", "<", ()),
    _HANDLER + 0x16: HvmLayout("ioport_read", "<", ()),
    _HANDLER + 0x216: HvmLayout("ioport_write", "<", ()),
}

#: Every kind a decoded record can have, besides ``hvm_0x...``.
KINDS: tuple[str, ...] = (
    *SHADOW_KINDS.values(), *(h.kind for h in HVM_LAYOUTS.values()),
    "lost_records", "wrap_buffer", "unknown",
)


def shadow_number(event: int) -> tuple[int, int] | None:
    """(TRC_SHADOW record number 1..15, guest paging levels) of a shadow
    event, else None. common.c's records say no levels: 4 is given."""
    if event & 0x0FFFF000 != TRC_SHADOW:
        return None
    number = event & 0xFF
    bits = event & 0xF00
    if number not in SHADOW_KINDS:
        return None
    if number in SHADOW_NO_LEVELS:
        return (number, 4) if bits == 0 else None
    for levels, b in LEVEL_BITS.items():
        if bits == b:
            return number, levels
    return None


def flag_names(flags: int) -> list[str]:
    """Names of the TRCE_SFLAG bits set in ``flags``, in bit order."""
    return [name for bit, name in enumerate(PATH_FLAGS) if flags >> bit & 1]


def unpack(fmt: str, fields: tuple[str, ...], data: bytes) -> dict[str, int] | None:
    """The fields of a record's data words, or None when there are too few."""
    size = struct.calcsize(fmt)
    if len(data) < size:
        return None
    return dict(zip(fields, struct.unpack_from(fmt, data), strict=True))
