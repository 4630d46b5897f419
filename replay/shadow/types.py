"""What the shadow model is made of: types, entry bits, records, counters.

Shadow types and keys, the shadow-entry bits (x86 bits plus the model's own
markers, standing for Xen's magic entries), Xen's ``fetch_type_t``, the
:class:`Fact` and :class:`Hazard` records the engine reports, one
:class:`Shadow` page and the per-vCPU state :class:`VCpu`, and the names of
every counter (:data:`COUNTERS`, Xen's perf counters where one exists) and
fault outcome (:data:`FAULT_OUTCOMES`, the exits of Xen's sh_page_fault).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, NamedTuple

from ..guest.memory import ADDR_MASK, PTE_A, PTE_D, PTE_NX, PTE_P, PTE_RW, PTE_US
from .config import SHADOW_OOS_PAGES, VTLB_ENTRIES


class ShadowType(IntEnum):
    """Shadow types; the value is the level of the guest table shadowed
    (FL1 is 0: it shadows a superpage, not a table)."""

    FL1 = 0
    L1 = 1
    L2 = 2
    L3 = 3
    L4 = 4


FL1, L1, L2, L3, L4 = (ShadowType.FL1, ShadowType.L1, ShadowType.L2, ShadowType.L3,
                       ShadowType.L4)
#: ShadowType(level - 1) by level, without constructing enums per access.
_BELOW: Final = (FL1, FL1, L1, L2, L3)
#: A shadow's key: (guest frame number, type).
Key = tuple[int, ShadowType]

# Shadow-entry bits (x86 bits, plus our own markers in ignored bits).
SH_P: Final = PTE_P
SH_RW: Final = PTE_RW
SH_US: Final = PTE_US
SH_A: Final = PTE_A
SH_D: Final = PTE_D
SH_NX: Final = PTE_NX
#: L2 shadow entry whose child is an FL1 shadow (an "available" bit).
SH_FL1: Final = 1 << 9
#: Magic "guest not present" L1 entry (Xen's sh_l1e_gnp; only without OOS).
SH_GNP: Final = 1 << 62
#: Magic MMIO L1 entry (Xen's sh_l1e_mmio); the gfn is in the address bits.
SH_MMIO: Final = 1 << 61
SH_MAGIC: Final = SH_GNP | SH_MMIO
SH_ADDR: Final = ADDR_MASK


class Fetch(IntEnum):
    """Xen's fetch_type_t: why an entry is being propagated."""

    PREFETCH = 0
    DEMAND_READ = 1
    DEMAND_WRITE = 2


class Fact(NamedTuple):
    """One structured "what happened" record.

    kind: ``created`` / ``destroyed`` (a shadow: frame, type), ``propagated``
    (entry number ``entry`` of shadow (frame, type) became ``value`` from guest entry
    ``guest``), ``pinned`` / ``unpinned``, ``unsynced`` / ``resynced`` (an OOS
    L1 frame), ``guest-fault`` (walk failed), ``reset`` (window opened),
    ``cr3-targets`` (the CR3-target list came into force, reason ``on``, with
    ``guest`` roots, or was cleared, ``off``).
    reason: ``cr3``, ``demand``, ``prefetch``, ``validate``, ``resync``,
    ``refcount``, ``user-write``, ``early-unshadow``, ``pool``, ``invlpg``,
    ``window``, ``l3-toplevel`` ...
    """

    event: int
    kind: str
    vcpu: int
    frame: int
    type: int
    entry: int
    value: int
    guest: int
    reason: str


class Hazard(NamedTuple):
    """Something an exit-less (CR3-target-list) switch leaves wrong (C6)."""

    event: int
    vcpu: int
    kind: str
    root: int
    detail: str


@dataclass(eq=False, slots=True)
class Shadow:
    """One shadow page: 512 entries, a reference count, maybe pinned."""

    frame: int
    type: ShadowType
    created: int
    entries: list[int] = field(default_factory=lambda: [0] * 512)
    refcount: int = 0
    pinned: bool = False
    #: (frame, type), made once (read for every entry set).
    key: Key = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.key = (self.frame, self.type)

    def present(self) -> Iterator[tuple[int, int]]:
        """(index, entry) of present entries."""
        return ((i, e) for i, e in enumerate(self.entries) if e & SH_P)


