"""The shadow engine on hand-built event lists: SHADOW-SEMANTICS section 8.

Every scenario builds guest tables with :class:`GuestTables`, feeds them as
SNAPSHOT events, then CR3 writes, accesses and table writes, and checks the
exact shadow set, refcounts and counters. Each expected number says why.
"""

from __future__ import annotations

from typing import Any

import pytest

from replay.errors import UsageError
from replay.guest.memory import PTE_A, PTE_D, PTE_P, PTE_RW, PTE_US, va_index
from replay.shadow.config import EngineConfig
from replay.shadow.engine import ShadowEngine
from replay.shadow.types import FL1, L1, L2, L3, L4, SH_GNP, SH_P, SH_RW
from replay.trace import format as fmt

from .test_guest import DATA, GuestTables, dm

K = fmt.Kind
#: A user address: L4 0, L3 0, L2 2, L1 0.
U = 0x40_0000
#: A kernel text address: L4 511, L3 510, L2 0, L1 0.
KTEXT = 0xFFFF_FFFF_8000_0000
#: Kernel data mapping flags (no U/S), accessed and dirty.
KDATA = PTE_P | PTE_RW | PTE_A | PTE_D


class Driver:
    """Feeds events to an engine with consecutive event indexes."""

    def __init__(self, **cfg: Any) -> None:
        self.e = ShadowEngine(EngineConfig.from_dict(cfg))
        self.i = 0

    def ev(self, kind: int, vcpu: int = 0, *, info: int = 0, va: int = 0, pa: int = 0,
           val: int = 0, page: bytes | None = None) -> None:
        self.e.process(kind, self.i, vcpu, info, va, pa, 0, val, page)
        self.i += 1

    def load(self, t: GuestTables) -> None:
        for frame, page in t.pages():
            self.ev(K.SNAPSHOT, pa=frame << 12, page=page)

    def cr3(self, root: int, vcpu: int = 0) -> None:
        self.ev(K.CR3_WRITE, vcpu, val=root << 12)

    def access(self, kind: int, va: int, vcpu: int = 0, user: bool = False,
               size: int = 8) -> None:
        self.ev(kind, vcpu, info=size | (fmt.INFO_USER if user else 0), va=va)

    def read(self, va: int, **kw: Any) -> None:
        self.access(K.READ, va, **kw)

    def write(self, va: int, **kw: Any) -> None:
        self.access(K.WRITE, va, **kw)

    def store(self, t: GuestTables, frame: int, index: int, value: int, *,
              user: bool = False) -> None:
        """The guest stores an entry through the direct map: WRITE, then the
        TABLE_WRITE the plugin emits after it."""
        va = dm(frame) + 8 * index
        self.write(va, user=user)
        t.set(frame, index, value)
        self.ev(K.TABLE_WRITE, va=va, pa=(frame << 12) + 8 * index, val=value)

    @property
    def c(self) -> dict[str, int]:
        return self.e.counters


def user_layout(t: GuestTables, root: int, n: int = 64) -> tuple[int, int, int]:
    """U..U+n pages: entry 0 readable+writable, accessed, not dirty; the
    others read-only and accessed (so prefetch does not stop on them)."""
    l3 = l2 = l1 = 0
    for k in range(n):
        flags = PTE_P | PTE_RW | PTE_US | PTE_A if k == 0 else PTE_P | PTE_US | PTE_A
        l3, l2, l1 = t.map(root, U + (k << 12), 0x1000 + k, flags)
    return l3, l2, l1


# --------------------------------------------------------------------------
# Scenario 1: CR3 to a new root
# --------------------------------------------------------------------------
def test_s1_cr3_new_root_empty_l4_refcount_2() -> None:
    t = GuestTables()
    root = t.new()
    user_layout(t, root)
    d = Driver()
    d.load(t)
    d.cr3(root)
    assert d.e.keys() == {(root, L4)}  # nothing below the root yet
    sh = d.e.shadows[(root, L4)]
    assert sh.refcount == 2  # one for the pin, one for vCPU 0's slot
    assert sh.pinned
    assert not any(sh.entries)  # a new L4 shadow starts empty
    assert d.c["cr3_write_intercepted"] == 1
    assert d.c["shadow_created_l4"] == 1
    assert d.e.is_page_table(root)  # the root is write-protected now


def test_s1_same_cr3_again_keeps_refcount() -> None:
    t = GuestTables()
    root = t.new()
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.cr3(root)  # intercepted again, same value
    assert d.c["cr3_write_intercepted"] == 2  # every mov cr3 is intercepted
    assert d.c["shadow_created_l4"] == 1  # the shadow is looked up, not rebuilt
    assert d.e.shadows[(root, L4)].refcount == 2  # +1 new slot ref, -1 old


