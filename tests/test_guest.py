"""Guest table memory and the 4-level walker (replay.guest.memory).

Also home of :class:`GuestTables`, the small builder of guest page tables
the engine and replayer tests share: it lays out table frames as bytes and
hands them over as SNAPSHOT pages.
"""

from __future__ import annotations

import struct

import pytest

from replay.guest.memory import (
    PTE_A,
    PTE_D,
    PTE_NX,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    TRANSLATE_UNKNOWN,
    TRANSLATE_UNMAPPED,
    Access,
    FaultReason,
    GuestMemory,
    WalkStatus,
    cr3_root,
    va_index,
)

#: Flags of an intermediate table entry in these tests: everything allowed.
TABLE = PTE_P | PTE_RW | PTE_US | PTE_A
#: A user data page already accessed and dirtied.
DATA = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D
#: Linux's direct map base (4-level).
DIRECT_MAP = 0xFFFF_8880_0000_0000


def dm(frame: int) -> int:
    """Kernel direct-map address of a frame."""
    return DIRECT_MAP + (frame << 12)


class GuestTables:
    """Guest page tables under construction: frame number -> 512 entries."""

    def __init__(self, first_frame: int = 0x100) -> None:
        self.tables: dict[int, list[int]] = {}
        self.next = first_frame

    def new(self) -> int:
        frame = self.next
        self.next += 1
        self.tables[frame] = [0] * 512
        return frame

    def set(self, frame: int, index: int, value: int) -> None:
        self.tables[frame][index] = value

    def get(self, frame: int, index: int) -> int:
        return self.tables[frame][index]

    def table_for(self, frame: int, index: int, flags: int = TABLE) -> int:
        """The next-level table behind entry ``index`` of ``frame``; made
        (and linked with ``flags``) if missing."""
        e = self.tables[frame][index]
        if e & PTE_P:
            return (e & 0x000F_FFFF_FFFF_F000) >> 12
        child = self.new()
        self.tables[frame][index] = (child << 12) | flags
        return child

    def map(
        self, root: int, va: int, target: int, flags: int = DATA, *,
        size: str = "4k", table_flags: int = TABLE,
    ) -> list[int]:
        """Map ``va`` to frame ``target``; returns the table frames walked
        below the root ([L3, L2, L1] for 4k, [L3, L2] for 2m, [L3] for 1g)."""
        l3 = self.table_for(root, va_index(va, 4), table_flags)
        if size == "1g":
            self.set(l3, va_index(va, 3), (target << 12) | flags | PTE_PS)
            return [l3]
        l2 = self.table_for(l3, va_index(va, 3), table_flags)
        if size == "2m":
            self.set(l2, va_index(va, 2), (target << 12) | flags | PTE_PS)
            return [l3, l2]
        l1 = self.table_for(l2, va_index(va, 2), table_flags)
        self.set(l1, va_index(va, 1), (target << 12) | flags)
        return [l3, l2, l1]

    def page(self, frame: int) -> bytes:
        return struct.pack("<512Q", *self.tables[frame])

    def pages(self) -> list[tuple[int, bytes]]:
        return [(f, self.page(f)) for f in sorted(self.tables)]

    def memory(self) -> GuestMemory:
        mem = GuestMemory()
        for frame, page in self.pages():
            mem.snapshot(frame, page)
        return mem


# --------------------------------------------------------------------------
# Walker tests
# --------------------------------------------------------------------------
VA = 0x0000_7F12_3456_7ABC


def test_4k_walk_path_and_address() -> None:
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = t.map(root, VA, 0x9999)
    mem = t.memory()
    w = mem.walk(root << 12, VA, Access.READ, user=True)
    assert w.status is WalkStatus.OK
    assert w.level == 1  # a 4 KiB leaf
    assert w.frames == [root, l3, l2, l1]
    assert w.gpa == (0x9999 << 12) | (VA & 0xFFF)
    assert w.frame_at(2) == l2
    assert w.entry_at(1) == w.leaf


def test_2m_and_1g_leaves() -> None:
    t = GuestTables()
    root = t.new()
    t.map(root, 0x4000_0000, 0x20000, size="2m")  # 2 MiB at 1 GiB
    t.map(root, 0x80_0000_0000, 0x40000, size="1g")  # 1 GiB at 512 GiB
    mem = t.memory()
    w2 = mem.walk(root << 12, 0x4000_0000 + 0x12_3456)
    assert (w2.status, w2.level) == (WalkStatus.OK, 2)
    # 2 MiB page: base 0x20000 frames, offset within the 2 MiB kept
    assert w2.gpa == (0x20000 << 12) + 0x12_3456
    w1 = mem.walk(root << 12, 0x80_0000_0000 + 0x1234_5678)
    assert (w1.status, w1.level) == (WalkStatus.OK, 3)
    assert w1.gpa == (0x40000 << 12) + 0x1234_5678
    assert len(w1.frames) == 2  # L4 and L3 only


def test_pcid_and_noflush_bits_are_stripped() -> None:
    t = GuestTables()
    root = t.new()
    t.map(root, VA, 0x1234)
    mem = t.memory()
    cr3 = (1 << 63) | (root << 12) | 0x5A  # no-flush bit and PCID 0x5a
    assert cr3_root(cr3) == root
    assert mem.walk(cr3, VA).gpa == mem.walk(root << 12, VA).gpa
    assert mem.translate(cr3, VA) == (0x1234 << 12) | (VA & 0xFFF)


