"""The shadow model's state, and what every part of the model reads.

:class:`EngineState` builds the state of a
:class:`~replay.shadow.engine.ShadowEngine` (``__init__``) and holds the
public queries on it and the helpers every part uses. The behaviour is split
along Xen's own files (``xen/arch/x86/mm/shadow/``), each a class over this
state that :class:`~replay.shadow.engine.ShadowEngine` composes:

* ``multi.py``: ``multi.c`` -- sh_page_fault, shadow_get_and_create_l1e,
  _sh_propagate, sh_prefetch, validation, shadow_set_l*e;
* ``common.py``: ``common.c`` -- making, destroying, pinning shadows, the
  pool (_shadow_prealloc), sh_remove_write_access, sh_remove_shadows;
* ``oos.py``: out-of-sync L1s (sh_unsync, _sh_resync, the OOS hash);
* ``targets.py``: the CR3-target list and exit-less switches (C6 hazards);
* ``engine.py``: the event dispatch, the CR3 path and the access check.

A call from one of these files into another is declared below (under
``TYPE_CHECKING``, for the type checker only) and found at run time in the
composed class.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from ..guest.memory import PAGE_SHIFT, GuestMemory
from .config import SHADOW_OOS_PAGES, VTLB_ENTRIES, EngineConfig
from .types import (
    _BELOW,
    COUNTERS,
    FL1,
    L1,
    SH_ADDR,
    SH_FL1,
    SH_P,
    Fact,
    FactSink,
    FaultHook,
    Fetch,
    Hazard,
    Key,
    Shadow,
    ShadowType,
    VCpu,
)

_new_fact = tuple.__new__


class EngineState:
    """The state of the shadow model (see :class:`~replay.shadow.engine.ShadowEngine`)."""

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
        #: Shadow -> its up-pointer (sp->up): the first parent entry that
        #: linked it, while that entry still does (sh_get_ref/sh_put_ref);
        #: only for types that have one (sh_type_has_up_pointer).
        self.up: dict[Key, tuple[Key, int]] = {}
        #: Guest frame -> writable present L1/FL1 entries mapping it.
        self.rw_maps: dict[int, set[tuple[Key, int]]] = {}
        #: Out-of-sync frames -> (vcpu, slot); and those that may be written.
        self.oos_where: dict[int, tuple[int, int]] = {}
        self.oos_may_write: set[int] = set()
        #: Out-of-sync frame -> its fixup table, oldest first (oos_fixup).
        self.oos_fixups: dict[int, list[tuple[Key, int]]] = {}
        self.mmio_frames: set[int] = set()
        #: d->arch.paging.shadow.pagetable_dying_op: the guest has used
        #: HVMOP_pagetable_dying (Xen's early unshadow then trusts it).
        self.dying_op = False
        #: Guest frames with page->pagetable_dying (a top-level table the
        #: guest said is dying; cleared when the frame is promoted anew).
        self.dying_frames: set[int] = set()
        self.l3_pinning = self.config.linux_l3_toplevel
        self.pool_total = self.config.pool
        #: Roots whose CR3 writes do not exit, as now in force.
        self._targets = (self.config.target_roots()
                         if self.config.cr3_targets_active == "always" else frozenset())
        self._event = -1
        self._vcpu = 0
        self._facts_on = self.config.record_facts or on_fact is not None
        #: Whether "propagated" facts (most of them) are made: as
        #: ``_facts_on`` until :meth:`facts_wanted` asks the sink.
        self._props_on = self._facts_on
        if self.config.guest_kind == "xen-aware":
            self._boot_probe()
        #: What changed since a consumer last looked that may take a right
        #: away: (shadow, index) of a present entry that changed (any
        #: level), (shadow, -1) of a shadow destroyed. An access
        #: :meth:`access` found allowed stays allowed on the same roots
        #: while no entry on its path (:meth:`allowed_path`) nor one of its
        #: shadows is logged (the Replayer's fast path; a consumer may clear
        #: the log). When the log grows long, or for changes too wide to
        #: log (a WINDOW_OPEN), it is cleared and ``restrict_gen`` bumped:
        #: then nothing allowed before is known allowed.
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

    @staticmethod
    def _child_key(e: int, level: int) -> Key:
        frame = (e & SH_ADDR) >> PAGE_SHIFT
        if level == 2:
            return (frame, FL1 if e & SH_FL1 else L1)
        return (frame, _BELOW[level])

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
        """A present shadow entry changes, or (``i`` = -1) a shadow goes
        (see ``leaf_log``)."""
        log = self.leaf_log
        if len(log) >= 4096:
            log.clear()
            self.restrict_gen += 1
        else:
            log.append((key, i))

    def allowed_path(self, vcpu: int, va: int) -> list[tuple[Key, int]] | None:
        """The (shadow, index) entries of the hardware path of ``va`` on
        ``vcpu``, root first, if it reaches a leaf (for ``leaf_log``
        consumers: the access stays allowed while none of them, nor their
        shadows, is logged)."""
        # shadow_path's walk, keeping only (shadow, index)
        root = self._hw_root(self.vcpus[vcpu])
        shadows = self.shadows
        sh = shadows.get(root) if root else None
        out: list[tuple[Key, int]] = []
        level = 4
        while sh is not None:
            i = (va >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF
            out.append((sh.key, i))
            if level == 1:
                return out
            e = sh.entries[i]
            if not e & SH_P:
                return None
            sh = shadows.get(self._child_key(e, level))
            level -= 1
        return None

    def facts_wanted(self) -> None:
        """Ask the fact sink again whether it takes "propagated" facts now
        (its ``wants_fact(kind)``, if it has one: a
        :class:`~replay.driver.hub.FactHub`, a checker with no frame
        registered): if not, and the log is off, none is made. A sink whose
        answer may change says so by calling this again."""
        sink = self.on_fact
        ask = getattr(sink, "wants_fact", None)
        self._props_on = self._facts_on and (
            self.config.record_facts or sink is None or ask is None or bool(ask("propagated")))

    def _fact(self, kind: str, frame: int, stype: int, index: int, value: int, guest: int,
              reason: str) -> None:
        if not self._facts_on:
            return
        fact = _new_fact(Fact, (self._event, kind, self._vcpu, frame, stype, index, value, guest,
                                reason))  # Fact(...) without its Python __new__
        if self.config.record_facts:
            self.facts.append(fact)
        if self.on_fact is not None:
            self.on_fact(fact)

    if TYPE_CHECKING:
        # multi.py (Xen's multi.c)
        def _boot_probe(self) -> None: ...
        def _set_l1e(self, sh: Shadow, i: int, new: int, g: int, reason: str) -> None: ...
        def _set_upper(self, sh: Shadow, i: int, new: int, g: int, reason: str) -> None: ...
        def _propagate(self, g: int, level: int, target: int, ft: Fetch, *,
                       fl1: bool = False) -> int: ...
        def _validate(self, frame: int, i: int, g: int, reason: str) -> None: ...
        # common.py (Xen's common.c)
        def _make_shadow(self, frame: int, stype: ShadowType, reason: str) -> Shadow: ...
        def _put_ref(self, key: Key, reason: str) -> None: ...
        def _pin(self, key: Key) -> None: ...
        def _prealloc(self, pages: int) -> bool: ...
        def _remove_all_shadows(self, frame: int, reason: str) -> None: ...
        def _remove_shadows_fast(self, frame: int, reason: str) -> None: ...
        def _has_up_pointer(self, stype: ShadowType) -> bool: ...
        def _remove_write_access(self, frame: int) -> None: ...
        # oos.py (out of sync)
        def _unsync(self, v: VCpu, vcpu: int, frame: int) -> None: ...
        def _oos_snap_update(self, frame: int, i: int, g: int) -> None: ...
        def _oos_forget(self, frame: int) -> None: ...
        def _resync(self, frame: int) -> None: ...
        def _resync_all(self) -> None: ...
        def _oos_fixup_add(self, frame: int, key: Key, i: int) -> None: ...