# --------------------------------------------------------------------------
# Scenarios 2 and 3: first read, then a write
# --------------------------------------------------------------------------
def _s2() -> tuple[Driver, GuestTables, int, int, int, int]:
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = user_layout(t, root)
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    return d, t, root, l3, l2, l1


def test_s2_first_read_builds_path_and_prefetches() -> None:
    d, t, root, l3, l2, l1 = _s2()
    e = d.e
    assert e.keys() == {(root, L4), (l3, L3), (l2, L2), (l1, L1)}
    assert d.c["shadow_fault"] == 1  # one fault for the first read
    assert d.c["shadow_fault_fixed"] == 1
    assert e.shadows[(root, L4)].refcount == 2  # pin + slot
    assert e.shadows[(l3, L3)].refcount == 2  # one L4 entry + the L3 pin (L3 toplevel)
    assert e.shadows[(l2, L2)].refcount == 1  # one L3 entry
    assert e.shadows[(l1, L1)].refcount == 1  # one L2 entry
    sl1 = e.shadows[(l1, L1)].entries
    assert sl1[0] & SH_P and not sl1[0] & SH_RW  # guest D=0: read-only
    assert sl1[0] >> 12 == 0x1000
    # entries 1..31 prefetched: 32 = PREFETCH_DISTANCE counts the faulting one
    assert all(sl1[i] & SH_P for i in range(1, 32))
    assert sl1[32] == 0
    assert d.c["shadow_prefetch"] == 31
    # the guest saw A set on every level (already set) and no D on the leaf
    assert not t.get(l1, 0) & PTE_D
    guest_leaf = e.guest.read(l1, 0)
    assert guest_leaf is not None and not guest_leaf & PTE_D


def test_s3_then_write_sets_d_and_only_that_entry_rw() -> None:
    d, t, root, l3, l2, l1 = _s2()
    before = list(d.e.shadows[(l1, L1)].entries)
    d.write(U, user=True)
    assert d.c["shadow_fault"] == 2  # one more fault: the entry was read-only
    assert d.c["shadow_fault_fixed"] == 2
    guest_leaf = d.e.guest.read(l1, 0)
    assert guest_leaf is not None and guest_leaf & PTE_D  # the walk set D
    after = d.e.shadows[(l1, L1)].entries
    assert after[0] & SH_RW  # now writable
    assert after[1:] == before[1:]  # no other entry changed
    assert d.c["shadow_prefetch"] == 31  # entry 1 is non-zero: prefetch stops at once
    d.write(U, user=True)
    assert d.c["shadow_fault"] == 2  # the shadows allow it now: nothing happens


# --------------------------------------------------------------------------
# Scenario 4: 2 MiB superpage -> FL1 keyed by the base frame
# --------------------------------------------------------------------------
def test_s4_superpage_fl1_shared_by_two_mappings() -> None:
    t = GuestTables()
    root = t.new()
    base = 0x10000  # 2 MiB aligned frame (0x10000 % 512 == 0), inside RAM
    va1, va2 = 0x4000_0000, 0x4020_0000  # L2 entries 0 and 1 of one L2
    l3, l2 = t.map(root, va1, base, DATA, size="2m")
    t.map(root, va2, base, DATA, size="2m")
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(va1 + 0x5000, user=True)  # entry 5 of the superpage
    assert d.e.keys() == {(root, L4), (l3, L3), (l2, L2), (base, FL1)}
    fl1 = d.e.shadows[(base, FL1)]
    assert fl1.entries[5] >> 12 == base + 5  # synthetic entries: base + i
    assert all(fl1.entries[i] & SH_P for i in range(6, 37))  # 31 prefetched
    assert fl1.entries[37] == 0
    assert d.c["shadow_prefetch"] == 31
    d.read(va2 + 0x7000, user=True)  # the same superpage through L2 entry 1
    assert d.c["shadow_created_fl1"] == 1  # reused, not rebuilt
    assert fl1.refcount == 2  # two L2 entries point at it
    assert not d.e.is_page_table(base)  # an FL1 does not write-protect anything


