"""Xen's ``common.c``: the life cycle of shadows and the pool.

Making a shadow (shadow_promote on the way), dropping references and
destroying (sh_destroy_shadow), sh_pin / sh_unpin (private.h), sh_remove_shadows,
sh_remove_write_access and _shadow_prealloc (unpin, then unhook the
current roots).
"""

from __future__ import annotations

from ..guest.memory import PAGE_SHIFT
from .state import EngineState
from .types import _TYPE_NAME, FL1, L1, L2, L3, L4, SH_ADDR, SH_P, SH_RW, Key, Shadow, ShadowType


class Common(EngineState):
    """common.c: make, destroy, pin and unpin shadows; the pool; write access."""

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
            if frame not in self.pt_types:
                # shadow_promote: a frame that becomes a page table anew is
                # not dying (page->pagetable_dying = false).
                self.dying_frames.discard(frame)
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
        self._leaf_changed(key, -1)
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
        self.up.pop(key, None)
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
                if self.up.get(child) == (key, i):
                    del self.up[child]
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

    def _has_up_pointer(self, stype: ShadowType) -> bool:
        """sh_type_has_up_pointer (private.h): every 64-bit type that is not
        pinnable (an L4 always is; an L3 while LINUX_L3_TOPLEVEL is on)."""
        return stype != L4 and not (stype == L3 and self.l3_pinning)

    def _remove_shadows_fast(self, frame: int, reason: str) -> None:
        """sh_remove_shadows with fast = 1 (check_for_early_unshadow, the
        dying-root rule of sh_page_fault): DO_UNSHADOW for L4, L3, L2, L1
        unpins a pinnable shadow, or else clears the one parent entry its
        up-pointer names (sh_remove_shadow_via_pointer); the brute-force
        search of the other parents runs only when not fast."""
        for t in (L4, L3, L2, L1):
            key = (frame, t)
            if key not in self.shadows:
                continue
            if not self._has_up_pointer(t):
                self._unpin(key, reason)
                continue
            up = self.up.get(key)
            if up is not None:
                psh = self.shadows.get(up[0])
                if psh is not None:
                    self._set_upper(psh, up[1], 0, 0, reason)

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
                if self._props_on:
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
