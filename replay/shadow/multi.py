"""Xen's ``multi.c``: the shadow fault and everything it propagates.

sh_page_fault (:meth:`Multi._fault`, with the fast paths and the
emulated-write outcomes), shadow_get_and_create_l1e, sh_prefetch, emulated
table writes and sh_validate_guest_entry (validate_gl1e .. validate_gl4e),
_sh_propagate, and shadow_set_l1e / shadow_set_l4e..l2e (reference counts
and parent links).
"""

from __future__ import annotations

from typing import Final

from ..guest.memory import (
    ADDR_MASK,
    PAGE_SHIFT,
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PCD,
    PTE_PS,
    PTE_PWT,
    PTE_RW,
    PTE_US,
    Access,
    Walk,
    WalkStatus,
    cr3_root,
)
from .config import VTLB_ENTRIES
from .state import EngineState
from .types import (
    FL1,
    L1,
    L2,
    L3,
    L4,
    SH_A,
    SH_ADDR,
    SH_D,
    SH_FL1,
    SH_GNP,
    SH_MAGIC,
    SH_MMIO,
    SH_P,
    SH_RW,
    SH_US,
    Fetch,
    Hazard,
    Key,
    Shadow,
    ShadowType,
    VCpu,
)

#: Flags copied from a present guest entry (plus NX).
_PASS_THRU: Final = PTE_A | PTE_US | PTE_RW | PTE_P | PTE_NX
#: The rights of a made-up FL1 guest entry (guest_walk.c, PSE l2e).
_FULL_RIGHTS: Final = PTE_P | PTE_US | PTE_RW | PTE_A | PTE_D
#: A 2 MiB entry's PAT bit (12), and where it sits in a 4 KiB entry (7).
_PSE_PAT: Final = 1 << 12
_PTE_PAT: Final = 1 << 7