# --------------------------------------------------------------------------
# Scenario 5: two roots share kernel L3s
# --------------------------------------------------------------------------
def test_s5_second_root_links_only_the_l4_entry() -> None:
    t = GuestTables()
    r1, r2 = t.new(), t.new()
    k3, k2, k1 = t.map(r1, KTEXT, 0x3000, KDATA)
    t.set(r2, 511, t.get(r1, 511))  # r2 shares r1's kernel half
    d = Driver()
    d.load(t)
    d.cr3(r1)
    d.read(KTEXT)
    d.cr3(r2)
    created = d.c["shadow_created"]
    n_facts = len(d.e.facts)
    d.read(KTEXT)
    assert d.c["shadow_created"] == created  # no new shadow: L3/L2/L1 shared
    new = [f for f in d.e.facts[n_facts:] if f.kind == "propagated"]
    assert [(f.frame, f.type, f.entry) for f in new] == [(r2, 4, 511)]  # only the L4e
    assert d.e.shadows[(k3, L3)].refcount == 3  # two L4 entries + the L3 pin
    assert d.e.shadows[(k2, L2)].refcount == 1  # still one L3 entry (shared L3)
    assert d.e.shadows[(k1, L1)].refcount == 1
    assert d.e.shadows[(r1, L4)].refcount == 1  # only the pin: vCPU 0 left it
    assert d.c["shadow_fault"] == 2 and d.c["shadow_fault_fixed"] == 2


# --------------------------------------------------------------------------
# Scenario 6: two L2s point at one L1
# --------------------------------------------------------------------------
def test_s6_one_l1_shadow_refcount_2() -> None:
    t = GuestTables()
    root = t.new()
    l3, l2a, l1 = t.map(root, U, 0x1000, DATA)
    vb = U + (1 << 30)  # L3 entry 1, L2 entry 2: a second L2
    l2b = t.table_for(l3, va_index(vb, 3))
    t.set(l2b, va_index(vb, 2), t.get(l2a, va_index(U, 2)))
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    d.read(vb, user=True)
    assert d.e.keys(L2) == {(l2a, L2), (l2b, L2)}
    assert d.e.keys(L1) == {(l1, L1)}  # one shadow for the one guest L1
    assert d.e.shadows[(l1, L1)].refcount == 2  # two L2 entries reference it
    # each L2 shadow: one L3 entry (shadow_set_l3e takes one sh_get_ref)
    assert d.e.shadows[(l2a, L2)].refcount == 1
    assert d.e.shadows[(l2b, L2)].refcount == 1
    # one L4 entry + the LINUX_L3_TOPLEVEL pin (shadow_set_l4e pins L3s)
    assert d.e.shadows[(l3, L3)].refcount == 2


# --------------------------------------------------------------------------
# Scenario 7: store to a shadowed L1 frame
# --------------------------------------------------------------------------
def _s7(**cfg: Any) -> tuple[Driver, GuestTables, int, int]:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, dm(l1), l1, KDATA)  # the kernel's direct map of that L1
    d = Driver(**cfg)
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    return d, t, root, l1


NEW_LEAF = (0x2222 << 12) | DATA
#: _sh_propagate of NEW_LEAF: P, RW, U/S, A copied; D never copied.
NEW_SHADOW = (0x2222 << 12) | PTE_P | PTE_RW | PTE_US | PTE_A


def test_s7_store_emulated_and_revalidated_without_oos() -> None:
    d, t, root, l1 = _s7(out_of_sync=False)
    d.store(t, l1, 0, NEW_LEAF)
    assert d.c["shadow_fault"] == 2  # the read of U, then the store
    assert d.c["shadow_fault_emulate_write"] == 1  # the store hit a page table
    assert d.c["shadow_fault_fixed"] == 1  # only the read was "fixed"
    assert d.c["shadow_emulate"] == 1  # one TABLE_WRITE emulated
    assert d.c["shadow_validate_gl1e_calls"] == 1
    assert d.e.shadows[(l1, L1)].entries[0] == NEW_SHADOW
    # a second store to the same page takes the fast emulation path
    d.store(t, l1, 1, NEW_LEAF)
    assert d.c["shadow_fault"] == 3
    assert d.c["shadow_fault_fast_emulate"] == 1


def test_s7_store_with_oos_unsyncs_then_resyncs_at_cr3() -> None:
    d, t, root, l1 = _s7()
    old = d.e.shadows[(l1, L1)].entries[0]
    d.store(t, l1, 0, NEW_LEAF)
    assert d.c["shadow_unsync"] == 1  # the write fault unsynced the L1 frame
    assert d.e.is_out_of_sync(l1)
    assert d.c["shadow_fault_emulate_write"] == 0  # not emulated: writable now
    assert d.c["shadow_fault_fixed"] == 2  # the read and the store
    assert d.c["shadow_oos_stale_write"] == 1
    assert d.e.shadows[(l1, L1)].entries[0] == old  # the shadow is stale
    d.store(t, l1, 1, NEW_LEAF)  # later stores do not trap at all
    assert d.c["shadow_fault"] == 2
    assert d.e.shadows[(l1, L1)].entries[1] == 0  # prefetch left it empty (not present)
    d.cr3(root)  # the next CR3 write resyncs this vCPU's OOS pages
    assert d.c["shadow_resync"] == 1
    assert not d.e.is_out_of_sync(l1)
    assert d.e.shadows[(l1, L1)].entries[0] == NEW_SHADOW
    # sh_resync_l1 visits only present shadow entries: entry 1 changed too,
    # but its shadow entry was empty, so it is built at its first fault
    assert d.e.shadows[(l1, L1)].entries[1] == 0
    resync = [f for f in d.e.facts if f.reason == "resync" and f.kind == "propagated"]
    assert [f.entry for f in resync] == [0]
    d.read(U + 0x1000, user=True)
    assert d.c["shadow_fault"] == 3  # the demand fault that Xen takes here
    assert d.e.shadows[(l1, L1)].entries[1] == NEW_SHADOW
    # the writable direct-map mapping of the frame is read-only again
    path = d.e.shadow_path(0, dm(l1))
    assert path[-1][2] & SH_P and not path[-1][2] & SH_RW


