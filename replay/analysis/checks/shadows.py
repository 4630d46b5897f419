"""Checks whose evidence is the engine's shadows and facts: C1 (critical), C5 (as-table), C8.

A shadow L1 entry pointing at a frame in S is followed up the engine's
parent links to every L4 shadow that reaches it (C1 critical under a
non-secure root); a secure frame shadowed as a table is C5; a prefetched
entry for a frame in S never accessed there is C8.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import numpy as np

from ...guest.memory import PAGE_SHIFT
from ...shadow.types import FL1, L1, L4, SH_ADDR, SH_P, Fact, ShadowType
from ...trace import format as fmt
from ..secure import canonical_va
from .base import CheckerBase
from .scan import _ADDR, _ONE, _SHIFT

_FETCH = int(fmt.Kind.FETCH)

#: Most shadow paths followed up from one shadow entry.
MAX_UP_PATHS: Final = 64


class ShadowChecks(CheckerBase):
    """C1 (shadow), C5 (as-table), C8: from the engine's facts and parent links."""

    # ------------------------------------------------------------------ #
    # Shadow facts: C1 (shadow), C5 (as-table), C8                         #
    # ------------------------------------------------------------------ #
    def _scan_shadows_for_secure(self, index: int, vcpu: int) -> None:
        """After a registration: shadow L1 entries that already map S."""
        S = self.registry.frames
        if not S:
            return
        want = np.array(sorted(S), dtype=np.uint64)
        for key, sh in self._eng().shadows.items():
            if key[1] not in (L1, FL1):
                if key[0] in S:
                    self._as_table(index, vcpu, key[0], int(key[1]))
                continue
            arr = np.array(sh.entries, dtype=np.uint64)
            present = (arr & _ONE) != 0
            targets = (arr & _ADDR) >> _SHIFT
            for i in np.flatnonzero(present & np.isin(targets, want)).tolist():
                self._sec_sh[(key, i)] = int(targets[i])
        self._c1_shadow_all(index, vcpu)

    def _handle_facts(self, facts: list[Fact], index: int, vcpu: int, va: int,
                      kind: int) -> None:
        S = self.registry.frames
        linked = False
        for f in facts:
            if f.kind == "propagated":
                if f.type <= 1:
                    key = (f.frame, ShadowType(f.type))
                    target = (f.value & SH_ADDR) >> PAGE_SHIFT
                    if f.value & SH_P and target in S:
                        self._sec_sh[(key, f.entry)] = target
                        self._c1_shadow(index, vcpu, key, f.entry, target)
                        if f.reason == "prefetch" and kind <= _FETCH:
                            self._c8(index, vcpu, va, f, target)
                    else:
                        self._sec_sh.pop((key, f.entry), None)
                elif f.value & SH_P:
                    linked = True
            elif f.kind == "destroyed":
                key = (f.frame, ShadowType(f.type))
                if f.type <= 1:
                    self._sec_sh = {k: v for k, v in self._sec_sh.items() if k[0] != key}
            elif f.kind == "created" and f.frame in S and f.type != int(FL1):
                self._as_table(index, vcpu, f.frame, f.type)
        if linked and self._sec_sh:
            self._c1_shadow_all(index, vcpu)

    def _as_table(self, index: int, vcpu: int, frame: int, stype: int) -> None:
        self._add("C5", "critical", index, vcpu, self._vcpu_cr3(vcpu), None, [frame], [],
                  f"secure frame {frame:#x} is shadowed as an L{stype} page table",
                  kind="as-table")

    def _c1_shadow_all(self, index: int, vcpu: int) -> None:
        for (key, i), frame in list(self._sec_sh.items()):
            self._c1_shadow(index, vcpu, key, i, frame)

    def _up(self, key: tuple[int, ShadowType], index: int) -> Iterator[tuple[int, int, list[int]]]:
        """(root, VA, shadow frames L4..L1) for every L4 shadow reaching
        entry ``index`` of shadow ``key``."""
        parents = self._eng().parents
        out = 0
        stack: list[tuple[tuple[int, ShadowType], int, list[int]]] = [
            (key, index << PAGE_SHIFT, [key[0]])]
        while stack and out < MAX_UP_PATHS:
            k, va, path = stack.pop()
            if k[1] == L4:
                out += 1
                yield k[0], canonical_va(va), path
                continue
            for pk, i in parents.get(k, ()):
                shift = PAGE_SHIFT + 9 * (int(pk[1]) - 1)
                stack.append((pk, va | i << shift, [pk[0], *path]))

    def _c1_shadow(self, index: int, vcpu: int, key: tuple[int, ShadowType], i: int,
                   frame: int) -> None:
        R = self.registry.roots
        for root, va, path in self._up(key, i):
            if root in R:
                continue
            f = self._seen("C1", "critical", "shadow", (frame,), root)
            if f is not None:
                continue
            self._add("C1", "critical", index, vcpu, root << PAGE_SHIFT, va, [frame], path,
                      f"secure frame {frame:#x} is mapped at {va:#x} in the shadow of "
                      f"non-secure root {root:#x}", kind="shadow")

    def _c8(self, index: int, vcpu: int, va: int, f: Fact, frame: int) -> None:
        pva = canonical_va((va & ~0x1F_FFFF) | f.entry << PAGE_SHIFT)
        if (pva, frame) in self._accessed:
            return
        cr3 = self._vcpu_cr3(vcpu)
        path = [k[0] for k, _i, _e in self._eng().shadow_path(vcpu, pva)]
        self._add("C8", "high", index, vcpu, cr3, pva, [frame], path,
                  f"prefetch (fault at {va:#x}) put secure frame {frame:#x} into the shadow "
                  f"at {pva:#x}, never accessed there", kind="prefetch")