class Multi(EngineState):
    """multi.c: the fault path, propagation, validation and entry setting."""

    # -- the shadow fault (sh_page_fault) ---------------------------------
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
        v.emul_arm = None
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
            # sh_page_fault, before emulating: a write to a top-level table
            # the guest said is dying, that no vCPU has loaded, unshadows it
            # (sh_remove_shadows, fast); the write is emulated all the same.
            if gfn in self.dying_frames and not any(
                    w.xen_cr3 is not None and cr3_root(w.xen_cr3) == gfn
                    for w in self.vcpus):
                c["shadow_unshadow_dying"] += 1
                self._remove_shadows_fast(gfn, "pagetable-dying")
            # Armed only if the frame is still a page table after the write.
            if cfg.fast_emulation and gfn in self.pt_types:
                v.last_emulated_frame = va >> PAGE_SHIFT
                v.last_emulated_mfn = gfn
                v.last_write_emul_ok = True
                v.emul_arm = gfn  # re-armed after the write (hvm.py)
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
                # keyed by guest_l2e_get_gfn: the PSE-PAT bit (12) stays in,
                # so two PAT variants of one 2 MiB frame are two FL1 shadows
                base = (gl2e & SH_ADDR) >> PAGE_SHIFT
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
        """The 4 KiB guest "l1e" of ``va`` inside a 2 MiB superpage, as
        guest_walk.c makes one up for a PSE l2e: full rights (P, US, RW, A,
        D; the l2e's own rights are enforced in the shadow l2e) plus its
        cache bits (PWT, PCD; PAT in bit 7 when the PSE-PAT bit 12 is set)."""
        base, flags = Multi._splinter_parts(gl2e)
        return base + (((va >> PAGE_SHIFT) & 0x1FF) << PAGE_SHIFT) | flags

    @staticmethod
    def _splinter_parts(gl2e: int) -> tuple[int, int]:
        """:meth:`_splinter`'s superpage base and flags: the l1e of 4 KiB
        page ``i`` of the superpage is ``base + (i << PAGE_SHIFT) | flags``."""
        base = (gl2e & ADDR_MASK) & ~0x1F_FFFF
        flags = _FULL_RIGHTS | gl2e & (PTE_PWT | PTE_PCD)
        if gl2e & _PSE_PAT:
            flags |= _PTE_PAT
        return base, flags

    def _prefetch(self, gw: Walk, sl1: Shadow, i1: int, va: int) -> None:
        """Xen's sh_prefetch: fill following empty entries of the L1 shadow."""
        dist = min(self.config.prefetch_distance, 512 - i1)
        entries = sl1.entries
        real = gw.level == 1
        l1f = gw.frames[3] if real else -1
        guest = self.guest.entries(l1f) if real else None
        # a superpage's made-up l1es (_splinter of each page of it)
        base, flags = self._splinter_parts(gw.entries[2])
        propagate, snap_update = self._propagate, self._oos_snap_update
        prefetch = Fetch.PREFETCH
        # shadow_set_l1e (_set_l1e) on an empty entry, inline: no old
        # mapping to drop, nothing to log; an empty new one changes nothing
        key, may_write, rw_maps = sl1.key, self.oos_may_write, self.rw_maps
        facts, frame, stype = self._props_on, sl1.frame, int(sl1.type)
        n = 0
        for i in range(i1 + 1, i1 + dist):
            if entries[i] != 0:
                break
            if guest is not None:
                g = guest[i]
                if g & PTE_P and (not g & PTE_A or (g & PTE_RW and not g & PTE_D)):
                    break
            else:
                g = base + (i << PAGE_SHIFT) | flags
            target = (g & ADDR_MASK) >> PAGE_SHIFT if g & PTE_P else -1
            new = propagate(g, 1, target, prefetch)
            if new:
                if new & (SH_P | SH_RW) == SH_P | SH_RW:
                    mapped = (new & SH_ADDR) >> PAGE_SHIFT
                    if mapped in may_write:
                        self._oos_fixup_add(mapped, key, i)
                    maps = rw_maps.get(mapped)
                    if maps is None:
                        rw_maps[mapped] = {(key, i)}
                    else:
                        maps.add((key, i))
                entries[i] = new
                if facts:
                    self._fact("propagated", frame, stype, i, new, g, "prefetch")
                n += 1
            if real:
                snap_update(l1f, i, g)
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

    # -- HVMOP_pagetable_dying (Xen-aware guests) -------------------------
    def _boot_probe(self) -> None:
        """What a Xen-aware Linux's boot probe leaves behind: xen_hvm_init_mmu_ops
        calls HVMOP_pagetable_dying with gpa 0 on the boot vCPU, so
        sh_pagetable_dying finds no shadow there but sets the domain's
        ``pagetable_dying_op`` and vCPU 0's ``pagetable_dying``."""
        self.dying_op = True
        self.vcpus[0].pagetable_dying = True

    def pagetable_dying(self, index: int, vcpu: int, pa: int) -> None:
        """sh_pagetable_dying (multi.c, 4-level): the guest says the page
        tables rooted at ``pa`` are dying (Linux: xen_hvm_exit_mmap at the
        start of exit_mmap). If that root has an L4 shadow, the frame is
        marked dying and the shadow's user entries (shadow L4e with
        _PAGE_USER) are unhooked (shadow_unhook_mappings, user only); the
        domain and this vCPU then count as users of the call."""
        self._event, self._vcpu = index, vcpu
        self.counters["pagetable_dying"] += 1
        gfn = pa >> PAGE_SHIFT
        sh = self.shadows.get((gfn, L4))
        if sh is not None:
            self.dying_frames.add(gfn)
            for i, e in enumerate(sh.entries):
                if e & SH_P and e & SH_US:
                    self._set_upper(sh, i, 0, 0, "pagetable-dying")
        self.dying_op = True
        self._v(vcpu).pagetable_dying = True

    def _validate(self, frame: int, i: int, g: int, reason: str) -> None:
        """Xen's sh_validate_guest_entry for one entry: L1, L2, L3, L4.

        validate_gl4e/gl3e/gl2e: a present entry (not a 2 MiB one) whose
        target gfn is not RAM sets SHADOW_SET_ERROR, and
        validate_guest_pt_write then removes the frame's shadows ("probably
        not a pagetable any more")."""
        c = self.counters
        error = False
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
                    child = (cf, FL1)  # the PAT bit kept, as above
                elif t == L2:
                    child = (cf, L1)
                elif not g & PTE_PS:
                    child = (cf, ShadowType(t - 1))
                if not (t == L2 and g & PTE_PS) and self._is_mmio(cf):
                    error = True
                if child is not None and child not in self.shadows:
                    child = None
                if child is not None and t >= L3 and self.config.out_of_sync:
                    self._resync_all()
            new = self._propagate(g, int(t), child[0] if child else -1, Fetch.PREFETCH,
                                  fl1=child is not None and child[1] == FL1)
            if (frame, t) in self.shadows:
                self._set_upper(sh, i, new, g, reason)
        if error:
            c["shadow_unshadow_set_error"] += 1
            self._remove_all_shadows(frame, "set-error")

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

    def _set_l1e(self, sh: Shadow, i: int, new: int, g: int, reason: str) -> None:
        """shadow_set_l1e: a writable mapping of a may-write out-of-sync
        frame goes into its fixup table first (even if unchanged)."""
        if (new & (SH_P | SH_RW) == SH_P | SH_RW
                and (new & SH_ADDR) >> PAGE_SHIFT in self.oos_may_write):
            self._oos_fixup_add((new & SH_ADDR) >> PAGE_SHIFT, sh.key, i)
        old = sh.entries[i]
        if old == new:
            return
        key = sh.key
        if old & (SH_P | SH_RW) == SH_P | SH_RW:
            s = self.rw_maps.get((old & SH_ADDR) >> PAGE_SHIFT)
            if s is not None:
                s.discard((key, i))
        if new & (SH_P | SH_RW) == SH_P | SH_RW:
            mapped = (new & SH_ADDR) >> PAGE_SHIFT
            maps = self.rw_maps.get(mapped)
            if maps is None:
                self.rw_maps[mapped] = {(key, i)}
            else:
                maps.add((key, i))
        if old & SH_P:
            self._leaf_changed(key, i)
        sh.entries[i] = new
        if self._props_on:
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
            if child not in self.up and self._has_up_pointer(child[1]):
                self.up[child] = (key, i)  # sh_get_ref: the first parent entry
            if level == 4 and self.l3_pinning:
                self._pin(child)
            if (level == 2 and child[1] == L1 and self.config.out_of_sync
                    and child[0] in self.oos_where):
                self._resync(child[0])
        if old & SH_P:
            self._leaf_changed(key, i)
        sh.entries[i] = new
        if self._props_on:
            self._fact("propagated", sh.frame, level, i, new, g, reason)
        if old & SH_P:
            ochild = self._child_key(old, level)
            ps = self.parents.get(ochild)
            if ps is not None:
                ps.discard((key, i))
            if self.up.get(ochild) == (key, i):
                del self.up[ochild]  # sh_put_ref: that entry no longer links it
            self._put_ref(ochild, "refcount")