def test_s7_invlpg_clears_oos_entry_only() -> None:
    d, t, root, l1 = _s7()
    d.store(t, l1, 0, NEW_LEAF)
    assert d.e.shadows[(l1, L1)].entries[0] != 0
    d.ev(K.INVLPG, va=U)
    assert d.e.shadows[(l1, L1)].entries[0] == 0  # cleared: the next access refaults
    assert d.e.is_out_of_sync(l1)  # INVLPG does not resync
    d.read(U, user=True)
    # the demand fault propagates the guest's new entry (writable: D is set)
    assert d.e.shadows[(l1, L1)].entries[0] == NEW_SHADOW


# --------------------------------------------------------------------------
# Scenario 8: linking a child that has no shadow yet
# --------------------------------------------------------------------------
def test_s8_store_into_l2_leaves_entry_empty_until_fault() -> None:
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, dm(l2), l2, KDATA)
    new_l1 = t.new()
    t.set(new_l1, 0, (0x3333 << 12) | DATA)
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    d.store(t, l2, 7, (new_l1 << 12) | PTE_P | PTE_RW | PTE_US | PTE_A)
    assert d.c["shadow_validate_gl2e_calls"] == 1
    assert d.e.shadows[(l2, L2)].entries[7] == 0  # no shadow of new_l1: stays empty
    assert (new_l1, L1) not in d.e.shadows
    d.read(7 << 21, user=True)  # L2 entry 7, L1 entry 0
    assert (new_l1, L1) in d.e.shadows  # the fault built it
    assert d.e.shadows[(l2, L2)].entries[7] & SH_P


# --------------------------------------------------------------------------
# Scenario 9: access through a not-present guest entry
# --------------------------------------------------------------------------
def test_s9_not_present_guest_entry_builds_nothing() -> None:
    t = GuestTables()
    root = t.new()
    t.map(root, U, 0x1000, DATA)
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(U + (1 << 30), user=True)  # L3 entry 1 is not present
    assert d.e.keys() == {(root, L4)}  # no shadow at any level below
    assert not any(d.e.shadows[(root, L4)].entries)
    assert d.c["shadow_fault"] == 1
    assert d.c["shadow_fault_bail_real_fault"] == 1  # the guest gets the #PF
    assert d.c["shadow_fault_fixed"] == 0


def test_s9_not_present_l1e_without_oos_is_magic_and_fast() -> None:
    t = GuestTables()
    root = t.new()
    t.map(root, U, 0x1000, DATA)
    d = Driver(out_of_sync=False)
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    sl1 = next(s for k, s in d.e.shadows.items() if k[1] == L1)
    assert sl1.entries[1] == SH_GNP  # prefetch wrote "guest not present"
    d.read(U + 0x1000, user=True)
    assert d.c["shadow_fault_fast_gnp"] == 1  # answered without a walk


# --------------------------------------------------------------------------
# Scenario 10: pool full
# --------------------------------------------------------------------------
def test_s10_pool_frees_least_recently_pinned_root_not_in_cr3() -> None:
    t = GuestTables()
    ra, rb, rc = t.new(), t.new(), t.new()
    for r in (ra, rb, rc):
        t.map(r, U, 0x1000, DATA)
    # 7 pages: A's L4 (1) + B's four + C's L4 (1) = 6, leaving 1 free
    d = Driver(vcpus=2, pool_pages=7, out_of_sync=False, linux_l3_toplevel=False)
    d.load(t)
    d.cr3(ra, vcpu=1)  # A stays in vCPU 1's CR3
    d.cr3(rb, vcpu=0)
    d.read(U, user=True)  # B: L4 + L3 + L2 + L1
    d.cr3(rc, vcpu=0)  # B is now only pinned
    assert d.e.pool_free == 1
    d.read(U, user=True)  # needs 3: unpin A (kept, in CR3), then B (freed)
    assert (ra, L4) in d.e.shadows  # in vCPU 1's CR3: unpinned but alive
    assert not d.e.shadows[(ra, L4)].pinned
    assert d.e.shadows[(ra, L4)].refcount == 1  # the slot only
    assert (rb, L4) not in d.e.shadows  # least recently pinned not in a CR3
    assert d.c["shadow_evicted"] == 4  # B's L4, L3, L2, L1
    assert d.c["shadow_prealloc_1"] == 1
    assert len(d.e.keys()) == 1 + 4  # A's L4 + C's full path
    assert d.e.pool_free == 2


