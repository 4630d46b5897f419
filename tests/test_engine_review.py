"""Fidelity items D3-D14 of the source review, on hand-built event lists.

Each test is a small event sequence where the model used to differ from
Xen 4.17.5 and now follows it (the Xen function is named in each test);
the items declined are explained in docs/xen-model.md.
"""

from __future__ import annotations

from replay.guest.memory import PTE_A, PTE_D, PTE_P, PTE_RW, PTE_US, va_index
from replay.shadow.config import EngineConfig
from replay.shadow.types import FL1, L1, L2, L4, SH_P, SH_RW
from replay.trace import format as fmt

from .test_engine import KDATA, NEW_LEAF, Driver, U, _s7
from .test_guest import TABLE, GuestTables, dm

K = fmt.Kind
#: CR4 as Linux runs with it (PSE, PAE, PGE, OSFXSR...): toggling PGE is
#: Linux's global TLB flush without INVPCID.
CR4 = 0x3606F0
CR4_PGE = 1 << 7


def _cr4_pge_toggle(d: Driver, vcpu: int = 0) -> None:
    """__native_flush_tlb_global without INVPCID: PGE off, then on again."""
    d.ev(K.CR4_WRITE, vcpu, val=CR4 & ~CR4_PGE, pa=CR4)
    d.ev(K.CR4_WRITE, vcpu, val=CR4, pa=CR4 & ~CR4_PGE)


# -- D3: sh_update_paging_modes -------------------------------------------
def test_cr4_mode_change_resyncs_every_vcpus_oos_pages() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)
    t.map(root, dm(l1), l1, KDATA)
    d = Driver(vcpus=2)
    d.load(t)
    d.cr3(root, vcpu=0)
    d.cr3(root, vcpu=1)
    d.read(U, vcpu=1, user=True)
    d.write(dm(l1), vcpu=1)
    t.set(l1, 0, NEW_LEAF)
    d.ev(K.TABLE_WRITE, 1, va=dm(l1), pa=l1 << 12, val=NEW_LEAF)
    assert d.e.is_out_of_sync(l1)  # unsynced on v1
    d.ev(K.CR4_WRITE, 0, val=CR4 & ~CR4_PGE, pa=CR4)
    # common.c sh_update_paging_modes -> shadow_resync_all(v): a full resync
    # of every vCPU's pages (not shadow_sync_other_vcpus' content-only one)
    assert not d.e.is_out_of_sync(l1)
    assert d.c["shadow_resync"] == 1  # v1's one page


def test_cr4_mode_change_drops_the_old_root_before_taking_the_new() -> None:
    """Pool of 5 pages: the second path's prealloc unpins the running root
    (stage 1 unpins roots in use too), so only the vCPU's slot holds it."""
    t = GuestTables()
    root = t.new()
    data = PTE_P | PTE_RW | PTE_US | PTE_A
    t.map(root, U, 0x1000, data)
    u2 = U + (1 << 30)  # the same L3, another L2 and L1
    _, l2b, l1b = t.map(root, u2, 0x1001, data)
    d = Driver(pool_pages=5, out_of_sync=False, linux_l3_toplevel=False)
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)  # L4 + L3 + L2 + L1: 4 of 5 pages
    d.read(u2, user=True)  # prealloc(3): unpin the root, unhook it, rebuild
    assert d.c["shadow_prealloc_2"] == 1
    assert not d.e.shadows[(root, L4)].pinned
    assert (l1b, L1) in d.e.shadows
    d.ev(K.CR4_WRITE, val=CR4 & ~CR4_PGE, pa=CR4)
    # detach_old_tables (sh_detach_old_tables) first: the last reference
    # goes, the whole hierarchy is freed; sh_update_cr3 then makes the root
    # anew, empty (2 L4 shadows made in all)
    assert d.c["shadow_created_l4"] == 2
    assert not any(e & SH_P for e in d.e.shadows[(root, L4)].entries)
    assert (l1b, L1) not in d.e.shadows and (l2b, L2) not in d.e.shadows
    faults = d.c["shadow_fault"]
    d.read(u2, user=True)  # rebuilt at its next fault
    assert d.c["shadow_fault"] == faults + 1


