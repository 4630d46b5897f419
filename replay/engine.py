"""A model of Xen's x86 shadow paging, driven by trace events.

:class:`ShadowEngine` is a pure state machine: events go in
(:meth:`ShadowEngine.process`, or one method per kind), and state comes
out -- the shadows, per-vCPU state, Xen-style perf counters, a log of
structured :class:`Fact` records (what was created, propagated, destroyed,
and why) and a list of :class:`Hazard` records for exit-less CR3 switches.
Nothing here prints or reads files.

The behaviour follows ``shared/SHADOW-SEMANTICS.md`` (a summary of
``xen/arch/x86/mm/shadow/``) for a 64-bit HVM guest on 4-level shadows:

* Shadows are keyed by (guest frame, type); FL1 ("fake L1") shadows of a
  guest 2 MiB superpage are keyed by its base frame.
* A shadow entry is an int: the target frame (child shadow's guest frame for
  L4..L2 entries, the mapped guest frame for L1/FL1) in bits 12..51, x86
  flags below and NX in bit 63; :data:`SH_FL1` marks an L2 entry whose child
  is an FL1 shadow. Magic not-present entries (:data:`SH_GNP`,
  :data:`SH_MMIO`) stand for Xen's reserved-bit "magic" L1 entries.
* The guest tables come from :class:`~replay.guest.GuestMemory`, which the
  engine owns (SNAPSHOT, TABLE_WRITE and WINDOW_OPEN update it).

Simplifications (documented, deliberate): guest frame == machine frame (no
p2m other than "RAM below ram_mib, MMIO above or where an access said
so"); ``sh_remove_shadows`` is always the thorough version; emulated stores
are taken from the TABLE_WRITE events that follow the store (so an emulated
write is validated entry by entry); the writable-mapping heuristic is exact
(a reverse map), so ``SHOPT_WRITABLE_HEURISTIC`` changes no result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, NamedTuple

from .config import SHADOW_OOS_PAGES, VTLB_ENTRIES, EngineConfig
from .guest.memory import (
    ADDR_MASK,
    PAGE_SHIFT,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    Access,
    GuestMemory,
    Walk,
    WalkStatus,
    cr3_root,
)
from .trace import format as fmt


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
#: Flags copied from a present guest entry (plus NX).
_PASS_THRU: Final = PTE_A | PTE_US | PTE_RW | PTE_P | PTE_NX


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


@dataclass(eq=False)
class Shadow:
    """One shadow page: 512 entries, a reference count, maybe pinned."""

    frame: int
    type: ShadowType
    created: int
    entries: list[int] = field(default_factory=lambda: [0] * 512)
    refcount: int = 0
    pinned: bool = False

    @property
    def key(self) -> Key:
        return (self.frame, self.type)

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
    last_emulated_frame: int = 0
    last_emulated_mfn: int = 0
    #: SHOPT_EARLY_UNSHADOW state.
    last_emulated_mfn_for_unshadow: int | None = None
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
    "shadow_early_unshadow", "shadow_writeable", "shadow_invlpg",
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
#: CR4 bits whose change makes Xen recompute paging modes (hvm_set_cr4).
_CR4_PSE, _CR4_PAE, _CR4_PGE, _CR4_PCIDE, _CR4_SMEP = 1 << 4, 1 << 5, 1 << 7, 1 << 17, 1 << 20
_CR4_MODE_BITS: Final = _CR4_PSE | _CR4_PAE | _CR4_PGE | _CR4_SMEP

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
EventHook = Callable[[int, int, int, int, int, int, int, list[str] | None], None]


class ShadowEngine:
    """Xen's shadow paging as a state machine over trace events.

    :param config: knobs and sizes (defaults: upstream).
    :param guest: guest table memory (a fresh one by default).
    :param on_fact: called with every :class:`Fact` as it happens (checks
        can observe without keeping the whole log).
    """

    def __init__(
        self,
        config: EngineConfig | None = None,
        guest: GuestMemory | None = None,
        *,
        on_fact: FactSink | None = None,
    ) -> None:
        self.config = config or EngineConfig()
        self.config.validate()
        self.guest = guest if guest is not None else GuestMemory()
        self.on_fact = on_fact
        #: told how every shadow fault ended (see FAULT_OUTCOMES); None: nobody asks
        self.on_fault: FaultHook | None = None
        #: told of every marker as ``on_marker(event, [name, args...])``
        self.on_marker: Callable[[int, list[str]], None] | None = None
        #: Policy hook (policy mode of the checks): called as
        #: ``refuse_leaf(vcpu, target_frame, fetch)`` for every present leaf
        #: about to be propagated; True makes the shadow entry empty.
        self.refuse_leaf: Callable[[int, int, Fetch], bool] | None = None
        #: Observer hook the Replayer calls after each event it feeds, as
        #: ``after_event(index, kind, vcpu, info, va, pa, val, marker)``
        #: (marker: the MARKER's [name, args...], else None); replay.checks.
        self.after_event: EventHook | None = None
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.facts: list[Fact] = []
        self.hazards: list[Hazard] = []
        self.vcpus: list[VCpu] = [VCpu() for _ in range(self.config.vcpus)]
        self.shadows: dict[Key, Shadow] = {}
        #: Pinned shadows, least recently pinned first (Xen's list tail).
        self.pins: dict[Key, None] = {}
        #: Guest frame -> shadow types it carries (PGC_shadowed_pt, L1..L4).
        self.pt_types: dict[int, set[ShadowType]] = {}
        #: Shadow -> the (parent, index) entries that reference it.
        self.parents: dict[Key, set[tuple[Key, int]]] = {}
        #: Guest frame -> writable present L1/FL1 entries mapping it.
        self.rw_maps: dict[int, set[tuple[Key, int]]] = {}
        #: Out-of-sync frames -> (vcpu, slot); and those that may be written.
        self.oos_where: dict[int, tuple[int, int]] = {}
        self.oos_may_write: set[int] = set()
        self.mmio_frames: set[int] = set()
        self.l3_pinning = self.config.linux_l3_toplevel
        self.pool_total = self.config.pool
        #: Roots whose CR3 writes do not exit, as now in force.
        self._targets = (self.config.target_roots()
                         if self.config.cr3_targets_active == "always" else frozenset())
        self._event = -1
        self._vcpu = 0
        self._facts_on = self.config.record_facts or on_fact is not None
        #: Bumped whenever the shadows change in a way that may take a right
        #: away (a present upper entry changes, a shadow is destroyed, ...):
        #: while it stays, an access :meth:`access` found allowed stays
        #: allowed on the same root (the Replayer's fast path) -- unless its
        #: leaf entry is in ``leaf_log``, the (L1/FL1 shadow, index) of
        #: present leaf entries changed since (a consumer may clear it; when
        #: it grows long it is cleared and ``restrict_gen`` bumped instead).
        self.restrict_gen = 0
        self.leaf_log: list[tuple[Key, int]] = []
        if len(self.config.cr3_targets) > 4:
            self.hazards.append(Hazard(
                -1, -1, "too-many-cr3-targets", 0,
                f"{len(self.config.cr3_targets)} CR3 targets listed, hardware allows 4",
            ))

    # ================================================================== #
    # Public state                                                         #
    # ================================================================== #
    @property
    def pool_used(self) -> int:
        """Pool pages in use: one per shadow plus the OOS snapshot pages."""
        snaps = SHADOW_OOS_PAGES * len(self.vcpus) if self.config.out_of_sync else 0
        return len(self.shadows) + snaps

    @property
    def pool_free(self) -> int:
        return self.pool_total - self.pool_used

    def shadow(self, frame: int, stype: ShadowType) -> Shadow | None:
        return self.shadows.get((frame, stype))

    def keys(self, stype: ShadowType | None = None) -> set[Key]:
        """The shadows that exist (of one type, or all)."""
        if stype is None:
            return set(self.shadows)
        return {k for k in self.shadows if k[1] == stype}

    def access_token(self) -> tuple[object, ...]:
        """What decides whether the shadows allow an access, short of the
        access itself: equal tokens (with no restricting change between,
        see ``restrict_gen``) mean an access allowed then is allowed now."""
        return (self.restrict_gen,
                *[None if v.xen_cr3 is None else self._hw_root(v) for v in self.vcpus])

    def is_page_table(self, frame: int) -> bool:
        """Xen's sh_mfn_is_a_page_table: the frame carries a shadow."""
        return frame in self.pt_types

    def is_out_of_sync(self, frame: int) -> bool:
        return frame in self.oos_where

    def shadow_path(self, vcpu: int, va: int) -> list[tuple[Key, int, int]]:
        """The shadow path the hardware would use for ``va`` on ``vcpu``:
        (shadow key, index, entry) per level, stopping at the first
        not-present entry (included)."""
        out: list[tuple[Key, int, int]] = []
        root = self._hw_root(self.vcpus[vcpu])
        sh = self.shadows.get(root) if root else None
        level = 4
        while sh is not None:
            i = (va >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF
            e = sh.entries[i]
            out.append((sh.key, i, e))
            if not e & SH_P or level == 1:
                break
            sh = self.shadows.get(self._child_key(e, level))
            level -= 1
        return out

    # ================================================================== #
    # Event entry points                                                   #
    # ================================================================== #
    def process(
        self,
        kind: int,
        index: int,
        vcpu: int,
        info: int,
        va: int,
        pa: int,
        pc: int,
        val: int,
        page: bytes | None = None,
        marker: list[str] | None = None,
    ) -> None:
        """Apply one trace event (columns as in :mod:`replay.format`).

        ``page`` is the snapshot of a SNAPSHOT event, ``marker`` the marker
        of a MARKER event.
        """
        self.counters["events"] += 1
        self._event = index
        self._vcpu = vcpu
        if kind <= 3:  # READ, WRITE, FETCH
            self.access(index, vcpu, kind, va, info, pa)
        elif kind == fmt.Kind.TABLE_WRITE:
            self.table_write(index, vcpu, pa, val, va)
        elif kind == fmt.Kind.SNAPSHOT:
            if page is None:
                raise ValueError(f"event {index}: SNAPSHOT without its page")
            self.snapshot(index, pa, page)
        elif kind == fmt.Kind.CR3_WRITE:
            self.cr3_write(index, vcpu, val)
        elif kind == fmt.Kind.INVLPG:
            self.invlpg(index, vcpu, va)
        elif kind == fmt.Kind.CR4_WRITE:
            self.cr4_write(index, vcpu, val, pa)
        elif kind == fmt.Kind.INVPCID:
            self.invpcid(index, vcpu, val, va, pa)
        elif kind == fmt.Kind.CR3_CURRENT:
            self.cr3_current(index, vcpu, val)
        elif kind == fmt.Kind.WINDOW_OPEN:
            self.window_open(index)
        elif kind == fmt.Kind.MARKER:
            self.counters["markers"] += 1
            if self.on_marker is not None and marker:
                self.on_marker(index, marker)
            if marker and self.config.cr3_targets_active == "secure":
                self._secure_marker(marker[0])
        elif kind == fmt.Kind.WINDOW_CLOSE:
            pass
        else:
            raise ValueError(f"event {index}: unknown kind {kind}")

    # -- guest memory ----------------------------------------------------
    def snapshot(self, index: int, pa: int, page: bytes) -> None:
        self.counters["snapshots"] += 1
        self.guest.snapshot(pa >> PAGE_SHIFT, page)

    def window_open(self, index: int) -> None:
        """What we knew is stale: forget guest tables and every shadow (Xen's
        state after time we did not see is unknown; we start empty)."""
        self._event = index
        self.counters["windows"] += 1
        self.guest.forget_all()
        self.restrict_gen += 1
        self.shadows.clear()
        self.pins.clear()
        self.pt_types.clear()
        self.parents.clear()
        self.rw_maps.clear()
        self.oos_where.clear()
        self.oos_may_write.clear()
        self.l3_pinning = self.config.linux_l3_toplevel
        self.vcpus = [VCpu() for _ in range(self.config.vcpus)]
        self._fact("reset", -1, -1, -1, 0, 0, "window")

    def _secure_marker(self, name: str) -> None:
        """``cr3_targets_active = "secure"``: the hypervisor programs the
        CR3-target list when a secure root is registered and clears it when
        the registrations end."""
        if name == fmt.MARKER_SECURE_ROOT and not self._targets:
            self._targets = self.config.target_roots()
            self._fact("cr3-targets", -1, -1, -1, 0, len(self._targets), "on")
        elif name == fmt.MARKER_SECURE_END and self._targets:
            self._targets = frozenset()
            self._fact("cr3-targets", -1, -1, -1, 0, 0, "off")

    # -- CR3 -------------------------------------------------------------
    def cr3_current(self, index: int, vcpu: int, cr3: int) -> None:
        """The CR3 a vCPU holds as the window opens: Xen has shadowed it
        already (outside what we saw); set the slot up without counting a
        write."""
        self._event, self._vcpu = index, vcpu
        v = self._v(vcpu)
        v.cr3 = v.xen_cr3 = cr3
        v.hw_root = None
        self._update_cr3(v, cr3, reason="window")

    def cr3_write(self, index: int, vcpu: int, cr3: int) -> None:
        """``mov cr3``: Xen's sh_update_cr3, unless the root is a CR3 target."""
        self._event, self._vcpu = index, vcpu
        v = self._v(vcpu)
        root = cr3_root(cr3)
        if root in self._targets:
            self._exitless_switch(v, vcpu, cr3, root)
            return
        self.counters["cr3_write_intercepted"] += 1
        v.cr3 = v.xen_cr3 = cr3
        v.hw_root = None
        self._update_cr3(v, cr3, reason="cr3")

    def _update_cr3(self, v: VCpu, cr3: int, *, reason: str) -> None:
        cfg = self.config
        # 1. resync this vCPU's out-of-sync L1s
        if cfg.out_of_sync:
            self._resync_vcpu(v)
        root = cr3_root(cr3)
        # 2. write-protect the new root
        self._remove_write_access(root)
        # 3. look up or create the (empty) L4 shadow
        key: Key = (root, L4)
        if key not in self.shadows:
            if not self._prealloc(1):
                return
            self._make_shadow(root, L4, reason)
        sh = self.shadows[key]
        # 4. a reference for the slot, and pin (to the head of the list)
        sh.refcount += 1
        self._pin(key)
        old, v.slot = v.slot, key
        # 5. drop the previous root's reference
        if old is not None:
            self._put_ref(old, "refcount")
        # 6. flush the vTLB and the fast-emulation record
        self._vtlb_flush(v)
        v.last_write_emul_ok = False

    def _exitless_switch(self, v: VCpu, vcpu: int, cr3: int, root: int) -> None:
        """A CR3 write to a listed root: Xen never sees it. Record what this
        leaves wrong (check C6), then let the hardware run on that root's
        L4 shadow if there is one."""
        self.counters["cr3_write_not_intercepted"] += 1
        ev = self._event
        key: Key = (root, L4)
        if v.oos_frames():
            self.hazards.append(Hazard(ev, vcpu, "oos-stale", root,
                                       f"this vCPU's OOS L1s stay stale: {v.oos_frames()}"))
        others = [f for i, o in enumerate(self.vcpus) if i != vcpu for f in o.oos_frames()]
        if others:
            self.hazards.append(Hazard(ev, vcpu, "oos-other-vcpus", root,
                                       f"other vCPUs' OOS L1s not synced: {others}"))
        if v.vtlb_live():
            self.hazards.append(Hazard(ev, vcpu, "vtlb-live", root,
                                       f"{v.vtlb_live()} vTLB entries survive the switch"))
        if v.last_write_emul_ok:
            self.hazards.append(Hazard(ev, vcpu, "fast-emulation-live", root,
                                       f"last emulated frame {v.last_emulated_mfn:#x} kept"))
        sh = self.shadows.get(key)
        if sh is None:
            self.hazards.append(Hazard(ev, vcpu, "no-shadow-for-target", root,
                                       "the target root has no L4 shadow"))
        elif not sh.pinned:
            self.hazards.append(Hazard(ev, vcpu, "target-not-pinned", root,
                                       "the target's L4 shadow is not pinned"))
        if v.slot is not None and v.slot != key:
            self.hazards.append(Hazard(ev, vcpu, "ref-on-old-root", root,
                                       f"the slot still holds root {v.slot[0]:#x}"))
        if not self.is_page_table(root):
            self.hazards.append(Hazard(ev, vcpu, "root-not-write-protected", root,
                                       "the new root frame is not write-protected"))
        v.cr3 = cr3
        v.hw_root = key if sh is not None else None

    def cr4_write(self, index: int, vcpu: int, new: int, old: int) -> None:
        """CR4 changes of PSE/PAE/PGE/SMEP (or clearing PCIDE) make Xen
        recompute paging modes, which ends in sh_update_cr3 on the same CR3.
        ``old`` 0 means unknown: then assume a change."""
        self._event, self._vcpu = index, vcpu
        v = self._v(vcpu)
        changed = old == 0 or (old ^ new) & _CR4_MODE_BITS or (
            old & _CR4_PCIDE and not new & _CR4_PCIDE)
        if changed and v.xen_cr3 is not None:
            self.counters["cr4_paging_update"] += 1
            self._update_cr3(v, v.xen_cr3, reason="cr4")

    # -- flushes ---------------------------------------------------------
    def invlpg(self, index: int, vcpu: int, va: int) -> None:
        """Xen's sh_invlpg: flush the vTLB and fast-emulation record; if the
        VA's L1 shadow is out of sync, clear that one entry."""
        self._event, self._vcpu = index, vcpu
        v = self._v(vcpu)
        self.counters["shadow_invlpg"] += 1
        self._vtlb_flush(v)
        v.last_write_emul_ok = False
        path = self.shadow_path(vcpu, va)
        if len(path) < 3 or not path[2][2] & SH_P:
            return
        e2 = path[2][2]
        if e2 & SH_FL1 or not self.config.out_of_sync:
            return
        l1frame = (e2 & SH_ADDR) >> PAGE_SHIFT
        if l1frame in self.oos_where:
            sl1 = self.shadows[(l1frame, L1)]
            i = (va >> PAGE_SHIFT) & 0x1FF
            self._set_l1e(sl1, i, 0, -1, "invlpg")

    def invpcid(self, index: int, vcpu: int, itype: int, va: int, pcid: int) -> None:
        """INVPCID as Xen's emulator treats it: type 0 (one address) is an
        INVLPG; the other types flush hardware TLBs only (no shadow change).
        (Xen does not offer INVPCID to shadow-mode guests at all.)"""
        self.counters["invpcid"] += 1
        if itype == 0:
            self.invlpg(index, vcpu, va)

    # -- accesses --------------------------------------------------------
    def access(self, index: int, vcpu: int, kind: int, va: int, info: int, pa: int) -> bool:
        """A recorded READ/WRITE/FETCH: nothing happens when the current
        shadows allow it; otherwise a shadow fault (Xen's sh_page_fault).

        Returns True when the shadows allowed it (no fault, nothing changed
        but the counters and the vCPU's last store)."""
        self._event, self._vcpu = index, vcpu
        c = self.counters
        c["accesses"] += 1
        v = self._v(vcpu)
        user = bool(info & fmt.INFO_USER)
        write = kind == fmt.Kind.WRITE
        if write:
            v.last_store = (va, info & fmt.INFO_SIZE_MASK or 8, user)
        if info & fmt.INFO_IO:
            self.mmio_frames.add(pa >> PAGE_SHIFT)
        if v.xen_cr3 is None:
            c["access_no_cr3"] += 1
            return False
        fetch = kind == fmt.Kind.FETCH
        root = self._hw_root(v)
        if root is not None and self._allowed(root, va, write, user, fetch):
            return True
        self._fault(v, vcpu, va, write, user, fetch)
        return False

    def _allowed(self, root: Key, va: int, write: bool, user: bool, fetch: bool) -> bool:
        shadows = self.shadows
        sh = shadows.get(root)
        level = 4
        while sh is not None:
            e = sh.entries[(va >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF]
            if (not e & SH_P or (write and not e & SH_RW) or (user and not e & SH_US)
                    or (fetch and e & SH_NX)):
                return False
            if level == 1:
                return True
            frame = (e & SH_ADDR) >> PAGE_SHIFT
            if level == 2:
                sh = shadows.get((frame, FL1 if e & SH_FL1 else L1))
            else:
                sh = shadows.get((frame, _BELOW[level]))
            level -= 1
        return False

    def _fault(self, v: VCpu, vcpu: int, va: int, write: bool, user: bool,
               fetch: bool) -> None:
        """sh_page_fault; an ``on_fault`` hook is told how the fault ended."""
        hook = self.on_fault
        if hook is None:
            self._fault_path(v, vcpu, va, write, user, fetch)
            return
        before = self.counters["shadow_writeable"]
        outcome = self._fault_path(v, vcpu, va, write, user, fetch)
        hook(self._event, vcpu, va, write, outcome,
             self.counters["shadow_writeable"] != before)

    def _fault_path(self, v: VCpu, vcpu: int, va: int, write: bool, user: bool,
                    fetch: bool) -> str:
        """The fault proper; returns its outcome (one of :data:`FAULT_OUTCOMES`)."""
        c = self.counters
        cfg = self.config
        c["shadow_fault"] += 1
        if v.cr3 != v.xen_cr3:
            self.hazards.append(Hazard(self._event, vcpu, "fault-on-stale-root",
                                       cr3_root(v.cr3 or 0),
                                       f"Xen walks root {cr3_root(v.xen_cr3 or 0):#x}"))
        # SHOPT_FAST_EMULATION: a write to the frame emulated last time.
        if (cfg.fast_emulation and v.last_write_emul_ok
                and v.last_emulated_frame == va >> PAGE_SHIFT):
            if write and not user and self._leaf_present(vcpu, va):
                if cfg.out_of_sync and v.last_emulated_mfn in self.oos_where:
                    v.last_write_emul_ok = False
                else:
                    c["shadow_fault_fast_emulate"] += 1
                    return "fast_emulate"
            else:
                v.last_write_emul_ok = False
        # SHOPT_FAST_FAULT_PATH: magic entries answer without a walk.
        if cfg.fast_fault_path:
            leaf = self._leaf_entry(vcpu, va)
            if leaf is not None and leaf[1] & SH_MAGIC and not leaf[1] & SH_P:
                l1 = leaf[0]
                if not (cfg.out_of_sync and l1[1] == L1 and l1[0] in self.oos_where):
                    if leaf[1] & SH_GNP:
                        c["shadow_fault_fast_gnp"] += 1
                    else:
                        c["shadow_fault_fast_mmio"] += 1
                    v.last_emulated_mfn_for_unshadow = None
                    return "fast_gnp" if leaf[1] & SH_GNP else "fast_mmio"
        access = Access.WRITE if write else (Access.FETCH if fetch else Access.READ)
        assert v.xen_cr3 is not None
        gw = self.guest.walk(v.xen_cr3, va, access, user)
        if gw.status is WalkStatus.UNKNOWN:
            c["walk_unknown"] += 1
            return "walk_unknown"
        if gw.status is WalkStatus.FAULT:
            c["shadow_fault_bail_real_fault"] += 1
            v.last_emulated_mfn_for_unshadow = None
            self._fact("guest-fault", -1, gw.level, (va >> PAGE_SHIFT) & 0x1FF,
                       0, gw.entries[-1] if gw.entries else 0, gw.reason.name.lower())
            return "guest_fault"
        if gw.level == 3:
            # 1 GiB leaf: Xen's shadow code cannot splinter it (it never
            # offers 1 GiB pages to shadowed guests).
            c["shadow_fault_superpage_1g"] += 1
            return "superpage_1g"
        gfn = gw.gfn
        if cfg.virtual_tlb:
            pfec = 1 | (2 if write else 0) | (4 if user else 0) | (16 if fetch else 0)
            v.vtlb[(va >> PAGE_SHIFT) % VTLB_ENTRIES] = (va >> PAGE_SHIFT, gfn, pfec)
        if not self._prealloc(3):
            return "prealloc_failed"
        if v.slot is None or v.slot not in self.shadows:
            c["shadow_fault_no_root"] += 1
            return "no_root"
        # Write-protect the walked L3, L2 and L1 frames (OOS ones resync).
        self._gw_remove_write_accesses(gw)
        ft = Fetch.DEMAND_WRITE if write else Fetch.DEMAND_READ
        got = self._get_and_create_l1e(v, gw, ft)
        if got is None:
            return "no_l1"
        sl1, i1 = got
        mmio = self._is_mmio(gfn)
        # OOS: a write to a shadowed L1 frame unsyncs it.
        if cfg.out_of_sync and write and gfn in self.pt_types:
            self._unsync(v, vcpu, gfn)
        gl1e = gw.leaf if gw.level == 1 else self._splinter(gw.leaf, va)
        self._set_l1e(sl1, i1, self._propagate(gl1e, 1, gfn, ft), gl1e, "demand")
        if gw.level == 1:
            self._oos_snap_update(gw.frames[3], i1, gl1e)
        if cfg.prefetch:
            self._prefetch(gw, sl1, i1, va)
        if write and gfn in self.pt_types and not (gfn in self.oos_where and not user):
            c["shadow_fault_emulate_write"] += 1
            if user:
                # Xen does not emulate user writes to page tables: it takes
                # them as a hint that the frame is no page table any more.
                c["shadow_fault_emulate_failed"] += 1
                self._remove_all_shadows(gfn, "user-write")
                return "user_write_unshadow"
            if cfg.fast_emulation:
                v.last_emulated_frame = va >> PAGE_SHIFT
                v.last_emulated_mfn = gfn
                v.last_write_emul_ok = True
            return "emulate"
        if mmio:
            c["shadow_fault_mmio"] += 1
            v.last_emulated_mfn_for_unshadow = None
            return "mmio"
        c["shadow_fault_fixed"] += 1
        v.last_emulated_mfn_for_unshadow = None
        return "fixed"

    def _get_and_create_l1e(self, v: VCpu, gw: Walk, ft: Fetch) -> tuple[Shadow, int] | None:
        """Xen's shadow_get_and_create_l1e: make and link missing L3, L2, L1
        (or FL1) shadows along the walk; return the L1 shadow and index."""
        va = gw.va
        assert v.slot is not None
        sl4 = self.shadows[v.slot]
        resync = False
        # L4 entry -> L3 shadow
        i4 = (va >> 39) & 0x1FF
        e4 = sl4.entries[i4]
        if e4 & SH_P:
            sl3 = self.shadows[((e4 & SH_ADDR) >> PAGE_SHIFT, L3)]
        else:
            l3f = gw.frames[1]
            sl3 = self.shadows.get((l3f, L3)) or self._make_shadow(l3f, L3, "demand")
            self._set_upper(sl4, i4, self._propagate(gw.entries[0], 4, l3f, ft),
                            gw.entries[0], "demand")
            resync = True
        # L3 entry -> L2 shadow
        i3 = (va >> 30) & 0x1FF
        e3 = sl3.entries[i3]
        if e3 & SH_P:
            sl2 = self.shadows[((e3 & SH_ADDR) >> PAGE_SHIFT, L2)]
        else:
            l2f = gw.frames[2]
            sl2 = self.shadows.get((l2f, L2)) or self._make_shadow(l2f, L2, "demand")
            self._set_upper(sl3, i3, self._propagate(gw.entries[1], 3, l2f, ft),
                            gw.entries[1], "demand")
            resync = True
        # L2 entry -> L1 or FL1 shadow
        i2 = (va >> 21) & 0x1FF
        e2 = sl2.entries[i2]
        gl2e = gw.entries[2]
        pse = bool(gl2e & PTE_PS)
        if e2 & SH_P and not (ft is Fetch.DEMAND_WRITE and not e2 & SH_RW and pse):
            sl1 = self.shadows[self._child_key(e2, 2)]
        else:
            if pse:
                base = (gl2e & SH_ADDR) >> PAGE_SHIFT
                base &= ~0x1FF
                sl1 = self.shadows.get((base, FL1)) or self._make_shadow(base, FL1, "demand")
            else:
                l1f = gw.frames[3]
                sl1 = self.shadows.get((l1f, L1)) or self._make_shadow(l1f, L1, "demand")
            self._set_upper(sl2, i2, self._propagate(gl2e, 2, sl1.frame, ft, fl1=pse),
                            gl2e, "demand")
        if resync and self.config.out_of_sync:
            self._resync_all()
        return sl1, (va >> PAGE_SHIFT) & 0x1FF

    @staticmethod
    def _splinter(gl2e: int, va: int) -> int:
        """The 4 KiB guest "l1e" of ``va`` inside a 2 MiB superpage."""
        base = (gl2e & ADDR_MASK) & ~0x1F_FFFF
        flags = gl2e & (0xFFF | PTE_NX) & ~PTE_PS & ~0x1000
        return base + (((va >> PAGE_SHIFT) & 0x1FF) << PAGE_SHIFT) | flags

    def _prefetch(self, gw: Walk, sl1: Shadow, i1: int, va: int) -> None:
        """Xen's sh_prefetch: fill following empty entries of the L1 shadow."""
        dist = min(self.config.prefetch_distance, 512 - i1)
        entries = sl1.entries
        real = gw.level == 1
        guest = self.guest.entries(gw.frames[3]) if real else None
        gl2e = gw.entries[2]
        n = 0
        for k in range(1, dist):
            i = i1 + k
            if entries[i] != 0:
                break
            if guest is not None:
                g = guest[i]
                if g & PTE_P and (not g & PTE_A or (g & PTE_RW and not g & PTE_D)):
                    break
            else:
                g = self._splinter(gl2e, va & ~0x1F_FFFF | (i << PAGE_SHIFT))
            target = (g & ADDR_MASK) >> PAGE_SHIFT if g & PTE_P else -1
            new = self._propagate(g, 1, target, Fetch.PREFETCH)
            self._set_l1e(sl1, i, new, g, "prefetch")
            if real:
                self._oos_snap_update(gw.frames[3], i, g)
            if new:
                n += 1
        self.counters["shadow_prefetch"] += n

    def _leaf_entry(self, vcpu: int, va: int) -> tuple[Key, int] | None:
        """The shadow L1 entry the hardware uses for ``va`` (if reached)."""
        path = self.shadow_path(vcpu, va)
        if len(path) == 4:
            return path[3][0], path[3][2]
        return None

    def _leaf_present(self, vcpu: int, va: int) -> bool:
        leaf = self._leaf_entry(vcpu, va)
        return leaf is not None and bool(leaf[1] & SH_P)

    def _gw_remove_write_accesses(self, gw: Walk) -> None:
        oos = self.config.out_of_sync
        for level in (3, 2, 1):
            if level == 1 and gw.level != 1:
                break
            frame = gw.frames[4 - level]
            if oos and frame in self.oos_where:
                if level > 1:
                    self._resync(frame)
                continue
            self._remove_write_access(frame)

    # -- emulated table writes -------------------------------------------
    def table_write(self, index: int, vcpu: int, pa: int, val: int, va: int) -> None:
        """TABLE_WRITE: the new value of one 8-byte entry after a store.

        The guest memory always takes it. If the frame is shadowed and not
        out of sync, the store was trapped and emulated by Xen: the entry is
        re-validated into every shadow of the frame (L1 first), subject to
        SKIP_VERIFY and the early-unshadow heuristic.
        """
        self._event, self._vcpu = index, vcpu
        c = self.counters
        c["table_writes"] += 1
        old = self.guest.write(pa, val)
        frame = pa >> PAGE_SHIFT
        if frame not in self.pt_types:
            return
        if frame in self.oos_where:
            c["shadow_oos_stale_write"] += 1
            return
        c["shadow_emulate"] += 1
        v = self._v(vcpu)
        # The store this entry belongs to: TABLE_WRITEs carry the store's va;
        # the first entry touched is the one holding the store's address.
        store = v.last_store
        first = (pa & 0xFF8) == (va & 0xFF8)
        off = va & 7 if first else 0
        size = 8
        if store is not None and store[0] == va:
            size = min(store[1], 8 - off) if first else 8
        cfg = self.config
        written = (val >> (8 * off)) & ((1 << (8 * size)) - 1)
        # Early unshadow: a second aligned zero write to the same frame.
        if size >= 4 and written & 0xFFFF_FFFF == 0:
            if off == 0 and cfg.early_unshadow:
                if v.last_emulated_mfn_for_unshadow == frame:
                    c["shadow_early_unshadow"] += 1
                    self._remove_all_shadows(frame, "early-unshadow")
                v.last_emulated_mfn_for_unshadow = frame
        else:
            v.last_emulated_mfn_for_unshadow = None
        if frame not in self.pt_types:
            return
        if (cfg.skip_verify and old is not None and off == 0 and size <= 8
                and not old & PTE_P and not val & PTE_P):
            c["shadow_validate_skip"] += 1
            return
        self._validate(frame, (pa >> 3) & 0x1FF, val, "validate")

    def _validate(self, frame: int, i: int, g: int, reason: str) -> None:
        """Xen's sh_validate_guest_entry for one entry: L1, L2, L3, L4."""
        c = self.counters
        for t in (L1, L2, L3, L4):
            sh = self.shadows.get((frame, t))
            if sh is None:
                continue
            c[f"shadow_validate_gl{int(t)}e_calls"] += 1
            if t == L1:
                target = (g & ADDR_MASK) >> PAGE_SHIFT if g & PTE_P else -1
                self._set_l1e(sh, i, self._propagate(g, 1, target, Fetch.PREFETCH), g, reason)
                self._oos_snap_update(frame, i, g)
                continue
            child: Key | None = None
            if g & PTE_P:
                cf = (g & ADDR_MASK) >> PAGE_SHIFT
                if t == L2 and g & PTE_PS:
                    child = (cf & ~0x1FF, FL1)
                elif t == L2:
                    child = (cf, L1)
                elif not g & PTE_PS:
                    child = (cf, ShadowType(t - 1))
                if child is not None and child not in self.shadows:
                    child = None
                if child is not None and t >= L3 and self.config.out_of_sync:
                    self._resync_all()
            new = self._propagate(g, int(t), child[0] if child else -1, Fetch.PREFETCH,
                                  fl1=child is not None and child[1] == FL1)
            if (frame, t) in self.shadows:
                self._set_upper(sh, i, new, g, reason)

    # ================================================================== #
    # _sh_propagate and entry setting                                      #
    # ================================================================== #
    def _is_mmio(self, gfn: int) -> bool:
        if gfn in self.mmio_frames:
            return True
        ram = self.config.ram_frames
        return ram <= 0xC0000 and gfn >= ram

    def _propagate(self, g: int, level: int, target: int, ft: Fetch, *, fl1: bool = False) -> int:
        """Xen's _sh_propagate: the shadow entry for guest entry ``g``.

        ``target`` is the mapped frame (level 1) or the child shadow's frame
        (levels 2-4; -1 when the child has no shadow).
        """
        if not g & PTE_P:
            if level == 1 and not self.config.out_of_sync:
                return SH_GNP
            return 0
        if level == 1 and self._is_mmio((g & ADDR_MASK) >> PAGE_SHIFT):
            return SH_MMIO | (g & ADDR_MASK) | (g & (PTE_P | PTE_RW | PTE_US)) & ~SH_P
        if target < 0:
            return 0
        if level == 1 and self.refuse_leaf is not None and self.refuse_leaf(
                self._vcpu, target, ft):
            return 0
        flags = g & _PASS_THRU
        if level > 1:
            flags |= SH_A | SH_D
        if not g & PTE_A:
            flags &= ~SH_P
        if (level == 1 or (level == 2 and g & PTE_PS)) and not g & PTE_D:
            flags &= ~SH_RW
        if (level == 1 and target in self.pt_types
                and not (ft is Fetch.DEMAND_WRITE and target in self.oos_may_write)):
            flags &= ~SH_RW
        return (target << PAGE_SHIFT) | flags | (SH_FL1 if fl1 else 0)

    @staticmethod
    def _child_key(e: int, level: int) -> Key:
        frame = (e & SH_ADDR) >> PAGE_SHIFT
        if level == 2:
            return (frame, FL1 if e & SH_FL1 else L1)
        return (frame, _BELOW[level])

    def _set_l1e(self, sh: Shadow, i: int, new: int, g: int, reason: str) -> None:
        old = sh.entries[i]
        if old == new:
            return
        key = sh.key
        if old & (SH_P | SH_RW) == SH_P | SH_RW:
            s = self.rw_maps.get((old & SH_ADDR) >> PAGE_SHIFT)
            if s is not None:
                s.discard((key, i))
        if new & (SH_P | SH_RW) == SH_P | SH_RW:
            self.rw_maps.setdefault((new & SH_ADDR) >> PAGE_SHIFT, set()).add((key, i))
        if old & SH_P:
            self._leaf_changed(key, i)
        sh.entries[i] = new
        if self._facts_on:
            self._fact("propagated", sh.frame, int(sh.type), i, new, g, reason)

    def _set_upper(self, sh: Shadow, i: int, new: int, g: int, reason: str) -> None:
        """shadow_set_l4e/l3e/l2e: take the new child's reference first,
        then drop the old one's."""
        old = sh.entries[i]
        if old == new:
            return
        level = int(sh.type)
        key = sh.key
        if new & SH_P:
            child = self._child_key(new, level)
            self.shadows[child].refcount += 1
            self.parents.setdefault(child, set()).add((key, i))
            if level == 4 and self.l3_pinning:
                self._pin(child)
            if (level == 2 and child[1] == L1 and self.config.out_of_sync
                    and child[0] in self.oos_where):
                self._resync(child[0])
        if old & SH_P:
            self.restrict_gen += 1
        sh.entries[i] = new
        if self._facts_on:
            self._fact("propagated", sh.frame, level, i, new, g, reason)
        if old & SH_P:
            ochild = self._child_key(old, level)
            ps = self.parents.get(ochild)
            if ps is not None:
                ps.discard((key, i))
            self._put_ref(ochild, "refcount")

    # ================================================================== #
    # Shadow life cycle                                                    #
    # ================================================================== #
    def _make_shadow(self, frame: int, stype: ShadowType, reason: str) -> Shadow:
        c = self.counters
        if stype == L4 and self.l3_pinning:
            l4s = sum(1 for k in self.pins if k[1] == L4)
            if l4s > 2 * len(self.vcpus):
                self.l3_pinning = False
                for k in [k for k in self.pins if k[1] == L3]:
                    c["shadow_unpin_l3_toplevel"] += 1
                    self._unpin(k, "l3-toplevel")
        sh = Shadow(frame, stype, self._event)
        if stype != FL1:
            # shadow_promote: an out-of-sync frame is resynced first.
            if self.config.out_of_sync and frame in self.oos_where:
                self._resync(frame)
            self.pt_types.setdefault(frame, set()).add(stype)
        self.shadows[sh.key] = sh
        c["shadow_created"] += 1
        c["shadow_created_" + _TYPE_NAME[stype]] += 1
        self._fact("created", frame, int(stype), -1, 0, 0, reason)
        return sh

    def _put_ref(self, key: Key, reason: str) -> None:
        sh = self.shadows.get(key)
        if sh is None:
            return
        sh.refcount -= 1
        if sh.refcount <= 0:
            self._destroy(sh, reason)

    def _destroy(self, sh: Shadow, reason: str) -> None:
        c = self.counters
        key = sh.key
        self.restrict_gen += 1
        del self.shadows[key]
        self.pins.pop(key, None)
        if sh.type != FL1:
            types = self.pt_types.get(sh.frame)
            if types is not None:
                types.discard(sh.type)
                if not types:
                    del self.pt_types[sh.frame]
                    if sh.frame in self.oos_where:
                        self._oos_forget(sh.frame)
        c["shadow_destroyed"] += 1
        c["shadow_destroyed_" + _TYPE_NAME[sh.type]] += 1
        if reason == "pool":
            c["shadow_evicted"] += 1
        self._fact("destroyed", sh.frame, int(sh.type), -1, 0, 0, reason)
        for v in self.vcpus:
            v.last_write_emul_ok = False
        level = int(sh.type)
        self.parents.pop(key, None)
        for i, e in enumerate(sh.entries):
            if not e & SH_P:
                continue
            if level <= 1:
                if e & SH_RW:
                    s = self.rw_maps.get((e & SH_ADDR) >> PAGE_SHIFT)
                    if s is not None:
                        s.discard((key, i))
            else:
                child = self._child_key(e, level)
                ps = self.parents.get(child)
                if ps is not None:
                    ps.discard((key, i))
                self._put_ref(child, reason if reason == "pool" else "refcount")

    def _pin(self, key: Key) -> None:
        """sh_pin: take a reference if newly pinned; move to the list head."""
        sh = self.shadows[key]
        if sh.pinned:
            del self.pins[key]
        else:
            sh.pinned = True
            sh.refcount += 1
            self._fact("pinned", key[0], int(key[1]), -1, 0, 0, "pin")
        self.pins[key] = None

    def _unpin(self, key: Key, reason: str) -> None:
        sh = self.shadows.get(key)
        if sh is None or not sh.pinned:
            return
        sh.pinned = False
        del self.pins[key]
        self._fact("unpinned", key[0], int(key[1]), -1, 0, 0, reason)
        self._put_ref(key, reason)

    def _remove_all_shadows(self, frame: int, reason: str) -> None:
        """sh_remove_shadows: unpin and unhook every shadow of ``frame``
        (an L4 some vCPU's CR3 slot holds survives)."""
        for t in (L1, L2, L3, L4):
            key = (frame, t)
            if key not in self.shadows:
                continue
            self._unpin(key, reason)
            for pk, i in list(self.parents.get(key, ())):
                psh = self.shadows.get(pk)
                if psh is not None and key in self.shadows:
                    self._set_upper(psh, i, 0, 0, reason)

    def _remove_write_access(self, frame: int) -> None:
        """sh_remove_write_access: every writable shadow mapping of the
        frame becomes read-only."""
        maps = self.rw_maps.pop(frame, None)
        if not maps:
            return
        for key, i in maps:
            sh = self.shadows.get(key)
            if sh is None:
                continue
            e = sh.entries[i]
            if e & SH_RW:
                self._leaf_changed(key, i)
                sh.entries[i] = e & ~SH_RW
                self.counters["shadow_writeable"] += 1
                if self._facts_on:
                    self._fact("propagated", sh.frame, int(sh.type), i, e & ~SH_RW, -1,
                               "write-protect")

    def _prealloc(self, pages: int) -> bool:
        """_shadow_prealloc: unpin least recently pinned shadows, then unhook
        the current roots, until ``pages`` pool pages are free."""
        if self.pool_free >= pages:
            return True
        c = self.counters
        c["shadow_prealloc_1"] += 1
        for key in list(self.pins):
            self._unpin(key, "pool")
            if self.pool_free >= pages:
                return True
        c["shadow_prealloc_2"] += 1
        for v in self.vcpus:
            if v.slot is None:
                continue
            sh = self.shadows.get(v.slot)
            if sh is None:
                continue
            for i, e in enumerate(sh.entries):
                if e & SH_P:
                    self._set_upper(sh, i, 0, 0, "pool")
            if self.pool_free >= pages:
                return True
        c["shadow_prealloc_fail"] += 1
        return False

    # ================================================================== #
    # Out of sync                                                          #
    # ================================================================== #
    def _unsync(self, v: VCpu, vcpu: int, frame: int) -> None:
        """sh_unsync: only a frame shadowed as an L1 alone, not yet OOS."""
        types = self.pt_types.get(frame)
        if types != {L1} or frame in self.oos_where:
            return
        self._oos_hash_add(v, vcpu, frame)
        self.oos_may_write.add(frame)
        self.counters["shadow_unsync"] += 1
        self._fact("unsynced", frame, int(L1), -1, 0, 0, "write-fault")

    def _oos_hash_add(self, v: VCpu, vcpu: int, frame: int) -> None:
        n = SHADOW_OOS_PAGES
        idx = frame % n
        cur = v.oos[idx]
        snap: list[int] | None = self.guest.entries(frame) or [0] * 512
        if cur is not None and cur % n == idx:
            # punt the occupant (which sits in its own slot) to the next slot
            moved, moved_snap = cur, v.oos_snap[idx]
            v.oos[idx], v.oos_snap[idx] = frame, snap
            self.oos_where[frame] = (vcpu, idx)
            frame, snap = moved, moved_snap
            idx = (idx + 1) % n
        occupant = v.oos[idx]
        if occupant is not None:
            self.counters["shadow_unsync_evict"] += 1
            self._resync(occupant)
        v.oos[idx], v.oos_snap[idx] = frame, snap
        self.oos_where[frame] = (vcpu, idx)

    def _oos_snap_update(self, frame: int, i: int, g: int) -> None:
        where = self.oos_where.get(frame)
        if where is not None:
            snap = self.vcpus[where[0]].oos_snap[where[1]]
            if snap is not None:
                snap[i] = g

    def _oos_forget(self, frame: int) -> None:
        where = self.oos_where.pop(frame, None)
        self.oos_may_write.discard(frame)
        if where is not None:
            v = self.vcpus[where[0]]
            v.oos[where[1]] = None
            v.oos_snap[where[1]] = None

    def _resync(self, frame: int) -> None:
        """_sh_resync: write-protect the frame again and re-validate every
        entry that changed since its snapshot."""
        where = self.oos_where.get(frame)
        if where is None:
            return
        v = self.vcpus[where[0]]
        snap = v.oos_snap[where[1]]
        self._oos_forget(frame)
        self._remove_write_access(frame)
        sh = self.shadows.get((frame, L1))
        guest = self.guest.entries(frame)
        if sh is not None and guest is not None:
            for i, g in enumerate(guest):
                if snap is None or snap[i] != g:
                    target = (g & ADDR_MASK) >> PAGE_SHIFT if g & PTE_P else -1
                    self._set_l1e(sh, i, self._propagate(g, 1, target, Fetch.PREFETCH), g,
                                  "resync")
        self.counters["shadow_resync"] += 1
        self._fact("resynced", frame, int(L1), -1, 0, 0, "resync")

    def _resync_vcpu(self, v: VCpu) -> None:
        for f in v.oos_frames():
            self._resync(f)

    def _resync_all(self) -> None:
        """shadow_resync_all: every vCPU's OOS pages."""
        if self.oos_where:
            for f in list(self.oos_where):
                self._resync(f)

    # ================================================================== #
    # Helpers                                                              #
    # ================================================================== #
    def _v(self, vcpu: int) -> VCpu:
        while vcpu >= len(self.vcpus):
            # A trace with more vCPUs than configured: grow (pool unchanged).
            self.vcpus.append(VCpu())
        return self.vcpus[vcpu]

    def _hw_root(self, v: VCpu) -> Key | None:
        if v.hw_root is not None and v.hw_root in self.shadows:
            return v.hw_root
        return v.slot

    def _vtlb_flush(self, v: VCpu) -> None:
        if self.config.virtual_tlb:
            v.vtlb = [None] * VTLB_ENTRIES

    def _leaf_changed(self, key: Key, i: int) -> None:
        """A present L1/FL1 shadow entry changes (see ``leaf_log``)."""
        log = self.leaf_log
        if len(log) >= 4096:
            log.clear()
            self.restrict_gen += 1
        else:
            log.append((key, i))

    def allowed_leaf(self, vcpu: int, va: int) -> tuple[Key, int] | None:
        """The leaf (L1/FL1 shadow, index) the hardware path of ``va`` on
        ``vcpu`` ends at, if it reaches one (for ``leaf_log`` consumers)."""
        path = self.shadow_path(vcpu, va)
        if len(path) == 4:
            return path[3][0], path[3][1]
        return None

    def _fact(self, kind: str, frame: int, stype: int, index: int, value: int, guest: int,
              reason: str) -> None:
        if not self._facts_on:
            return
        fact = Fact(self._event, kind, self._vcpu, frame, stype, index, value, guest, reason)
        if self.config.record_facts:
            self.facts.append(fact)
        if self.on_fact is not None:
            self.on_fact(fact)