# --------------------------------------------------------------------------
# Section 5 and 6 details
# --------------------------------------------------------------------------
def test_user_write_to_page_table_unshadows_it() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    # the guest (wrongly) maps its L1 table writable to user space
    t.map(root, U + (8 << 21), l1, DATA)
    d = Driver(out_of_sync=False)
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    assert (l1, L1) in d.e.shadows
    d.write(U + (8 << 21), user=True)
    # multi.c sh_page_fault: a demand write to a page-table frame counts
    # shadow_fault_emulate_write and goes to the emulate path, which refuses
    # user-mode writes (shadow_fault_emulate_failed) and calls
    # shadow_remove_all_shadows on the frame: one of each
    assert d.c["shadow_fault_emulate_write"] == 1
    assert d.c["shadow_fault_emulate_failed"] == 1
    assert (l1, L1) not in d.e.shadows  # user write to a PT: unshadowed


def test_skip_verify_and_early_unshadow() -> None:
    # the two-write heuristic of a guest that never used HVMOP_pagetable_dying
    # (a Xen-aware guest: tests/test_engine_xen_aware.py)
    d, t, root, l1 = _s7(out_of_sync=False, guest_kind="unaware")
    d.store(t, l1, 5, 0)  # entry 5 was 0: P clear before and after
    assert d.c["shadow_validate_skip"] == 1
    assert d.c["shadow_early_unshadow"] == 0  # first zero write only arms it
    d.store(t, l1, 6, 0)  # second aligned zero write to the same frame
    assert d.c["shadow_early_unshadow"] == 1
    assert (l1, L1) not in d.e.shadows


def test_early_unshadow_off() -> None:
    d, t, root, l1 = _s7(out_of_sync=False, early_unshadow=False)
    d.store(t, l1, 5, 0)
    d.store(t, l1, 6, 0)
    assert d.c["shadow_early_unshadow"] == 0
    assert (l1, L1) in d.e.shadows


def test_l3_pinning_stops_after_more_than_2x_vcpus_l4s() -> None:
    t = GuestTables()
    roots = [t.new() for _ in range(4)]
    for r in roots:
        t.map(r, U, 0x1000, DATA)
    d = Driver(vcpus=1)
    d.load(t)
    for r in roots[:3]:
        d.cr3(r)
        d.read(U, user=True)
    assert d.e.l3_pinning
    assert len(d.e.keys(L3)) == 3  # pinned: kept although only one root is loaded
    # multi.c sh_make_shadow counts the pinned L4s *before* the new one is
    # made: 3 > 2 * max_vcpus (1), so the 4th L4 unpins every L3 and clears
    # SHOPT_LINUX_L3_TOPLEVEL (set for every domain in common.c
    # shadow_domain_init); with only 3 roots it would not have fired
    d.cr3(roots[3])
    assert not d.e.l3_pinning
    assert d.c["shadow_unpin_l3_toplevel"] == 3
    # unpinned L3s live on through their L4 entries (the L4s are pinned)
    assert all(d.e.shadows[k].refcount == 1 for k in d.e.keys(L3))


def test_cr3_write_flushes_vtlb_and_fast_emulation() -> None:
    d, t, root, l1 = _s7(out_of_sync=False)
    v = d.e.vcpus[0]
    assert v.vtlb_live() == 1  # the fault on U cached its translation
    d.store(t, l1, 0, NEW_LEAF)
    assert v.last_write_emul_ok
    d.cr3(root)
    assert v.vtlb_live() == 0
    assert not v.last_write_emul_ok