# -- D6: unaligned stores and SHADOW_SET_ERROR ----------------------------
def test_unaligned_store_removes_the_frames_shadows() -> None:
    # (the two-write heuristic, so that no early unshadow can do it instead)
    d, t, root, l1 = _s7(out_of_sync=False, guest_kind="unaware")
    va = dm(l1) + 4  # an 8-byte store straddling entries 0 and 1
    d.write(va, size=8)
    for i in (0, 1):
        d.ev(K.TABLE_WRITE, va=va, pa=(l1 << 12) + 8 * i, val=t.get(l1, i))
    # sh_emulate_map_dest: vaddr & (bytes - 1) -> sh_remove_shadows (slow)
    assert not d.e.is_page_table(l1)


def test_upper_entry_to_a_non_ram_frame_removes_the_frames_shadows() -> None:
    t = GuestTables()
    root = t.new()
    _, l2, _ = t.map(root, U, 0x1000, PTE_P | PTE_RW | PTE_US | PTE_A)
    t.map(root, dm(l2), l2, KDATA)
    d = Driver(out_of_sync=False)  # 512 MiB of RAM: frames below 0x20000
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    assert d.e.is_page_table(l2)
    # a present L2 entry whose "table" is frame 0x30000, above RAM
    d.store(t, l2, 7, (0x30000 << 12) | TABLE)
    # validate_gl2e: target not RAM -> SHADOW_SET_ERROR -> validate_guest_pt_write
    # removes the frame's shadows
    assert not d.e.is_page_table(l2)


# -- D7: one check per emulated write ------------------------------------
def test_a_16_byte_zero_store_is_one_early_unshadow_check() -> None:
    d, t, root, l1 = _s7(out_of_sync=False, guest_kind="unaware")
    va = dm(l1) + 8 * 40  # entries 40 and 41: empty in the guest
    d.write(va, size=16)
    for i in (40, 41):
        d.ev(K.TABLE_WRITE, va=va, pa=(l1 << 12) + 8 * i, val=0)
    # sh_emulate_unmap_dest runs check_for_early_unshadow once per write: the
    # first zero write only arms the two-write heuristic
    assert d.c["shadow_early_unshadow"] == 0
    assert d.e.is_page_table(l1)
    # skip-verify needs bytes <= the PTE size: both entries are validated
    assert d.c["shadow_validate_skip"] == 0
    assert d.c["shadow_validate_gl1e_calls"] == 2


# -- D8: FL1 entries get full rights --------------------------------------
def test_fl1_entries_have_full_rights() -> None:
    t = GuestTables()
    root = t.new()
    base = 0x10000  # 2 MiB aligned
    va = 0x4000_0000
    _, l2 = t.map(root, va, base, PTE_P | PTE_RW | PTE_US | PTE_A, size="2m")  # D clear
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(va, user=True)
    fl1 = d.e.shadows[(base, FL1)]
    # guest_walk.c: the made-up l1e of a PSE l2e has P|US|RW|A|D, the l2e's
    # rights are enforced in the shadow l2e (read-only while D is clear)
    assert fl1.entries[1] & SH_RW
    assert not d.e.shadows[(l2, L2)].entries[va_index(va, 2)] & SH_RW
    d.write(va, user=True)  # the walk sets D; the L2 shadow entry becomes RW
    faults = d.c["shadow_fault"]
    d.write(va + 0x1000, user=True)  # FL1[1] was prefetched writable: no fault
    assert d.c["shadow_fault"] == faults


