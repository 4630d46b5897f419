"""The guest tables reachable from one root, scanned with numpy (:class:`RootScan`).

The guest-table checks (C1 high, C3, C4, C5) read a root's scan, cached
until a table frame it covers is written or snapshotted, or what is watched
changes (:mod:`replay.analysis.checks.guest_tables`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ...guest.memory import ADDR_MASK, PAGE_SHIFT, PTE_P, PTE_PS, PTE_RW, PTE_US, GuestMemory
from ..secure import canonical_va

_ADDR = np.uint64(ADDR_MASK)
_SHIFT = np.uint64(PAGE_SHIFT)
_ONE = np.uint64(PTE_P)
_PS = np.uint64(PTE_PS)


@dataclass
class Leaf:
    """A leaf in a root's guest tables covering a watched frame."""

    va: int
    frame: int
    level: int
    table: int
    writable: bool


@dataclass
class RootScan:
    """The guest tables reachable from one root, as far as they are known."""

    root: int
    version: int
    #: Table frame -> (level, VA base, writable path, user path), first path found.
    tables: dict[int, tuple[int, int, bool, bool]]
    #: Table frame -> the table frame that links it (first found).
    parent: dict[int, int]
    #: Leaves covering watched frames (S and the secure roots' tables), by VA.
    leaves: list[Leaf]
    #: Table frames on the path that were never snapshotted.
    unknown: int

    def path(self, frame: int) -> list[int]:
        """Table frames from the root down to ``frame``."""
        out = [frame]
        while out[-1] in self.parent and len(out) < 5:
            out.append(self.parent[out[-1]])
        return out[::-1]


def scan_root(guest: GuestMemory, root: int, watched: npt.NDArray[np.uint64],
              version: int) -> RootScan:
    """Walk every present entry reachable from ``root`` (numpy per table)."""
    frames = guest.frames
    tables: dict[int, tuple[int, int, bool, bool]] = {root: (4, 0, True, True)}
    parent: dict[int, int] = {}
    leaves: list[Leaf] = []
    unknown = 0
    stack = [root]
    have_watch = len(watched) > 0
    while stack:
        frame = stack.pop()
        level, base, rw, us = tables[frame]
        page = frames.get(frame)
        if page is None:
            unknown += 1
            continue
        arr = np.frombuffer(page, dtype="<u8")
        idx = np.flatnonzero(arr & _ONE)
        if not len(idx):
            continue
        ents = arr[idx]
        shift = PAGE_SHIFT + 9 * (level - 1)
        if level == 1:
            if have_watch:
                targets = (ents & _ADDR) >> _SHIFT
                hit = np.flatnonzero(np.isin(targets, watched))
                for j in hit.tolist():
                    e = int(ents[j])
                    leaves.append(Leaf(canonical_va(base | int(idx[j]) << shift),
                                       int(targets[j]), 1, frame, rw and bool(e & PTE_RW)))
            continue
        # PS marks a leaf at L2/L3 only (reserved at L4)
        ps = (ents & _PS) != 0 if level in (2, 3) else np.zeros(len(ents), dtype=bool)
        if have_watch and ps.any():
            span = 1 << (9 * (level - 1))
            sp_idx, sp_ent = idx[ps], ents[ps]
            first = ((sp_ent & _ADDR) >> _SHIFT) & ~np.uint64(span - 1)
            lo = np.searchsorted(watched, first)
            hi = np.searchsorted(watched, first + np.uint64(span))
            for j in np.flatnonzero(hi > lo).tolist():
                e, i, f0 = int(sp_ent[j]), int(sp_idx[j]), int(first[j])
                for w in watched[int(lo[j]):int(hi[j])].tolist():
                    va = canonical_va(base | i << shift | (int(w) - f0) << PAGE_SHIFT)
                    leaves.append(Leaf(va, int(w), level, frame, rw and bool(e & PTE_RW)))
        tb = ~ps
        for i, e in zip(idx[tb].tolist(), ents[tb].tolist(), strict=True):
            child = (e & ADDR_MASK) >> PAGE_SHIFT
            if child in tables:
                continue
            tables[child] = (level - 1, base | i << shift, rw and bool(e & PTE_RW),
                             us and bool(e & PTE_US))
            parent[child] = frame
            stack.append(child)
    leaves.sort(key=lambda lf: (lf.va, lf.frame))
    return RootScan(root, version, tables, parent, leaves, unknown)