def test_cr3_target_list_records_hazards() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, dm(l1), l1, KDATA)
    other = t.new()  # the secure root: listed, never shadowed
    d2 = Driver(cr3_targets=[other << 12 | 0x3])
    d2.load(t)
    d2.cr3(root)
    d2.read(U, user=True)
    d2.store(t, l1, 0, NEW_LEAF)  # leaves an OOS page
    d2.cr3(other)  # listed: no exit
    kinds = {h.kind for h in d2.e.hazards}
    assert {"oos-stale", "vtlb-live", "no-shadow-for-target", "ref-on-old-root",
            "root-not-write-protected"} <= kinds
    assert d2.c["cr3_write_not_intercepted"] == 1
    assert d2.c["cr3_write_intercepted"] == 1  # only the first one
    assert d2.e.vcpus[0].slot == (root, L4)  # the reference stays on the old root
    assert d2.e.is_out_of_sync(l1)  # nothing resynced


def test_cr3_targets_active_only_while_secure_root_registered() -> None:
    t = GuestTables()
    normal = t.new()
    t.map(normal, U, 0x1000, DATA)
    private = t.new()
    t.map(private, U, 0x1001, DATA)
    d = Driver(cr3_targets=[normal << 12, private << 12], cr3_targets_active="secure")

    def marker(*words: str) -> None:
        d.e.process(K.MARKER, d.i, 0, 0, 0, 0, 0, 0, None, list(words))
        d.i += 1

    d.load(t)
    d.cr3(normal)  # before registration: an ordinary, intercepted write
    d.read(U, user=True)
    marker("secure-root", hex(private << 12))
    d.cr3(private)  # listed now: no exit
    d.cr3(normal)  # listed too: no exit
    marker("secure-end")
    d.cr3(private)  # the list is cleared again: intercepted
    # 1 before the registration + 1 after it ended; the 2 inside it are not
    assert d.c["cr3_write_intercepted"] == 2
    assert d.c["cr3_write_not_intercepted"] == 2
    # the private root was never shadowed when the hardware switched to it
    assert [h.kind for h in d.e.hazards if h.kind == "no-shadow-for-target"] == [
        "no-shadow-for-target"
    ]
    # the write after secure-end is served by Xen: the private root's L4
    # shadow exists now and the slot holds it
    assert d.e.vcpus[0].slot == (private, L4)


def test_cr3_targets_active_must_be_known() -> None:
    with pytest.raises(UsageError, match="cr3_targets_active"):
        EngineConfig.from_dict({"cr3_targets_active": "sometimes"})


def test_too_many_cr3_targets_is_reported() -> None:
    e = ShadowEngine(EngineConfig(cr3_targets=[0x1000 * i for i in range(1, 6)]))
    assert [h.kind for h in e.hazards] == ["too-many-cr3-targets"]


def test_unknown_walk_is_counted_and_skipped() -> None:
    t = GuestTables()
    root = t.new()
    l3, _, _ = t.map(root, U, 0x1000, DATA)
    d = Driver()
    for frame, page in t.pages():
        if frame != l3:
            d.ev(K.SNAPSHOT, pa=frame << 12, page=page)
    d.cr3(root)
    d.read(U, user=True)
    assert d.c["walk_unknown"] == 1
    assert d.e.keys() == {(root, L4)}


def test_window_open_forgets_everything() -> None:
    d, t, root, l1 = _s7()
    d.ev(K.WINDOW_OPEN)
    assert d.e.keys() == set()
    assert not d.e.guest.frames
    d.load(t)
    d.ev(K.CR3_CURRENT, val=root << 12)
    assert d.e.keys() == {(root, L4)}
    assert d.c["cr3_write_intercepted"] == 1  # CR3_CURRENT is not a write


def test_fact_log_answers_when_each_level_was_built() -> None:
    d, t, root, l3, l2, l1 = _s2()
    created = [(f.event, f.frame, f.type, f.reason) for f in d.e.facts if f.kind == "created"]
    cr3_ev, read_ev = d.i - 2, d.i - 1
    assert created == [
        (cr3_ev, root, 4, "cr3"),
        (read_ev, l3, 3, "demand"),
        (read_ev, l2, 2, "demand"),
        (read_ev, l1, 1, "demand"),
    ]
    pf = [f for f in d.e.facts if f.reason == "prefetch"]
    assert len(pf) == 31 and {f.entry for f in pf} == set(range(1, 32))


def test_disabled_prefetch() -> None:
    t = GuestTables()
    root = t.new()
    user_layout(t, root)
    d = Driver(prefetch=False)
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    assert d.c["shadow_prefetch"] == 0
    sl1 = next(s for k, s in d.e.shadows.items() if k[1] == L1)
    assert sum(1 for e in sl1.entries if e) == 1  # the demand entry only


def test_guest_a_clear_makes_shadow_not_present_until_fault() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, U + 0x1000, 0x1001, PTE_P | PTE_US)  # A clear: prefetch stops here
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    sl1 = d.e.shadows[(l1, L1)]
    assert sl1.entries[1] == 0  # prefetch stopped at A=0
    d.read(U + 0x1000, user=True)
    g = d.e.guest.read(l1, 1)
    assert g is not None and g & PTE_A  # the fault's walk set A
    assert sl1.entries[1] & SH_P


