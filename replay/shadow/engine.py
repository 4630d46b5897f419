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
* The guest tables come from :class:`~replay.guest.memory.GuestMemory`, which the
  engine owns (SNAPSHOT, TABLE_WRITE and WINDOW_OPEN update it).

Simplifications (documented, deliberate): guest frame == machine frame (no
p2m other than "RAM below ram_mib, MMIO above or where an access said
so"); ``sh_remove_shadows`` is always the thorough version; emulated stores
are taken from the TABLE_WRITE events that follow the store (so an emulated
write is validated entry by entry); the writable-mapping heuristic is exact
(a reverse map), so ``SHOPT_WRITABLE_HEURISTIC`` changes no result.
"""

from __future__ import annotations

import contextlib
from typing import Final

from ..guest.memory import PAGE_SHIFT, cr3_root
from ..trace import format as fmt
from .common import Common
from .hvm import Emulate
from .multi import Multi
from .oos import OutOfSync
from .targets import Cr3Targets
from .types import _BELOW, FL1, L1, L4, SH_ADDR, SH_FL1, SH_NX, SH_P, SH_RW, SH_US, Key, VCpu

#: CR4 bits whose change makes Xen recompute paging modes (hvm_set_cr4).
_CR4_PSE, _CR4_PAE, _CR4_PGE, _CR4_PCIDE, _CR4_SMEP = 1 << 4, 1 << 5, 1 << 7, 1 << 17, 1 << 20
_CR4_MODE_BITS: Final = _CR4_PSE | _CR4_PAE | _CR4_PGE | _CR4_SMEP


class ShadowEngine(Cr3Targets, OutOfSync, Common, Emulate, Multi):
    """Xen's shadow paging as a state machine over trace events.

    :param config: knobs and sizes (defaults: upstream).
    :param guest: guest table memory (a fresh one by default).
    :param on_fact: called with every :class:`Fact` as it happens (checks
        can observe without keeping the whole log).

    The state and its queries are :class:`~replay.shadow.state.EngineState`'s;
    the fault path, the life cycle, out of sync and the CR3-target list are
    the classes of ``multi.py``, ``common.py``, ``oos.py`` and
    ``targets.py``. Here: the event entry points, the CR3 path and the
    access check.
    """

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
        """Apply one trace event (columns as in :mod:`replay.trace.format`).

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
            if (marker and marker[0] == fmt.MARKER_DYING and len(marker) == 2
                    and self.config.guest_kind == "xen-aware"):
                # (a guest's own marker of that name, not a number: ignored)
                with contextlib.suppress(ValueError):
                    self.pagetable_dying(index, vcpu, int(marker[1], 16))
        elif kind == fmt.Kind.UNTRACK:
            self.untrack(index, vcpu, pa >> PAGE_SHIFT)
        elif kind == fmt.Kind.WINDOW_CLOSE:
            pass
        else:
            raise ValueError(f"event {index}: unknown kind {kind}")

    # -- guest memory ----------------------------------------------------
    def snapshot(self, index: int, pa: int, page: bytes) -> None:
        self.counters["snapshots"] += 1
        self.guest.snapshot(pa >> PAGE_SHIFT, page)

    def untrack(self, index: int, vcpu: int, frame: int) -> None:
        """UNTRACK: nothing in the guest can reach ``frame`` as a table any
        more, and the trace stops telling its stores.

        Xen cannot see that: it keeps a shadow until it unshadows the frame
        (check_for_early_unshadow on the emulated zero writes of a
        ``clear_page``, sh_pagetable_dying, the pool's reclaim) or until a
        parent's emulated write drops the last reference. The plugin
        records the first stores to a dying frame before it untracks it,
        so those rules have run by now in the common case; a shadow still
        there is removed here (sh_remove_shadows, as early unshadow would
        at the next emulated zero write) and counted, since from here the
        model could not emulate the writes Xen would trap."""
        self.counters["untracked"] += 1
        self.guest.forget(frame)
        if frame in self.pt_types:
            self.counters["shadow_unshadow_untracked"] += 1
            self._remove_all_shadows(frame, "untracked")

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
        self.up.clear()
        self.rw_maps.clear()
        self.oos_where.clear()
        self.oos_may_write.clear()
        self.oos_fixups.clear()
        # SHOPT_LINUX_L3_TOPLEVEL is switched off for good by sh_make_shadow
        # once a domain has had more than 2 * max_vcpus L4 shadows: any Linux
        # that booted and ran a few processes is past that (review D9).
        self.l3_pinning = False
        self.vcpus = [VCpu() for _ in range(self.config.vcpus)]
        self.dying_frames.clear()
        if self.config.guest_kind == "xen-aware":
            # A Xen-aware guest has made the call since boot on every vCPU
            # that ran a process; Xen's per-vCPU flag at this moment is not
            # in the trace: taken as set (what the boot probe and each
            # exit_mmap leave).
            for v in self.vcpus:
                v.pagetable_dying = True
        self._fact("reset", -1, -1, -1, 0, 0, "window")

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
        # 7. make the other vCPUs' out-of-sync pages safe
        if cfg.out_of_sync and len(self.vcpus) > 1:
            self._sync_other_vcpus(v)

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
            self._update_paging_modes(v)

    def _update_paging_modes(self, v: VCpu) -> None:
        """common.c sh_update_paging_modes for a long-mode vCPU: first
        detach_old_tables (multi.c sh_detach_old_tables: the slot's
        reference on the root goes, so an unpinned root dies with its
        hierarchy), then shadow_resync_all (every vCPU's out-of-sync pages,
        fully), then sh_update_cr3 on the same CR3."""
        assert v.xen_cr3 is not None
        old, v.slot = v.slot, None
        if old is not None:
            self._put_ref(old, "refcount")
        if self.config.out_of_sync:
            self._resync_all()
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
    def access(self, index: int, vcpu: int, kind: int, va: int, info: int, pa: int,
               path: list[tuple[Key, int]] | None = None) -> bool:
        """A recorded READ/WRITE/FETCH: nothing happens when the current
        shadows allow it; otherwise a shadow fault (Xen's sh_page_fault).

        Returns True when the shadows allowed it (no fault, nothing changed
        but the counters and the vCPU's last store); then ``path``, if
        given, holds what :meth:`allowed_path` would return (the walk is
        not made twice). Its content is meaningless when False."""
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
        if root is not None and self._allowed(root, va, write, user, fetch, path):
            return True
        self._fault(v, vcpu, va, write, user, fetch)
        return False

    def _allowed(self, root: Key, va: int, write: bool, user: bool, fetch: bool,
                 path: list[tuple[Key, int]] | None = None) -> bool:
        """Whether the hardware path from ``root`` allows the access;
        ``path`` (if given) gets each (shadow, index) walked."""
        shadows = self.shadows
        sh = shadows.get(root)
        level = 4
        while sh is not None:
            i = (va >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF
            if path is not None:
                path.append((sh.key, i))
            e = sh.entries[i]
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