def test_not_present_fails_at_its_level() -> None:
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = t.map(root, VA, 0x1234)
    t.set(l2, va_index(VA, 2), t.get(l2, va_index(VA, 2)) & ~PTE_P)
    mem = t.memory()
    w = mem.walk(root << 12, VA)
    assert (w.status, w.level, w.reason) == (WalkStatus.FAULT, 2, FaultReason.NOT_PRESENT)
    assert w.frames == [root, l3, l2]  # stops at the failing level
    assert mem.translate(root << 12, VA) == TRANSLATE_UNMAPPED


def test_rights_rw_us_nx() -> None:
    t = GuestTables()
    root = t.new()
    t.map(root, VA, 0x1234, PTE_P | PTE_A | PTE_NX)  # kernel, read-only, no-exec
    mem = t.memory()
    cr3 = root << 12
    assert mem.walk(cr3, VA, Access.READ).ok
    w = mem.walk(cr3, VA, Access.WRITE)
    assert (w.reason, w.level) == (FaultReason.READ_ONLY, 1)
    w = mem.walk(cr3, VA, Access.READ, user=True)
    assert (w.reason, w.level) == (FaultReason.SUPERVISOR, 1)
    w = mem.walk(cr3, VA, Access.FETCH)
    assert (w.reason, w.level) == (FaultReason.NO_EXECUTE, 1)


def test_upper_level_rights_count_too() -> None:
    t = GuestTables()
    root = t.new()
    # the L4 entry denies user access although the leaf allows it
    t.map(root, VA, 0x1234, table_flags=PTE_P | PTE_RW | PTE_A)
    mem = t.memory()
    w = mem.walk(root << 12, VA, Access.READ, user=True)
    assert (w.reason, w.level) == (FaultReason.SUPERVISOR, 4)


def test_accessed_and_dirty_bits_are_set() -> None:
    t = GuestTables()
    root = t.new()
    tables = [PTE_P | PTE_RW | PTE_US]  # A clear on every level
    l3, l2, l1 = t.map(root, VA, 0x1234, PTE_P | PTE_RW | PTE_US, table_flags=tables[0])
    mem = t.memory()
    gen = mem.generation
    w = mem.walk(root << 12, VA, Access.READ)
    assert w.ok
    for level, frame in zip((4, 3, 2, 1), (root, l3, l2, l1), strict=True):
        e = mem.read(frame, va_index(VA, level))
        assert e is not None and e & PTE_A, f"A not set at L{level}"
        assert not e & PTE_D, f"a read set D at L{level}"
    assert mem.generation > gen
    mem.walk(root << 12, VA, Access.WRITE)
    leaf = mem.read(l1, va_index(VA, 1))
    assert leaf is not None and leaf & PTE_D  # a write dirties the leaf
    upper = mem.read(l2, va_index(VA, 2))
    assert upper is not None and not upper & PTE_D  # but not the tables


def test_failed_walk_changes_nothing() -> None:
    t = GuestTables()
    root = t.new()
    t.map(root, VA, 0x1234, PTE_P | PTE_US, table_flags=PTE_P | PTE_RW | PTE_US)
    mem = t.memory()
    gen = mem.generation
    assert not mem.walk(root << 12, VA, Access.WRITE).ok  # leaf is read-only
    assert mem.generation == gen


def test_set_ad_false_changes_nothing() -> None:
    t = GuestTables()
    root = t.new()
    t.map(root, VA, 0x1234, PTE_P, table_flags=PTE_P | PTE_RW)
    mem = t.memory()
    gen = mem.generation
    assert mem.walk(root << 12, VA, set_ad=False).ok
    assert mem.generation == gen


def test_unknown_frame_is_not_a_fault() -> None:
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = t.map(root, VA, 0x1234)
    mem = GuestMemory()
    for frame, page in t.pages():
        if frame != l2:  # the L2 was never snapshotted
            mem.snapshot(frame, page)
    w = mem.walk(root << 12, VA)
    assert (w.status, w.level) == (WalkStatus.UNKNOWN, 2)
    assert mem.translate(root << 12, VA) == TRANSLATE_UNKNOWN


def test_table_write_and_window_forget() -> None:
    t = GuestTables()
    root = t.new()
    l3, l2, l1 = t.map(root, VA, 0x1234)
    mem = t.memory()
    pa = (l1 << 12) + 8 * va_index(VA, 1)
    old = mem.write(pa, (0x4321 << 12) | DATA)
    assert old == (0x1234 << 12) | DATA
    assert mem.walk(root << 12, VA).gpa >> 12 == 0x4321
    # a write to a frame never seen is ignored and counted
    assert mem.write(0x7777_7000, 1) is None
    assert mem.unknown_writes == 1
    mem.forget_all()
    assert mem.walk(root << 12, VA).status is WalkStatus.UNKNOWN


def test_snapshot_must_be_a_page() -> None:
    with pytest.raises(ValueError):
        GuestMemory().snapshot(1, b"\0" * 100)