def test_validation_of_entry_with_a_clear_is_not_present() -> None:
    d, t, root, l1 = _s7(out_of_sync=False)
    d.store(t, l1, 3, (0x4444 << 12) | PTE_P | PTE_RW | PTE_US)  # A clear
    e = d.e.shadows[(l1, L1)].entries[3]
    assert e != 0  # the frame and rights are there ...
    assert not e & SH_P  # ... but not present: the first access must set A
    d.read(U + 0x3000, user=True)
    assert d.e.shadows[(l1, L1)].entries[3] & SH_P
    assert d.c["shadow_fault_fixed"] == 2  # the first read of U, and this one


# --------------------------------------------------------------------------
# The on_fault hook: how each fault ended, as Xen's trace records say it
# --------------------------------------------------------------------------
def test_on_fault_reports_each_fault_outcome_once() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, dm(l1), l1, KDATA)  # the kernel's direct map of that L1
    d = Driver(out_of_sync=False)
    seen: list[tuple[int, str, bool]] = []
    d.e.on_fault = lambda ev, vcpu, va, write, outcome, wrmap: seen.append((va, outcome, wrmap))
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)  # builds the path: fixed
    d.read(U + 0x20_0000, user=True)  # nothing mapped at L2 index 3: a guest fault
    d.store(t, l1, 1, NEW_LEAF)  # a supervisor write to a shadowed L1: emulated
    d.store(t, l1, 2, NEW_LEAF)  # the same page again: SHOPT_FAST_EMULATION
    assert [(va, o) for va, o, _ in seen] == [
        (U, "fixed"), (U + 0x20_0000, "guest_fault"), (dm(l1) + 8, "emulate"),
        (dm(l1) + 16, "fast_emulate"),
    ]
    # no fault had a writable mapping to remove: the L1 frame was already a
    # page table when its direct-map entry was first shadowed (read-only)
    assert [w for _, _, w in seen] == [False, False, False, False]
    # the counters agree with the outcomes
    assert d.c["shadow_fault_fixed"] == 1 and d.c["shadow_fault_bail_real_fault"] == 1
    assert d.c["shadow_fault_emulate_write"] == 1 and d.c["shadow_fault_fast_emulate"] == 1


def test_on_fault_says_when_a_fault_removed_write_access() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, dm(l1), l1, KDATA)
    d = Driver(out_of_sync=False)
    seen: list[tuple[str, bool]] = []
    d.e.on_fault = lambda ev, vcpu, va, write, outcome, wrmap: seen.append((outcome, wrmap))
    d.load(t)
    d.cr3(root)
    d.write(dm(l1))  # the direct map of the L1 frame, writable: not a page table yet
    d.read(U, user=True)  # shadowing the L1 removes that writable mapping
    assert seen == [("fixed", False), ("fixed", True)]
    assert d.c["shadow_writeable"] == 1  # the one entry made read-only


# --------------------------------------------------------------------------
# UNTRACK: a table frame nothing in the guest reaches any more
# --------------------------------------------------------------------------
def test_untrack_of_a_frame_without_shadow_only_forgets_it() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    d = Driver()
    d.load(t)
    d.ev(K.UNTRACK, pa=l1 << 12, val=1)
    assert not d.e.guest.known(l1)  # the next SNAPSHOT tells it again
    assert d.c["untracked"] == 1
    assert d.c["shadow_unshadow_untracked"] == 0  # it had no shadow to remove
    # a store the plugin would no longer record is ignored, not misapplied
    d.ev(K.TABLE_WRITE, pa=(l1 << 12) + 8, val=DATA)
    assert d.e.guest.unknown_writes == 1


def test_untrack_removes_a_shadow_still_there() -> None:
    d, t, root, l3, l2, l1 = _s2()
    assert (l1, L1) in d.e.shadows
    d.ev(K.UNTRACK, pa=l1 << 12, val=1)
    # Xen would still trap writes to the frame until it unshadowed it; the
    # trace tells them no more, so the model unshadows here: the L1 shadow
    # goes (sh_remove_shadows), and the L2 entry that pointed at it with it
    assert (l1, L1) not in d.e.shadows
    assert d.c["shadow_unshadow_untracked"] == 1
    assert not d.e.is_page_table(l1)
    assert (l2, L2) in d.e.shadows  # the parent stays: only l1 was untracked
    assert not d.e.shadows[(l2, L2)].entries[va_index(U, 2)] & SH_P


