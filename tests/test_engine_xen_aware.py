"""A Xen-aware guest (HVMOP_pagetable_dying) and windows opened after boot.

Hand-built event lists, as tests/test_engine.py. What each test pins down:

* the boot probe (Linux's xen_hvm_init_mmu_ops calls HVMOP_pagetable_dying
  with gpa 0): the domain's ``pagetable_dying_op`` and vCPU 0's flag set;
* check_for_early_unshadow (shadow/hvm.c) with the op in use: one aligned
  zero write unshadows an L1 or L3 frame, never an L2 or L4 one;
* sh_pagetable_dying (multi.c): the dying root's user L4 entries unhooked,
  the frame marked dying; a later write to it while no vCPU has it loaded
  unshadows it first (sh_page_fault);
* resync resets the vCPU's flag (sh_rm_write_access_from_sl1p);
* a window opened after boot starts with LINUX_L3_TOPLEVEL pinning off
  (sh_make_shadow switched it off for good long before).
"""

from __future__ import annotations

from typing import Any

from replay.guest.memory import PTE_A, PTE_P, PTE_RW
from replay.shadow.types import L1, L2, L3, L4, SH_P
from replay.trace import format as fmt

from .test_engine import KDATA, Driver, U
from .test_guest import DATA, TABLE, GuestTables, dm

K = fmt.Kind
#: A kernel-half table entry as Linux makes it: no _PAGE_USER.
KTABLE = PTE_P | PTE_RW | PTE_A


class XDriver(Driver):
    def marker(self, *words: str, vcpu: int = 0) -> None:
        self.e.process(K.MARKER, self.i, vcpu, 0, 0, 0, 0, 0, None, list(words))
        self.i += 1

    def dying(self, root: int, vcpu: int = 0) -> None:
        """What the plugin records at exit_mmap of the mm rooted at ``root``."""
        self.marker(fmt.MARKER_DYING, f"{root << 12:#x}", vcpu=vcpu)


def _one_page(**cfg: Any) -> tuple[XDriver, GuestTables, int, int, int, int]:
    """Root -> L3 -> L2 -> L1 mapping U, each table frame in the direct map,
    in a window opened after boot (as captures of a scenario are)."""
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = t.map(root, U, 0x1000, DATA)
    for f in (l3, l2, l1, root):
        t.map(root, dm(f), f, KDATA, table_flags=KTABLE)
    d = XDriver(out_of_sync=False, **cfg)
    d.ev(K.WINDOW_OPEN)
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    return d, t, root, l3, l2, l1


def test_boot_probe_is_modelled_for_a_xen_aware_guest_only() -> None:
    aware, unaware = XDriver(), XDriver(guest_kind="unaware")
    # the probe ran on the boot vCPU: the domain uses the op from then on
    assert aware.e.dying_op and aware.e.vcpus[0].pagetable_dying
    assert not unaware.e.dying_op and not unaware.e.vcpus[0].pagetable_dying


def test_xen_aware_l1_unshadowed_at_the_first_zero_write() -> None:
    d, t, root, l3, l2, l1 = _one_page()
    assert d.e.is_page_table(l1)
    d.store(t, l1, 5, 0)  # one aligned 8-byte zero store into the L1
    assert d.c["shadow_early_unshadow"] == 1  # no second write needed
    assert not d.e.is_page_table(l1)


def test_unaware_guest_needs_two_zero_writes() -> None:
    d, t, root, l3, l2, l1 = _one_page(guest_kind="unaware")
    d.store(t, l1, 5, 0)
    assert d.c["shadow_early_unshadow"] == 0  # the two-write heuristic: first one
    d.store(t, l1, 6, 0)
    assert d.c["shadow_early_unshadow"] == 1
    assert not d.e.is_page_table(l1)


def test_xen_aware_never_unshadows_l2_or_l4_early() -> None:
    d, t, root, l3, l2, l1 = _one_page()
    d.store(t, l2, 7, 0)
    d.store(t, l2, 8, 0)
    d.store(t, root, 9, 0)
    d.store(t, root, 10, 0)
    # with the op in use, frames with an L2 or L4 shadow are never unshadowed early
    assert d.c["shadow_early_unshadow"] == 0
    assert d.e.is_page_table(l2) and d.e.is_page_table(root)