# -- D11: the FL1 key keeps the PSE-PAT bit --------------------------------
def test_fl1_shadows_of_two_pat_variants_are_two() -> None:
    t = GuestTables()
    root = t.new()
    base = 0x10000
    va1, va2 = 0x4000_0000, 0x4020_0000
    t.map(root, va1, base, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_US, size="2m")
    t.map(root, va2, base | 1, PTE_P | PTE_RW | PTE_A | PTE_D | PTE_US, size="2m")  # PAT
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(va1, user=True)
    d.read(va2, user=True)
    # shadow_get_and_create_l1e keys the FL1 by guest_l2e_get_gfn: bit 12
    # (PSE-PAT) included
    assert (base, FL1) in d.e.shadows and (base | 1, FL1) in d.e.shadows
    assert d.e.shadows[(base | 1, FL1)].entries[0] >> 12 == base  # same target


# -- D4: the pool Xen gives the guests we run -------------------------------
def test_default_pool_is_libxls_less_p2m_and_monitor_pages() -> None:
    # qmp_tools/xen.py runs memory = maxmem = 512 MiB, vcpus = 1, no
    # shadow_memory: libxl__get_required_paging_memory gives
    # 4 * (256 * 1 + 2 * 512) KiB = 1,280 pages; shadow_set_allocation takes
    # the p2m pages out of that (P2M_PAGES, 7), and sh_make_monitor_table one
    # page per vCPU: 1,280 - 7 - 1 = 1,272 for shadows and snapshots
    assert EngineConfig(vcpus=1, ram_mib=512).pool == 1272
    # a small guest: libxl's 256 + 2 * 64 = 384 pages is above Xen's floor
    # (sh_min_allocation: 128 + max(16384 / 256, 6) + 1 = 193), no 1,024 floor
    assert EngineConfig(vcpus=1, ram_mib=64).pool == 384 - 7 - 1
    # an explicit pool_pages is taken as it is
    assert EngineConfig(pool_pages=100).pool == 100


# -- D5: early unshadow is Xen's fast removal --------------------------------
def test_early_unshadow_removes_only_the_up_pointer_link() -> None:
    t = GuestTables()
    root = t.new()
    data = PTE_P | PTE_RW | PTE_US | PTE_A
    _, l2, l1 = t.map(root, U, 0x1000, data)
    t.set(l2, va_index(U, 2) + 1, t.get(l2, va_index(U, 2)))  # U+2M: the same L1
    t.map(root, dm(l1), l1, KDATA)
    d = Driver(out_of_sync=False, guest_kind="unaware")
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)  # links the L1 through L2 entry 2: its up-pointer
    d.read(U + (1 << 21), user=True)  # and through entry 3
    assert d.e.shadows[(l1, L1)].refcount == 2
    d.store(t, l1, 100, 0)
    d.store(t, l1, 101, 0)  # the second zero write: early unshadow
    assert d.c["shadow_early_unshadow"] == 1
    # check_for_early_unshadow calls sh_remove_shadows with fast = 1: an L1
    # is removed via its up-pointer only (sh_remove_shadow_via_pointer), the
    # brute-force search of other parents is skipped
    sl2 = d.e.shadows[(l2, L2)]
    assert not sl2.entries[va_index(U, 2)] & SH_P
    assert sl2.entries[va_index(U, 2) + 1] & SH_P
    assert d.e.shadows[(l1, L1)].refcount == 1


# -- D10: fast emulation armed after the emulated write ---------------------
def test_fast_emulation_is_armed_after_a_write_that_freed_a_shadow() -> None:
    t = GuestTables()
    root = t.new()
    data = PTE_P | PTE_RW | PTE_US | PTE_A
    _, l2, _ = t.map(root, U, 0x1000, data)
    t.map(root, U + (1 << 21), 0x1001, data)  # L2 entry 3: a second L1
    t.map(root, dm(l2), l2, KDATA)
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    d.read(U + (1 << 21), user=True)
    i = va_index(U, 2)
    d.store(t, l2, i, 0)  # emulated; frees the first L1 shadow
    assert d.c["shadow_fault_emulate_write"] == 1
    # sh_page_fault arms fast emulation after x86_emulate when the frame is
    # still a page table, so the free inside the write (shadow_free clears
    # the flag) does not disarm it: the next store takes the fast path
    d.store(t, l2, i + 1, 0)
    assert d.c["shadow_fault_fast_emulate"] == 1
    assert d.c["shadow_fault_emulate_write"] == 1


