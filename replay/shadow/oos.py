"""Out-of-sync L1 shadows (``SHOPT_OUT_OF_SYNC``; Xen's ``common.c``).

sh_unsync (a write fault on an L1 shadowed alone), the per-vCPU OOS hash
(oos_hash_add, with its snapshot pages), _sh_resync (write-protect again and
re-validate what changed since the snapshot) and shadow_resync_all.
"""

from __future__ import annotations

from ..guest.memory import ADDR_MASK, PAGE_SHIFT, PTE_P
from .config import SHADOW_OOS_FIXUPS, SHADOW_OOS_PAGES
from .state import EngineState
from .types import L1, SH_ADDR, SH_MAGIC, SH_P, SH_RW, Fetch, Key, VCpu

#: Shadow L1 entries sh_resync_l1 visits: present ones, magic ones included.
_VISITED = SH_P | SH_MAGIC


class OutOfSync(EngineState):
    """Out-of-sync L1s: unsync, the OOS hash and snapshots, resync."""

    # ================================================================== #
    # Out of sync                                                          #
    # ================================================================== #
    def _unsync(self, v: VCpu, vcpu: int, frame: int) -> None:
        """sh_unsync: only a frame shadowed as an L1 alone, not yet OOS,
        and only while ``oos_active``: sh_update_paging_modes sets it when
        every vCPU has paging enabled (the trace's sign of that: the vCPU
        has a CR3; an AP loads its CR3 just before it sets CR0.PG)."""
        types = self.pt_types.get(frame)
        if types != {L1} or frame in self.oos_where:
            return
        if any(w.xen_cr3 is None for w in self.vcpus):
            return
        self._oos_hash_add(v, vcpu, frame)
        self.oos_may_write.add(frame)
        self.oos_fixups[frame] = []
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

    def _oos_fixup_add(self, frame: int, key: Key, i: int) -> None:
        """oos_fixup_add (common.c), from shadow_set_l1e for every writable
        mapping of a may-write out-of-sync frame: each OOS page keeps its
        last SHADOW_OOS_FIXUPS (2) writable mappings; a third one takes the
        oldest's place, which loses write access
        (sh_rm_write_access_from_sl1p: also sets this vCPU's
        pagetable_dying from the frame's)."""
        fix = self.oos_fixups.get(frame)
        if fix is None or (key, i) in fix:
            return
        self.counters["shadow_oos_fixup_add"] += 1
        if len(fix) == SHADOW_OOS_FIXUPS:
            okey, oi = fix.pop(0)
            self.counters["shadow_oos_fixup_evict"] += 1
            self._v(self._vcpu).pagetable_dying = frame in self.dying_frames
            sh = self.shadows.get(okey)
            if sh is not None:
                e = sh.entries[oi]
                if e & (SH_P | SH_RW) == SH_P | SH_RW and (e & SH_ADDR) >> PAGE_SHIFT == frame:
                    self._set_l1e(sh, oi, e & ~SH_RW, -1, "oos-fixup")
        fix.append((key, i))

    def _oos_fixup_flush(self, frame: int, fixups: list[tuple[Key, int]]) -> None:
        """oos_fixup_flush_gmfn: each recorded writable mapping that still
        maps ``frame`` writable becomes read-only (sh_rm_write_access_from_sl1p,
        not counted by sh_remove_write_access)."""
        for key, i in fixups:
            sh = self.shadows.get(key)
            if sh is None:
                continue
            e = sh.entries[i]
            if e & (SH_P | SH_RW) == SH_P | SH_RW and (e & SH_ADDR) >> PAGE_SHIFT == frame:
                self._set_l1e(sh, i, e & ~SH_RW, -1, "oos-fixup")

    def _oos_forget(self, frame: int) -> None:
        where = self.oos_where.pop(frame, None)
        self.oos_may_write.discard(frame)
        self.oos_fixups.pop(frame, None)
        if where is not None:
            v = self.vcpus[where[0]]
            v.oos[where[1]] = None
            v.oos_snap[where[1]] = None

    def _resync(self, frame: int) -> None:
        """_sh_resync: write-protect the frame again and re-validate the
        entries that changed since the snapshot, visiting only the shadow's
        present entries (multi.c sh_resync_l1 walks the shadow with
        SHADOW_FOREACH_L1E, whose body runs for entries with _PAGE_PRESENT;
        Xen's magic MMIO / not-present entries have that bit set too). A
        guest entry written while out of sync where the shadow entry is
        empty is built at its first fault, not here."""
        where = self.oos_where.get(frame)
        if where is None:
            return
        v = self.vcpus[where[0]]
        snap = v.oos_snap[where[1]]
        fixups = self.oos_fixups.get(frame, [])
        self._oos_forget(frame)
        if self.rw_maps.get(frame):
            # oos_remove_write_access -> sh_rm_write_access_from_sl1p sets the
            # current vCPU's pagetable_dying from the frame's (an L1: false).
            self._v(self._vcpu).pagetable_dying = frame in self.dying_frames
        # oos_remove_write_access: oos_fixup_flush_gmfn takes write access
        # away through the fixup table first; sh_remove_write_access then
        # finds what is left (nothing, when the fixups held every writable
        # mapping: it returns early and Xen's fault record has no WRMAP flag
        # and shadow_writeable is not counted)
        self._oos_fixup_flush(frame, fixups)
        self._remove_write_access(frame)
        self._resync_l1(frame, snap)  # as _sh_resync calls sh_resync_l1
        self.counters["shadow_resync"] += 1
        self._fact("resynced", frame, int(L1), -1, 0, 0, "resync")

    def _resync_l1(self, frame: int, snap: list[int] | None) -> None:
        """sh_resync_l1: re-validate the shadow's present entries whose guest
        entry changed since the snapshot, and bring the snapshot up to date;
        the frame stays out of sync and writable."""
        sh = self.shadows.get((frame, L1))
        guest = self.guest.entries(frame)
        if sh is None or guest is None:
            return
        entries = sh.entries
        for i, g in enumerate(guest):
            if entries[i] & _VISITED and (snap is None or snap[i] != g):
                target = (g & ADDR_MASK) >> PAGE_SHIFT if g & PTE_P else -1
                self._set_l1e(sh, i, self._propagate(g, 1, target, Fetch.PREFETCH), g,
                              "resync")
                if snap is not None:
                    snap[i] = g

    def _safe_not_to_sync(self, v: VCpu, frame: int) -> bool:
        """multi.c sh_safe_not_to_sync: the frame's L1 shadow has one
        reference and an up-pointer (``sp->up``: its first parent entry,
        cleared when that entry unlinks it even if another still does), and
        so on up to an L4 shadow that is not the root ``v`` runs on. An L3
        that is pinned has no up-pointer (sh_type_has_up_pointer), so with
        L3 pinning it is never safe."""
        if self.l3_pinning:
            return False
        key: Key = (frame, L1)
        for _ in range(3):  # L1 -> L2 -> L3 -> L4
            sh = self.shadows.get(key)
            up = self.up.get(key)
            if sh is None or sh.refcount != 1 or up is None:
                return False
            key = up[0]
        return v.slot != key

    def _sync_other_vcpus(self, v: VCpu) -> None:
        """shadow_sync_other_vcpus (sh_resync_all with skip, others only), at
        the end of sh_update_cr3: every other vCPU's out-of-sync pages are
        made safe (their changed present entries re-validated, TLB-flush
        semantics) unless sh_safe_not_to_sync says they cannot matter to
        the new root; they stay out of sync."""
        for other in self.vcpus:
            if other is v:
                continue
            for idx, frame in enumerate(other.oos):
                if frame is None or self._safe_not_to_sync(v, frame):
                    continue
                self.counters["shadow_resync_only"] += 1
                self._resync_l1(frame, other.oos_snap[idx])

    def _resync_vcpu(self, v: VCpu) -> None:
        for f in v.oos_frames():
            self._resync(f)

    def _resync_all(self) -> None:
        """shadow_resync_all: every vCPU's OOS pages."""
        if self.oos_where:
            for f in list(self.oos_where):
                self._resync(f)