def test_pagetable_dying_unhooks_the_user_half() -> None:
    d, t, root, l3, l2, l1 = _one_page()
    d.read(dm(l1))  # a kernel access: the direct map's L4 entry gets shadowed too
    sh = d.e.shadows[(root, L4)]
    user_i, kernel_i = 0, 273  # U is in L4 slot 0, the direct map in slot 273
    assert sh.entries[user_i] & SH_P and sh.entries[kernel_i] & SH_P
    d.dying(root)
    assert d.c["pagetable_dying"] == 1
    assert root in d.e.dying_frames
    # shadow_unhook_mappings(user only): the user entry is gone, the kernel's stays
    assert not sh.entries[user_i] & SH_P
    assert sh.entries[kernel_i] & SH_P
    # the user L3 lost its only link (no L3 pinning after boot): destroyed
    assert (l3, L3) not in d.e.shadows


def _dying_and_left() -> tuple[XDriver, GuestTables, int]:
    """The root said dying, the vCPU switched to another root, then a write
    to the old root's frame (e.g. the freed pgd reused and written)."""
    d, t, root, l3, l2, l1 = _one_page()
    other = t.new()
    t.map(other, U, 0x2000, DATA)
    t.map(other, dm(root), root, KDATA, table_flags=KTABLE)
    d.load(t)
    d.dying(root)
    d.cr3(other)  # the dying root is not loaded any more
    d.store(t, root, 100, 0x1234)
    return d, t, root


def test_write_to_a_dying_root_no_vcpu_runs_unshadows_it() -> None:
    d, t, root = _dying_and_left()
    assert d.c["shadow_unshadow_dying"] == 1
    assert not d.e.is_page_table(root)
    # still one emulated write (Xen emulates it after the unshadow) ...
    assert d.c["shadow_fault_emulate_write"] == 1
    d.store(t, root, 101, 0x1234)
    # ... and none after: the frame is no page table any more
    assert d.c["shadow_fault_emulate_write"] == 1


def test_write_to_a_dying_root_still_loaded_is_emulated() -> None:
    d, t, root, l3, l2, l1 = _one_page()
    d.dying(root)
    d.store(t, root, 100, 0x1234)  # vCPU 0 still runs on it
    assert d.c["shadow_unshadow_dying"] == 0
    assert d.e.is_page_table(root)


def test_unaware_guest_ignores_the_dying_marker() -> None:
    d, t, root, l3, l2, l1 = _one_page(guest_kind="unaware")
    d.dying(root)
    assert d.c["pagetable_dying"] == 0 and not d.e.dying_op
    assert d.e.shadows[(root, L4)].entries[0] & SH_P


def test_promotion_clears_the_dying_mark() -> None:
    d, t, root = _dying_and_left()
    # unshadowed (previous test), the mark stays until the frame is a table again
    assert not d.e.is_page_table(root) and root in d.e.dying_frames
    d.cr3(root)  # the frame is a root again: shadow_promote clears the mark
    assert d.e.is_page_table(root)
    assert root not in d.e.dying_frames


def test_resync_resets_the_vcpu_flag() -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, dm(l1), l1, KDATA)
    d = XDriver()  # out of sync on
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    d.store(t, l1, 1, DATA | 0x5000)  # the write fault unsyncs the L1, writable
    assert d.e.is_out_of_sync(l1) and d.e.vcpus[0].pagetable_dying
    d.cr3(root)  # resync: its writable mapping is removed (an OOS fixup)
    assert not d.e.is_out_of_sync(l1)
    # sh_rm_write_access_from_sl1p copies the L1 frame's dying mark: not dying
    assert not d.e.vcpus[0].pagetable_dying


def test_window_opened_after_boot_has_no_l3_pinning() -> None:
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = t.map(root, U, 0x1000, DATA)
    d = XDriver()
    d.ev(K.WINDOW_OPEN)
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    # one reference: the root's L4 entry; no pin (sh_make_shadow switched
    # LINUX_L3_TOPLEVEL off for good long before the window)
    assert d.e.shadows[(l3, L3)].refcount == 1
    assert not d.e.shadows[(l3, L3)].pinned
    assert not d.e.l3_pinning


def test_trace_from_boot_pins_l3_until_the_threshold() -> None:
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = t.map(root, U, 0x1000, DATA)
    d = XDriver()  # no window open: a trace from boot
    d.load(t)
    d.cr3(root)
    d.read(U, user=True)
    assert d.e.shadows[(l3, L3)].pinned  # still on: only 1 L4 shadow so far
    assert {L1, L2} <= {k[1] for k in d.e.shadows}
    assert TABLE  # the flags the tables were built with (test_guest.TABLE)
