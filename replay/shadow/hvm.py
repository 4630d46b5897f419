"""Xen's ``shadow/hvm.c``: emulated writes to shadowed page tables.

sh_emulate_map_dest (unaligned and page-crossing stores unshadow),
sh_emulate_unmap_dest (one early-unshadow check and skip-verify per
store), check_for_early_unshadow and validate_guest_pt_write; the
validation itself is multi.c's (:meth:`Multi._validate`).
"""

from __future__ import annotations

from ..guest.memory import PAGE_SHIFT, PTE_P
from .state import EngineState
from .types import L2, L4, VCpu


class Emulate(EngineState):
    """hvm.c: the emulated page-table write, one TABLE_WRITE at a time."""

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
        self._emulate(v, frame, pa, val, va, old)
        if v.emul_arm == frame and frame in self.pt_types:
            # sh_page_fault, after x86_emulate of a slow-path write: fast
            # emulation is armed if the frame is still a page table, so a
            # shadow freed by this write (shadow_free clears the flag) does
            # not leave it off
            v.last_write_emul_ok = True

    def _emulate(self, v: VCpu, frame: int, pa: int, val: int, va: int,
                 old: int | None) -> None:
        """The emulated store's entry ``pa``: sh_emulate_map_dest, the write,
        sh_emulate_unmap_dest."""
        c = self.counters
        # The store this entry belongs to: TABLE_WRITEs carry the store's va;
        # the first entry touched is the one holding the store's address.
        store = v.last_store
        first = (pa & 0xFF8) == (va & 0xFF8)
        off = va & 7 if first else 0
        size = 8
        known = store is not None and store[0] == va
        nbytes = store[1] if store is not None and known else 8
        if known:
            size = min(nbytes, 8 - off) if first else 8
            # sh_emulate_map_dest: an unaligned store (vaddr & (bytes - 1)),
            # and the second page of a page-crossing one, "probably isn't a
            # pagetable": sh_remove_shadows (slow), before the write.
            if va & (nbytes - 1):
                c["shadow_unshadow_unaligned"] += 1
                self._remove_all_shadows(frame, "unaligned")
                if frame not in self.pt_types:
                    return
        cfg = self.config
        # sh_emulate_unmap_dest runs once per emulated store: the early-
        # unshadow check and skip-verify look at the store's first entry
        # (later entries of a 16-byte store get neither).
        once = first or not known
        written = (val >> (8 * off)) & ((1 << (8 * size)) - 1)
        # Early unshadow (check_for_early_unshadow): an aligned zero write.
        if not once:
            pass
        elif size >= 4 and written & 0xFFFF_FFFF == 0:
            if off == 0 and cfg.early_unshadow:
                if self._early_unshadow_due(v, frame):
                    c["shadow_early_unshadow"] += 1
                    self._remove_shadows_fast(frame, "early-unshadow")
                v.last_emulated_mfn_for_unshadow = frame
        else:
            v.last_emulated_mfn_for_unshadow = None
        if frame not in self.pt_types:
            return
        # skip-verify: no larger than a PTE, aligned, P clear before and after
        if (cfg.skip_verify and once and nbytes <= 8 and old is not None and off == 0
                and not old & PTE_P and not val & PTE_P):
            c["shadow_validate_skip"] += 1
            return
        self._validate(frame, (pa >> 3) & 0x1FF, val, "validate")

    def _early_unshadow_due(self, v: VCpu, frame: int) -> bool:
        """shadow/hvm.c check_for_early_unshadow, for an aligned zero write
        to a shadowed frame: a guest that has never used
        HVMOP_pagetable_dying gets the two-write heuristic (the same frame
        as the last such write); one that has is trusted instead: unshadow
        while this vCPU's ``pagetable_dying`` is set, but never a frame
        with an L2 or L4 shadow (``SHF_L2_* | SHF_L4_64``)."""
        if not (v.pagetable_dying
                or (not self.dying_op and v.last_emulated_mfn_for_unshadow == frame)):
            return False
        return not (self.dying_op and self.pt_types.get(frame, set()) & {L2, L4})
