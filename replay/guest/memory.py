"""Guest page-table memory rebuilt from a trace, and an x86-64 4-level walker.

:class:`GuestMemory` knows the 4 KiB frames that the trace snapshotted
(``SNAPSHOT``) and follows every store into them (``TABLE_WRITE``). A
``WINDOW_OPEN`` makes everything stale: frames not snapshotted again are
unknown. :func:`GuestMemory.walk` translates a virtual address the way the
hardware (and Xen's ``guest_walk_tables``) does and, when asked, sets the
accessed bit on every level and the dirty bit on the leaf of a successful
write, in the modelled memory. A walk that reaches a frame we never saw ends
with status ``UNKNOWN``: that is not a fault, we simply cannot tell.

Modelled: P, RW, U/S, NX (EFER.NXE assumed on), PS at L2 (2 MiB) and L3
(1 GiB), A, D, CR0.WP=1 (supervisor writes honour RW, as Linux runs).
Not modelled: SMEP/SMAP, protection keys, reserved-bit faults, PAT.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final

PAGE_SHIFT: Final = 12
PAGE_SIZE: Final = 1 << PAGE_SHIFT
ENTRIES: Final = 512

# Page-table entry bits.
PTE_P: Final = 1 << 0
PTE_RW: Final = 1 << 1
PTE_US: Final = 1 << 2
PTE_PWT: Final = 1 << 3
PTE_PCD: Final = 1 << 4
PTE_A: Final = 1 << 5
PTE_D: Final = 1 << 6
PTE_PS: Final = 1 << 7
PTE_G: Final = 1 << 8
PTE_NX: Final = 1 << 63
#: Physical-address bits of an entry (bits 12..51).
ADDR_MASK: Final = 0x000F_FFFF_FFFF_F000
#: CR3: PCID in bits 0..11, "no flush" in bit 63.
CR3_ADDR_MASK: Final = ADDR_MASK

_AD: Final = PTE_A | PTE_D

#: :meth:`GuestMemory.translate` results that are not addresses.
TRANSLATE_UNKNOWN: Final = -1
TRANSLATE_UNMAPPED: Final = -2

_Q = struct.Struct("<Q")
_UNPACK = _Q.unpack_from
_PACK = _Q.pack_into


class Access(IntEnum):
    """What an access does, for permission checks."""

    READ = 0
    WRITE = 1
    FETCH = 2


class WalkStatus(IntEnum):
    OK = 0
    #: The guest tables do not allow the access (a real guest #PF).
    FAULT = 1
    #: A frame on the path was never snapshotted: we cannot tell.
    UNKNOWN = 2


class FaultReason(IntEnum):
    NONE = 0
    NOT_PRESENT = 1
    READ_ONLY = 2
    SUPERVISOR = 3  # user access through an entry without U/S
    NO_EXECUTE = 4


@dataclass(slots=True)
class Walk:
    """Result of one guest walk.

    ``frames[k]`` and ``entries[k]`` are the table frame read at step ``k``
    (0 = L4, 1 = L3, 2 = L2, 3 = L1) and the entry found there; the lists
    stop at the leaf, at the failing level, or at the first unknown frame.
    ``level`` is the level (4..1) at which the walk stopped (the leaf level
    on success: 1 for 4 KiB, 2 for 2 MiB, 3 for 1 GiB).
    """

    status: WalkStatus
    va: int
    level: int
    frames: list[int] = field(default_factory=list)
    entries: list[int] = field(default_factory=list)
    reason: FaultReason = FaultReason.NONE
    #: Guest-physical address the access reaches (valid when OK).
    gpa: int = 0

    @property
    def ok(self) -> bool:
        return self.status is WalkStatus.OK

    @property
    def leaf(self) -> int:
        """The leaf entry (valid when OK)."""
        return self.entries[-1]

    @property
    def gfn(self) -> int:
        return self.gpa >> PAGE_SHIFT

    def frame_at(self, level: int) -> int | None:
        """Table frame walked at ``level`` (4..1), or None if not reached."""
        k = 4 - level
        return self.frames[k] if k < len(self.frames) else None

    def entry_at(self, level: int) -> int | None:
        k = 4 - level
        return self.entries[k] if k < len(self.entries) else None


def cr3_root(cr3: int) -> int:
    """The root table frame number of a CR3 value (PCID and bit 63 stripped)."""
    return (cr3 & CR3_ADDR_MASK) >> PAGE_SHIFT


def va_index(va: int, level: int) -> int:
    """Index of ``va`` in a table of ``level`` (4..1)."""
    return (va >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF


class GuestMemory:
    """The guest's table frames as far as the trace told us.

    Frames are ``bytearray`` pages keyed by frame number; reads and writes
    are ``struct`` operations on them. ``generation`` changes whenever any
    entry or frame changes; ``layout`` only when something other than
    accessed/dirty bits does (callers may cache :meth:`translate` results
    against it: A/D updates by walks cannot change a translation).
    ``layout_log`` says what each ``layout`` step changed (one entry, or a
    whole frame: :meth:`entry_id`, :meth:`frame_id`), so a cache of
    translations can keep those whose walks read none of them.
    """

    #: ``layout_log`` keeps at most about this many steps (the oldest half
    #: is dropped beyond it; ``layout_start`` says from where it is whole).
    LAYOUT_LOG_MAX = 1 << 14
    #: A ``layout_log`` entry meaning "every frame" (WINDOW_OPEN).
    ALL_FRAMES = -1

    @staticmethod
    def entry_id(frame: int, index: int) -> int:
        """The ``layout_log`` id of entry ``index`` of ``frame`` (>= 0)."""
        return frame << 9 | index

    @staticmethod
    def frame_id(frame: int) -> int:
        """The ``layout_log`` id of a whole frame (a SNAPSHOT or UNTRACK:
        below :data:`ALL_FRAMES`, so never an entry's id)."""
        return -2 - frame

    def __init__(self) -> None:
        self.frames: dict[int, bytearray] = {}
        self.generation = 0
        self.layout = 0
        #: The frame of each layout step from ``layout_start`` on: step
        #: ``layout_start + k`` (the change that made ``layout`` that + 1)
        #: changed frame ``layout_log[k]``.
        self.layout_log: list[int] = []
        self.layout_start = 0
        #: TABLE_WRITEs to frames we never saw (ignored).
        self.unknown_writes = 0

    # -- knowledge -------------------------------------------------------
    def snapshot(self, frame: int, page: bytes) -> None:
        """Replace what we know of ``frame`` (a frame number) with ``page``."""
        if len(page) != PAGE_SIZE:
            raise ValueError(f"snapshot of {len(page)} bytes, not {PAGE_SIZE}")
        self.frames[frame] = bytearray(page)
        self.generation += 1
        self._layout_step(-2 - frame)

    def forget_all(self) -> None:
        """WINDOW_OPEN: nothing we knew can be trusted any more."""
        self.frames.clear()
        self.generation += 1
        self._layout_step(self.ALL_FRAMES)

    def forget(self, frame: int) -> bool:
        """UNTRACK: the frame is no table any more (its next SNAPSHOT, if
        any, tells it again). True if it was known."""
        if self.frames.pop(frame, None) is None:
            return False
        self.generation += 1
        self._layout_step(-2 - frame)
        return True

    def _layout_step(self, what: int) -> None:
        self.layout += 1
        log = self.layout_log
        log.append(what)
        if len(log) > self.LAYOUT_LOG_MAX:
            drop = len(log) // 2
            del log[:drop]
            self.layout_start += drop

    def layout_changes(self, since: int) -> list[int] | None:
        """What changed since ``layout`` was ``since``: entry and frame ids
        (:meth:`entry_id`, :meth:`frame_id`; :data:`ALL_FRAMES` for a
        WINDOW_OPEN); None when the log no longer reaches back that far."""
        if since < self.layout_start:
            return None
        return self.layout_log[since - self.layout_start:]

    def known(self, frame: int) -> bool:
        return frame in self.frames

    def read(self, frame: int, index: int) -> int | None:
        """Entry ``index`` of ``frame``, or None if the frame is unknown."""
        page = self.frames.get(frame)
        if page is None:
            return None
        return int(_UNPACK(page, index << 3)[0])

    def entries(self, frame: int) -> list[int] | None:
        """All 512 entries of ``frame`` (a copy), or None if unknown."""
        page = self.frames.get(frame)
        if page is None:
            return None
        return list(struct.unpack_from("<512Q", page))

    def write(self, pa: int, value: int) -> int | None:
        """TABLE_WRITE: store ``value`` at the 8-byte entry at ``pa``.

        Returns the previous value, or None if the frame is unknown (the
        write is then ignored: a partial frame would be worse than none).
        """
        page = self.frames.get(pa >> PAGE_SHIFT)
        if page is None:
            self.unknown_writes += 1
            return None
        off = pa & (PAGE_SIZE - 8)
        old = int(_UNPACK(page, off)[0])
        if old != value:
            _PACK(page, off, value)
            self.generation += 1
            if (old ^ value) & ~_AD:
                self._layout_step((pa & ~7) >> 3)  # entry_id: frame << 9 | index
        return old

    def set_bits(self, frame: int, index: int, bits: int) -> None:
        """OR ``bits`` into an entry (A/D updates); the frame must be known."""
        page = self.frames[frame]
        off = index << 3
        old = _UNPACK(page, off)[0]
        if old & bits != bits:
            _PACK(page, off, old | bits)
            self.generation += 1
            if bits & ~old & ~_AD:
                self._layout_step(frame << 9 | index)

    # -- walking ---------------------------------------------------------
    def walk(
        self,
        cr3: int,
        va: int,
        access: Access = Access.READ,
        user: bool = False,
        *,
        set_ad: bool = True,
    ) -> Walk:
        """Walk the 4-level tables rooted at ``cr3`` for one access.

        On success with ``set_ad`` the accessed bit is set on every level and
        the dirty bit on the leaf of a write (as hardware does; a failing
        walk changes nothing, as in Xen's ``guest_walk_tables``).
        """
        frames_map = self.frames
        frame = (cr3 & CR3_ADDR_MASK) >> PAGE_SHIFT
        frames: list[int] = []
        entries: list[int] = []
        write = access is Access.WRITE
        fetch = access is Access.FETCH
        level = 4
        while True:
            page = frames_map.get(frame)
            if page is None:
                return Walk(WalkStatus.UNKNOWN, va, level, frames, entries)
            index = (va >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF
            entry = _UNPACK(page, index << 3)[0]
            frames.append(frame)
            entries.append(entry)
            reason = FaultReason.NONE
            if not entry & PTE_P:
                reason = FaultReason.NOT_PRESENT
            elif write and not entry & PTE_RW:
                reason = FaultReason.READ_ONLY
            elif user and not entry & PTE_US:
                reason = FaultReason.SUPERVISOR
            elif fetch and entry & PTE_NX:
                reason = FaultReason.NO_EXECUTE
            if reason:
                return Walk(WalkStatus.FAULT, va, level, frames, entries, reason)
            if level == 1 or (level in (2, 3) and entry & PTE_PS):
                break
            frame = (entry & ADDR_MASK) >> PAGE_SHIFT
            level -= 1
        span = PAGE_SHIFT + 9 * (level - 1)
        base = entry & ADDR_MASK & ~((1 << span) - 1)
        gpa = base | (va & ((1 << span) - 1))
        if set_ad:
            for k, fr in enumerate(frames):
                lvl = 4 - k
                bits = PTE_A
                if write and lvl == level:
                    bits |= PTE_D
                if entries[k] & bits != bits:
                    idx = (va >> (PAGE_SHIFT + 9 * (lvl - 1))) & 0x1FF
                    self.set_bits(fr, idx, bits)
                    entries[k] |= bits
        return Walk(WalkStatus.OK, va, level, frames, entries, FaultReason.NONE, gpa)

    def translate(self, cr3: int, va: int, walked: list[int] | None = None) -> int:
        """Guest-physical address of ``va`` ignoring rights, changing nothing
        (for cross-checks): :data:`TRANSLATE_UNKNOWN` if a frame on the path
        is unknown, :data:`TRANSLATE_UNMAPPED` if an entry is not present.
        ``walked``, if given, gets the :meth:`entry_id` of every entry the
        walk read (a translation stays valid until one of them, or its
        frame, changes)."""
        frames_map = self.frames
        frame = (cr3 & CR3_ADDR_MASK) >> PAGE_SHIFT
        span = PAGE_SHIFT + 27  # the VA bits below level 4's index
        while True:
            page = frames_map.get(frame)
            if page is None:
                return TRANSLATE_UNKNOWN
            index = (va >> span) & 0x1FF
            if walked is not None:
                walked.append(frame << 9 | index)
            entry: int = _UNPACK(page, index << 3)[0]
            if not entry & PTE_P:
                return TRANSLATE_UNMAPPED
            # a leaf: level 1, or PS at level 2 or 3
            if span == PAGE_SHIFT or (entry & PTE_PS and span != PAGE_SHIFT + 27):
                mask = (1 << span) - 1
                return (entry & ADDR_MASK & ~mask) | (va & mask)
            frame = (entry & ADDR_MASK) >> PAGE_SHIFT
            span -= 9