# -- D13: out of sync only while every vCPU has paging on ---------------------
def test_no_unsync_while_another_vcpu_has_paging_off() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)
    t.map(root, dm(l1), l1, KDATA)
    d = Driver(vcpus=2)
    d.load(t)
    d.cr3(root, vcpu=0)  # vCPU 1 has not started: no CR3 yet, paging off
    d.read(U, user=True)
    d.store(t, l1, 0, NEW_LEAF)
    # sh_update_paging_modes: oos_active only when every vCPU has paging
    # enabled; sh_unsync refuses otherwise: the store is emulated
    assert d.c["shadow_unsync"] == 0
    assert d.c["shadow_fault_emulate_write"] == 1
    d.cr3(root, vcpu=1)  # vCPU 1 up (the trace's sign of its paging on)
    d.cr3(root, vcpu=0)  # (ends vCPU 0's fast emulation of that frame)
    d.store(t, l1, 1, NEW_LEAF)
    assert d.c["shadow_unsync"] == 1


# -- D12: two writable mappings per out-of-sync page --------------------------
def test_third_writable_mapping_of_an_oos_page_evicts_the_oldest() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)
    # two more kernel VAs of the L1 (the direct-map slots of two unused
    # frames: the same kernel tables, so no new link resyncs the page)
    alias_a, alias_b = dm(0x1F0), dm(0x1F1)
    for va in (dm(l1), alias_a, alias_b):
        t.map(root, va, l1, KDATA)
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)  # l1 shadowed
    d.write(dm(l1))  # unsynced; the direct map's mapping: fixup 1
    d.write(alias_a)  # fixup 2
    assert d.e.is_out_of_sync(l1)
    d.write(alias_b)  # oos_fixup_add: the table is full, the oldest goes
    assert d.c["shadow_oos_fixup_add"] == 3
    assert d.c["shadow_oos_fixup_evict"] == 1
    # sh_rm_write_access_from_sl1p: the direct map's mapping is read-only
    # again, so its next write faults (and is re-propagated writable)
    faults = d.c["shadow_fault"]
    d.write(dm(l1))
    assert d.c["shadow_fault"] == faults + 1
    faults = d.c["shadow_fault"]
    d.write(alias_b)  # the newest two stay writable
    assert d.c["shadow_fault"] == faults


def test_resync_takes_write_access_through_the_fixup_table_first() -> None:
    # oos_remove_write_access (common.c): oos_fixup_flush_gmfn clears the
    # writable mappings the fixup table holds, then sh_remove_write_access
    # finds no writable mapping left and returns before counting
    # (perfc shadow_writeable) or flagging the fault (TRCE_SFLAG_WRMAP).
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D)
    alias = dm(0x1F0)
    for va in (dm(l1), alias):
        t.map(root, va, l1, KDATA)
    d = Driver()
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)  # l1 shadowed
    d.write(dm(l1))  # unsynced; fixup 1
    d.write(alias)  # fixup 2: every writable mapping of l1 is in the table
    assert d.e.is_out_of_sync(l1)
    writeable = d.c["shadow_writeable"]
    d.cr3(root)  # sh_update_cr3 resyncs the vCPU's out-of-sync pages
    assert not d.e.is_out_of_sync(l1)
    # both mappings went through the fixup flush: none left for
    # sh_remove_write_access to count
    assert d.c["shadow_writeable"] == writeable
    # ... and both are read-only again: each next write faults
    for va in (dm(l1), alias):
        faults = d.c["shadow_fault"]
        d.write(va)
        assert d.c["shadow_fault"] == faults + 1