@dataclass
class VCpu:
    """Per-vCPU state of the model."""

    #: The CR3 the guest really holds (from the trace).
    cr3: int | None = None
    #: The CR3 Xen last saw (differs from ``cr3`` after exit-less switches).
    xen_cr3: int | None = None
    #: shadow_table[0]: the L4 shadow this vCPU holds a reference on.
    slot: Key | None = None
    #: The shadow the hardware runs on when it is not ``slot`` (exit-less).
    hw_root: Key | None = None
    #: OOS slots: guest L1 frame per slot, and its snapshot (512 entries).
    oos: list[int | None] = field(default_factory=lambda: [None] * SHADOW_OOS_PAGES)
    oos_snap: list[list[int] | None] = field(
        default_factory=lambda: [None] * SHADOW_OOS_PAGES
    )
    #: vTLB: (page number, gfn, pfec) per direct-mapped entry.
    vtlb: list[tuple[int, int, int] | None] = field(
        default_factory=lambda: [None] * VTLB_ENTRIES
    )
    #: SHOPT_FAST_EMULATION state.
    last_write_emul_ok: bool = False
    #: The frame whose store this vCPU's last fault emulated on the slow
    #: path (fast emulation is armed after the write); None after others.
    emul_arm: int | None = None
    last_emulated_frame: int = 0
    last_emulated_mfn: int = 0
    #: SHOPT_EARLY_UNSHADOW state.
    last_emulated_mfn_for_unshadow: int | None = None
    #: v->arch.paging.shadow.pagetable_dying: this vCPU told Xen a page table
    #: is dying (set by sh_pagetable_dying, the boot probe included).
    pagetable_dying: bool = False
    #: The last store (va, size, user), for the TABLE_WRITEs that follow it.
    last_store: tuple[int, int, bool] | None = None

    def vtlb_live(self) -> int:
        return sum(1 for e in self.vtlb if e is not None)

    def oos_frames(self) -> list[int]:
        return [f for f in self.oos if f is not None]


#: Names of every counter, with Xen's perf-counter names where one exists.
COUNTERS: Final = (
    "events", "accesses", "access_no_cr3", "walk_unknown",
    "shadow_fault", "shadow_fault_fixed", "shadow_fault_bail_real_fault",
    "shadow_fault_emulate_write", "shadow_fault_emulate_failed",
    "shadow_fault_fast_emulate", "shadow_fault_fast_emulate_fail",
    "shadow_fault_fast_gnp", "shadow_fault_fast_mmio", "shadow_fault_mmio",
    "shadow_fault_no_root", "shadow_fault_superpage_1g",
    "shadow_emulate", "shadow_validate_skip", "shadow_oos_stale_write",
    "shadow_validate_gl1e_calls", "shadow_validate_gl2e_calls",
    "shadow_validate_gl3e_calls", "shadow_validate_gl4e_calls",
    "shadow_prefetch", "shadow_unsync", "shadow_unsync_evict", "shadow_resync",
    "shadow_resync_only", "shadow_oos_fixup_add", "shadow_oos_fixup_evict",
    "shadow_early_unshadow",
    "pagetable_dying", "shadow_unshadow_dying", "untracked", "shadow_unshadow_untracked",
    "shadow_unshadow_unaligned", "shadow_unshadow_set_error",
    "shadow_writeable", "shadow_invlpg",
    "shadow_prealloc_1", "shadow_prealloc_2", "shadow_prealloc_fail",
    "shadow_evicted", "shadow_unpin_l3_toplevel",
    "shadow_created", "shadow_created_l4", "shadow_created_l3", "shadow_created_l2",
    "shadow_created_l1", "shadow_created_fl1",
    "shadow_destroyed", "shadow_destroyed_l4", "shadow_destroyed_l3",
    "shadow_destroyed_l2", "shadow_destroyed_l1", "shadow_destroyed_fl1",
    "cr3_write_intercepted", "cr3_write_not_intercepted", "cr4_paging_update",
    "invpcid", "snapshots", "table_writes", "markers", "windows",
)

_TYPE_NAME: Final = {FL1: "fl1", L1: "l1", L2: "l2", L3: "l3", L4: "l4"}

FactSink = Callable[[Fact], None]
#: How a shadow fault ended (ShadowEngine._fault_path), Xen's exit paths of
#: sh_page_fault: ``fixed`` (trace_shadow_fixup), ``emulate`` (an emulated
#: page-table write, slow path) and ``fast_emulate`` (SHOPT_FAST_EMULATION),
#: both traced by trace_shadow_emulate; ``guest_fault`` (trace_not_shadow_fault),
#: ``fast_gnp`` (TRC_SHADOW_FAST_PROPAGATE), ``fast_mmio`` / ``mmio``,
#: ``user_write_unshadow`` (TRC_SHADOW_EMULATE_UNSHADOW_USER); and the model's
#: own ends ``walk_unknown``, ``superpage_1g``, ``prealloc_failed``, ``no_root``,
#: ``no_l1``.
FAULT_OUTCOMES: Final = (
    "fixed", "emulate", "fast_emulate", "guest_fault", "fast_gnp", "fast_mmio", "mmio",
    "user_write_unshadow", "walk_unknown", "superpage_1g", "prealloc_failed", "no_root",
    "no_l1",
)
#: ``on_fault(event, vcpu, va, write, outcome, write_access_removed)``.
FaultHook = Callable[[int, int, int, bool, str, bool], None]
