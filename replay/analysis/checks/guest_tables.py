"""Checks whose evidence is the guest's own page tables: C1 (high), C3, C4, C5.

Each root's tables are scanned (:func:`~replay.analysis.checks.scan.scan_root`)
and the scan cached; a root is evaluated when a registration changes, when
a CR3 write loads it, when a table write links a watched frame into it, at
``secure-end`` and at the end. C1 is critical instead of high when the
root's shadow maps the frame too.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from ...guest.memory import ADDR_MASK, PAGE_SHIFT, PTE_P, PTE_PS
from ...shadow.types import FL1, L1, L4, SH_ADDR, SH_FL1, SH_P, ShadowType
from ..secure import canonical_va
from .base import CheckerBase
from .scan import Leaf, RootScan, scan_root


class GuestTableChecks(CheckerBase):
    """C1 (guest), C3, C4, C5: from the guest tables reachable from each root."""

    # ------------------------------------------------------------------ #
    # Guest-table checks: C1 (guest), C3, C4, C5                           #
    # ------------------------------------------------------------------ #
    def _fresh(self, scan: RootScan) -> bool:
        return scan.version == self._watch_version

    def _scan(self, root: int) -> RootScan:
        scan = self._scans.get(root)
        if scan is not None and self._fresh(scan):
            return scan
        scan = scan_root(self._eng().guest, root, self._watched_arr, self._watch_version)
        self._scans[root] = scan
        for t in scan.tables:
            self._frame_roots.setdefault(t, set()).add(root)
        self._tables_version += 1
        return scan

    def _dirty(self, frame: int) -> None:
        roots = self._frame_roots.pop(frame, None)
        if roots:
            self._tables_version += 1
            for r in roots:
                self._scans.pop(r, None)

    def _set_watch(self) -> None:
        watched = frozenset(self.registry.frames) | frozenset(self._secure_tables)
        if watched != self._watched:
            self._watched = watched
            self._watched_arr = np.array(sorted(watched), dtype=np.uint64)
            self._watch_version += 1

    def _evaluate(self, roots: Iterable[int], index: int, vcpu: int) -> None:
        reg = self.registry
        if not reg.active:
            return
        S = reg.frames
        R = reg.roots
        # the secure roots' tables first (they are part of what is watched)
        for _ in range(2):
            self._set_watch()
            sec: set[int] = set()
            for r in R:
                sec.update(self._scan(r).tables)
            if sec == self._secure_tables:
                break
            self._secure_tables = sec
        self._set_watch()
        todo = sorted(set(roots), key=lambda r: (r not in R, r))
        scans = {r: self._scan(r) for r in todo}
        ns_tables: set[int] = set()
        for r, s in self._scans.items():
            if r not in R and self._fresh(s):
                ns_tables.update(s.tables)
        self._secure_only = self._secure_tables - ns_tables
        self._tables_version += 1
        sec_scans = [self._scan(r) for r in R]
        for r, scan in scans.items():
            secure = r in R
            cr3 = r << PAGE_SHIFT
            holder = self._holder(r)
            for lf in scan.leaves:
                if lf.frame in S:
                    self._c4(index, holder, r, scan, lf)
                    if not secure:
                        self._c1_guest(index, holder, r, scan, lf)
                elif (not secure and lf.writable and lf.frame in self._secure_only):
                    self._add("C5", "critical", index, holder, cr3, lf.va, [lf.frame],
                              scan.path(lf.table),
                              f"table frame {lf.frame:#x} of a secure root is writable through "
                              f"non-secure root {r:#x} at {lf.va:#x}", kind="writable")
            for t in scan.tables:
                if t in S:
                    self._add("C5", "critical", index, holder, cr3, None, [t], scan.path(t),
                              f"secure frame {t:#x} is used as a page table "
                              f"(L{scan.tables[t][0]}) by root {r:#x}", kind="as-table")
            if not secure and self._secure_tables:
                self._c3(index, holder, r, scan, sec_scans)

    def _c1_guest(self, index: int, vcpu: int, root: int, scan: RootScan, lf: Leaf) -> None:
        in_shadow = self._shadow_maps(root, lf.va, lf.frame)
        sev = "critical" if in_shadow else "high"
        where = "guest tables and shadow" if in_shadow else "guest tables"
        self._add("C1", sev, index, vcpu, root << PAGE_SHIFT, lf.va, [lf.frame],
                  scan.path(lf.table),
                  f"secure frame {lf.frame:#x} is mapped at {lf.va:#x} in the {where} "
                  f"of non-secure root {root:#x}", kind="shadow" if in_shadow else "guest")

    def _c4(self, index: int, vcpu: int, root: int, scan: RootScan, lf: Leaf) -> None:
        iv = self.registry.frames.get(lf.frame)
        home = iv.va if iv is not None and iv.va is not None else None
        if home is None:
            home = self._homes.setdefault(lf.frame, lf.va)
        if lf.va == home:
            return
        registered = iv is not None and iv.va is not None
        why = (f"outside its registered VA {home:#x}" if registered
               else f"at a second VA besides {home:#x}")
        self._add("C4", "high", index, vcpu, root << PAGE_SHIFT, lf.va, [lf.frame],
                  scan.path(lf.table),
                  f"secure frame {lf.frame:#x} is mapped at {lf.va:#x} in root {root:#x}, {why}",
                  kind="alias")

    def _c3(self, index: int, vcpu: int, root: int, scan: RootScan,
            sec_scans: list[RootScan]) -> None:
        S = self.registry.frames
        shared = scan.tables.keys() & self._secure_tables
        shared.discard(root)
        if not shared:
            return
        # which table frames lead to a leaf of a frame in S (either side)
        s_chain: dict[int, set[int]] = {}
        for sc in [scan, *sec_scans]:
            for lf in sc.leaves:
                if lf.frame in S:
                    for t in sc.path(lf.table):
                        s_chain.setdefault(t, set()).add(lf.frame)
        for t in sorted(shared):
            p = scan.parent.get(t)
            if p is not None and p in shared:
                continue  # report the topmost shared frame only
            level, va_base, _, _ = scan.tables[t]
            mapped = sorted(s_chain.get(t, ()))
            owners = [s.root for s in sec_scans if t in s.tables] or [-1]
            if mapped:
                self._add("C3", "critical", index, vcpu, root << PAGE_SHIFT,
                          canonical_va(va_base), [t, *mapped], scan.path(t),
                          f"L{level} table frame {t:#x} is shared by secure root "
                          f"{owners[0]:#x} and non-secure root {root:#x} and its subtree "
                          f"maps secure frame(s) {', '.join(f'{m:#x}' for m in mapped)}",
                          kind="shared")
            else:
                self._add("C3", "info", index, vcpu, root << PAGE_SHIFT,
                          canonical_va(va_base), [t], scan.path(t),
                          f"L{level} table frame {t:#x} is shared by secure root "
                          f"{owners[0]:#x} and non-secure root {root:#x} (no secure frame "
                          "below it)", kind="shared")

    def _shadow_maps(self, root: int, va: int, frame: int) -> bool:
        """Does the shadow of ``root`` map ``va`` to ``frame`` (present)?"""
        shadows = self._eng().shadows
        sh = shadows.get((root, L4))
        level = 4
        while sh is not None:
            e = sh.entries[(va >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF]
            if not e & SH_P:
                return False
            target = (e & SH_ADDR) >> PAGE_SHIFT
            if level == 1:
                return target == frame
            if level == 2:
                sh = shadows.get((target, FL1 if e & SH_FL1 else L1))
            else:
                sh = shadows.get((target, ShadowType(level - 1)))
            level -= 1
        return False

    def _table_write(self, index: int, vcpu: int, pa: int, val: int) -> None:
        frame = pa >> PAGE_SHIFT
        reg = self.registry
        affected = self._frame_roots.get(frame)
        affected = set(affected) if affected else set()
        self._dirty(frame)
        if not reg.active:
            return
        if frame in self._secure_only and not self._secure_vcpu(vcpu):
            cr3 = self._vcpu_cr3(vcpu)
            self._add("C5", "critical", index, vcpu, cr3, None, [frame], [],
                      f"table frame {frame:#x} of a secure root is written while vCPU "
                      f"{vcpu} is not secure", kind="written")
        if val & PTE_P:
            # a new link to a watched frame (S or a secure table): look now
            target = (val & ADDR_MASK) >> PAGE_SHIFT
            hit = target in self._watched or (bool(val & PTE_PS) and any(
                target <= w < target + (1 << 18) for w in self._watched))
            if hit:
                self._evaluate(affected | set(self._loaded_roots()), index, vcpu)