# --------------------------------------------------------------------------
# Other vCPUs' out-of-sync pages at a CR3 write (shadow_sync_other_vcpus)
# --------------------------------------------------------------------------
def _oos_on_v1(**cfg: Any) -> tuple[Driver, GuestTables, int, int]:
    """Two vCPUs on one root; v1 reads U (its L1 shadowed), then stores a
    new leaf into that L1 through the direct map: unsynced on v1."""
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, dm(l1), l1, KDATA)
    d = Driver(vcpus=2, **cfg)
    d.load(t)
    d.cr3(root, vcpu=0)
    d.cr3(root, vcpu=1)
    d.read(U, vcpu=1, user=True)
    d.write(dm(l1), vcpu=1)
    t.set(l1, 0, NEW_LEAF)
    d.ev(K.TABLE_WRITE, 1, va=dm(l1), pa=l1 << 12, val=NEW_LEAF)
    assert d.e.is_out_of_sync(l1)
    assert d.e.shadows[(l1, L1)].entries[0] != NEW_SHADOW  # stale while out of sync
    return d, t, root, l1


def test_cr3_write_resyncs_other_vcpus_oos_pages_it_may_use() -> None:
    d, t, root, l1 = _oos_on_v1()
    d.cr3(root, vcpu=0)
    # sh_update_cr3 -> shadow_sync_other_vcpus: v1's page is under v0's new
    # root, so not safe to skip: its changed entry is re-validated now...
    assert d.c["shadow_resync_only"] == 1
    assert d.e.shadows[(l1, L1)].entries[0] == NEW_SHADOW
    # ... and it stays out of sync (only v1's own CR3 write brings it back)
    assert d.e.is_out_of_sync(l1)
    assert d.c["shadow_resync"] == 0


def test_cr3_write_skips_oos_pages_safe_not_to_sync() -> None:
    d, t, root, l1 = _oos_on_v1(linux_l3_toplevel=False)
    other = t.new()  # an unrelated root: nothing below it reaches the L1
    d.load(t)
    d.cr3(other, vcpu=0)
    # sh_safe_not_to_sync: the L1, L2 and L3 shadows each have one reference
    # from one parent, up to an L4 that is not v0's new root: skipped
    assert d.c["shadow_resync_only"] == 0
    assert d.e.shadows[(l1, L1)].entries[0] != NEW_SHADOW


def test_cr3_write_does_not_skip_an_l1_whose_up_pointer_is_gone() -> None:
    """sh_safe_not_to_sync follows up-pointers (sp->up), not whoever links a
    shadow now: an L1 linked by two L2 entries keeps its up-pointer only
    while the first entry (sh_get_ref's) links it. Once the guest clears
    that entry, one reference is left but no up-pointer, so Xen cannot
    prove the L1 is out of the new root's reach and re-validates it."""
    t = GuestTables()
    root = t.new()
    _, l2, l1 = t.map(root, U, 0x1000, DATA)
    first = va_index(U, 2)
    t.set(l2, first + 1, t.get(l2, first))  # U + 2 MiB through the same L1
    t.map(root, dm(l1), l1, KDATA)
    t.map(root, dm(l2), l2, KDATA)
    d = Driver(vcpus=2, linux_l3_toplevel=False)
    d.load(t)
    d.cr3(root, vcpu=0)
    d.cr3(root, vcpu=1)
    d.read(U, vcpu=1, user=True)  # the L1 shadow's up-pointer: L2 entry `first`
    d.read(U + (2 << 20), vcpu=1, user=True)  # a second reference
    assert d.e.shadows[(l1, L1)].refcount == 2
    assert d.e.up[(l1, L1)][1] == first
    d.write(dm(l2) + 8 * first, vcpu=1)
    t.set(l2, first, 0)  # the guest unlinks the first entry (emulated: L2 shadowed)
    d.ev(K.TABLE_WRITE, 1, va=dm(l2) + 8 * first, pa=(l2 << 12) + 8 * first, val=0)
    # sh_put_ref from that entry: one reference left, the up-pointer cleared
    assert d.e.shadows[(l1, L1)].refcount == 1
    assert (l1, L1) not in d.e.up
    d.write(dm(l1), vcpu=1)
    t.set(l1, 0, NEW_LEAF)
    d.ev(K.TABLE_WRITE, 1, va=dm(l1), pa=l1 << 12, val=NEW_LEAF)
    assert d.e.is_out_of_sync(l1)
    other = t.new()  # an unrelated root, as in the test above, where it was skipped
    d.load(t)
    d.cr3(other, vcpu=0)
    assert d.c["shadow_resync_only"] == 1  # not skipped: no up-pointer to follow
    assert d.e.shadows[(l1, L1)].entries[0] == NEW_SHADOW
