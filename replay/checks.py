"""Secure-page leak checks C1-C8 (``shared/LEAK-CHECKS.md``) over a replay.

A :class:`Checker` watches a :class:`~replay.replayer.Replayer` run: the
events that reach the engine (``ShadowEngine.after_event``, which the
replayer calls), the engine's facts (``ShadowEngine.on_fact``), its hazards,
and the guest table model. It keeps
the secure specification (:class:`~replay.secure.SecureRegistry`) up to date
from spec strings and trace markers, and produces :class:`Finding` records::

    engine = ShadowEngine(config)
    checker = Checker(engine, secure=["root:0x2864000"], policy=False)
    replayer = Replayer(engine)
    replayer.run(reader)
    checker.finish(replayer.stats)      # stats: for C7
    checker.findings, checker.summary()

(or ``Checker(specs=...)`` then ``checker.attach(replayer)``; then
``finish()`` finds the stats itself; :func:`check_file` does it all).

Cost model. Nothing runs per event while no frame or root is registered
except a few dict look-ups. While something is registered:

* C2 (access to a frame in S) and C5 (table write) are dict look-ups per
  access / table write.
* The guest-table checks (C1 high, C3, C4, C5) scan one root's tables with
  numpy (:class:`RootScan`) and cache the result; a scan is redone only when
  a table frame it covers is written or snapshotted, or S / the secure
  tables change. Roots are evaluated when a registration changes (every
  root that has an L4 shadow or sits in a CR3), when a CR3 write loads a
  root, when a table write puts a secure frame in a scanned table, at
  ``secure-end`` and at the end of the trace.
* C1 critical and C8 come from engine facts: a shadow L1 entry pointing at a
  frame in S is followed up the engine's parent links to every L4 shadow
  that reaches it.

Findings are de-duplicated on (check, severity, kind, frames, root): a repeat
only raises ``count``; ``event`` is the first occurrence.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from .driver.replayer import Replayer, ReplayStats
from .guest.memory import (
    ADDR_MASK,
    PAGE_SHIFT,
    PTE_P,
    PTE_PS,
    PTE_RW,
    PTE_US,
    GuestMemory,
    WalkStatus,
    cr3_root,
)
from .secure import PendingVa, SecureRegistry, Spec, canonical_va, parse_specs
from .shadow.config import EngineConfig
from .shadow.engine import ShadowEngine
from .shadow.types import FL1, L1, L4, SH_ADDR, SH_FL1, SH_P, Fact, Fetch, ShadowType
from .trace import format as fmt
from .trace.reader import TraceReader

CHECKS: Final = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8")
SEVERITIES: Final = ("info", "medium", "high", "critical", "config-error")
#: Hazard kinds LEAK-CHECKS.md names for C6 (high); other hazards are info.
C6_HIGH: Final = frozenset({
    "oos-stale", "oos-other-vcpus", "vtlb-live", "no-shadow-for-target", "target-not-pinned",
})
#: Most shadow paths followed up from one shadow entry.
MAX_UP_PATHS: Final = 64

_K = fmt.Kind
_READ, _WRITE, _FETCH = int(_K.READ), int(_K.WRITE), int(_K.FETCH)
_CR3_KINDS: Final = (int(_K.CR3_WRITE), int(_K.CR3_CURRENT))
_ADDR = np.uint64(ADDR_MASK)
_SHIFT = np.uint64(PAGE_SHIFT)
_ONE = np.uint64(PTE_P)
_PS = np.uint64(PTE_PS)


@dataclass
class Finding:
    """One check result (de-duplicated: ``count`` occurrences, ``event`` the first)."""

    check: str
    severity: str
    event: int
    vcpu: int
    cr3: int | None
    va: int | None
    frames: list[int]
    path: list[int]
    message: str
    count: int = 1
    #: Sub-kind (C1 "guest"/"shadow", C5 "writable"/"written"/"as-table",
    #: C6 the hazard kind, ...); part of the de-duplication key.
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = [f"event {self.event}"]
        if self.vcpu >= 0:
            where.append(f"vcpu {self.vcpu}")
        if self.cr3 is not None:
            where.append(f"cr3 {self.cr3:#x}")
        if self.va is not None:
            where.append(f"va {self.va:#x}")
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"{self.check} {self.severity}: {self.message} [{', '.join(where)}]{times}"


@dataclass
class PolicyFault:
    """Policy mode: an access whose leaf the policy refused (it would fault)."""

    event: int
    vcpu: int
    cr3: int | None
    va: int | None
    frame: int


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


class Checker:
    """Runs the leak checks over one replay (see the module docstring).

    :param engine: the engine to watch (or attach later with :meth:`attach`).
    :param specs: parsed secure specs (:func:`replay.secure.parse_specs`).
    :param secure: spec strings, parsed here (with ``console`` for
        ``console:`` specs); markers in the trace add to both.
    :param policy: policy mode: refuse propagating a leaf of a frame in S
        while the vCPU (as Xen knows it: the CR3 it last intercepted) is not
        secure, and list the accesses that would then fault.
    :param max_policy_faults: how many :class:`PolicyFault` samples to keep.
    """

    def __init__(self, engine: ShadowEngine | None = None, *, specs: Iterable[Spec] = (),
                 secure: Iterable[str] = (), console: str | None = None,
                 policy: bool = False, max_policy_faults: int = 20) -> None:
        self.registry = SecureRegistry.from_specs([*specs, *parse_specs(secure, console)])
        self.policy = policy
        self.max_policy_faults = max_policy_faults
        self.engine: ShadowEngine | None = None
        self.replayer: Replayer | None = None
        self._findings: dict[tuple[Any, ...], Finding] = {}
        #: Policy mode results.
        self.policy_faults: list[PolicyFault] = []
        self.policy_refused_demand = 0
        self.policy_refused_other = 0
        self._policy_pending: list[tuple[int, int, int]] = []
        # replay state
        self._event = -1
        self._cr3_log: dict[int, tuple[list[int], list[int]]] = {}
        self._facts: list[Fact] = []
        self._last_fact: Fact | None = None
        self._hazards_seen = 0
        self._chained: Any = None
        self._finished = False
        self._c7_done = False
        self._start_seen = False
        # guest-table scans
        self._scans: dict[int, RootScan] = {}
        self._frame_roots: dict[int, set[int]] = {}
        self._watch_version = 0
        self._watched: frozenset[int] = frozenset()
        self._watched_arr: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        self._reg_version = -1
        self._secure_tables: set[int] = set()
        self._secure_only: set[int] = set()
        #: First VA seen for a frame in S without a registered VA (C4).
        self._homes: dict[int, int] = {}
        # shadow state: (shadow key, index) -> secure frame it maps
        self._sec_sh: dict[tuple[tuple[int, ShadowType], int], int] = {}
        #: (VA page, frame) of accesses to secure frames (C8 "accessed").
        self._accessed: set[tuple[int, int]] = set()
        if engine is not None:
            self.attach(engine)

    # ------------------------------------------------------------------ #
    # Wiring                                                               #
    # ------------------------------------------------------------------ #
    def attach(self, target: ShadowEngine | Replayer) -> None:
        """Hook into an engine (or a replayer's engine) before the replay.

        Sets ``engine.after_event`` (the Replayer calls it per event),
        ``engine.refuse_leaf`` in policy mode, and routes engine facts to
        the checker: as ``engine.on_fact`` when there is none, added to a
        fact hub (anything with ``add``), else chained after the existing
        callback. The checker is itself a fact sink (callable); a fact
        delivered twice is taken once. Given a replayer, :meth:`finish`
        takes C7 from its stats.
        """
        if isinstance(target, Replayer):
            self.replayer = target
            eng = target.engine
        else:
            eng = target
        if self.engine is eng:
            return
        self.engine = eng
        sink = eng.on_fact
        if sink is None:
            eng.on_fact = self
        elif hasattr(sink, "add"):
            sink.add(self)
        else:
            self._chained = sink
            eng.on_fact = self
        eng._facts_on = True  # facts must flow even with record_facts off
        eng.after_event = self.on_event
        if self.policy:
            eng.refuse_leaf = self._refuse
        self._take_hazards()

    def __call__(self, fact: Fact) -> None:
        """Fact sink (``ShadowEngine.on_fact`` or a fact hub)."""
        if fact is self._last_fact:
            return
        self._last_fact = fact
        if self.registry.frames:
            self._facts.append(fact)
        if self._chained is not None:
            self._chained(fact)

    @property
    def findings(self) -> list[Finding]:
        """All findings, by event then check."""
        return sorted(self._findings.values(),
                      key=lambda f: (f.event, f.check, f.kind, f.frames, f.cr3 or 0))

    def by_check(self, check: str) -> list[Finding]:
        return [f for f in self.findings if f.check == check]

    def _eng(self) -> ShadowEngine:
        assert self.engine is not None, "Checker.attach() first"
        return self.engine

    # ------------------------------------------------------------------ #
    # Recording findings                                                   #
    # ------------------------------------------------------------------ #
    def _add(self, check: str, severity: str, event: int, vcpu: int, cr3: int | None,
             va: int | None, frames: list[int], path: list[int], message: str,
             kind: str = "", count: int = 1) -> Finding:
        key = (check, severity, kind, tuple(frames), cr3_root(cr3) if cr3 is not None else None)
        f = self._findings.get(key)
        if f is not None:
            f.count += count
            return f
        f = Finding(check, severity, event, vcpu, cr3, va, list(frames), list(path), message,
                    count, kind)
        self._findings[key] = f
        return f

    def _seen(self, check: str, severity: str, kind: str, frames: tuple[int, ...],
              root: int | None) -> Finding | None:
        return self._findings.get((check, severity, kind, frames, root))

    # ------------------------------------------------------------------ #
    # Per-vCPU state                                                       #
    # ------------------------------------------------------------------ #
    def _vcpu_cr3(self, vcpu: int) -> int | None:
        vs = self._eng().vcpus
        return vs[vcpu].cr3 if vcpu < len(vs) else None

    def _secure_vcpu(self, vcpu: int) -> bool:
        cr3 = self._vcpu_cr3(vcpu)
        return cr3 is not None and cr3_root(cr3) in self.registry.roots

    def cr3_at(self, vcpu: int, event: int) -> int | None:
        """The CR3 ``vcpu`` held at ``event`` (from the CR3 events seen)."""
        log = self._cr3_log.get(vcpu)
        if log is None:
            return None
        k = bisect.bisect_right(log[0], event) - 1
        return log[1][k] if k >= 0 else None

    def _holder(self, root: int) -> int:
        for i, v in enumerate(self._eng().vcpus):
            if v.cr3 is not None and cr3_root(v.cr3) == root:
                return i
        return -1

    # ------------------------------------------------------------------ #
    # The event hook                                                       #
    # ------------------------------------------------------------------ #
    def on_event(self, index: int, kind: int, vcpu: int, info: int, va: int, pa: int,
                 val: int, marker: list[str] | None) -> None:
        """Replayer hook: called after the engine processed event ``index``."""
        self._event = index
        reg = self.registry
        if kind in _CR3_KINDS:
            log = self._cr3_log.setdefault(vcpu, ([], []))
            log[0].append(index)
            log[1].append(val)
        elif kind == _K.MARKER and marker is not None:
            self._marker(index, vcpu, marker)
        if self._policy_pending:
            self._policy_flush(index, vcpu, va, kind)
        if self._facts:
            facts, self._facts = self._facts, []
            if reg.frames:
                self._handle_facts(facts, index, vcpu, va, kind)
        if kind <= _FETCH:
            if reg.pending:
                self._resolve_on_access(index, vcpu, va, pa)
            if reg.frames:
                frame = pa >> PAGE_SHIFT
                if frame in reg.frames:
                    self._c2(index, vcpu, va, frame)
        elif kind == _K.TABLE_WRITE:
            self._table_write(index, vcpu, pa, val)
        elif kind == _K.SNAPSHOT:
            self._dirty(pa >> PAGE_SHIFT)
        elif kind == _K.WINDOW_OPEN:
            self._scans.clear()
            self._frame_roots.clear()
            self._sec_sh.clear()
        elif kind in _CR3_KINDS and reg.active:
            root = cr3_root(val)
            scan = self._scans.get(root)
            if scan is None or not self._fresh(scan):
                self._evaluate([root], index, vcpu)
        if len(self._eng().hazards) > self._hazards_seen:
            self._take_hazards()

    # ------------------------------------------------------------------ #
    # Registration                                                         #
    # ------------------------------------------------------------------ #
    def _marker(self, index: int, vcpu: int, marker: list[str]) -> None:
        reg = self.registry
        words = marker[0].split() if marker else []
        name = words[0] if words else ""
        if name == fmt.MARKER_START:
            self._start_seen = True
        if reg.pending:
            for p in reg.pending:
                if not p.armed and p.anchor == name:
                    p.armed = True
            self._resolve_armed(index, vcpu)
        if name == fmt.MARKER_SECURE_END and reg.active:
            # catch changes made while registered before the intervals close
            self._evaluate(self._loaded_roots(), index, vcpu)
        res = reg.marker(index, marker)
        if res is None:
            return
        what, values = res
        if what == "va":
            for va in values:
                self._resolve_va(index, vcpu, va, f"marker {' '.join(marker)}", None)
        elif what == "end":
            ended = set(values)
            self._sec_sh = {k: f for k, f in self._sec_sh.items() if f not in ended}
        self._registration_changed(index, vcpu)

    def _resolve_armed(self, index: int, vcpu: int) -> None:
        still = []
        for p in self.registry.pending:
            if p.armed and self._resolve_va(index, vcpu, p.va, p.source, None, quiet=True):
                continue
            still.append(p)
        changed = len(still) != len(self.registry.pending)
        self.registry.pending = still
        if changed:
            self._registration_changed(index, vcpu)

    def _resolve_va(self, index: int, vcpu: int, va: int, source: str, pa: int | None,
                    *, quiet: bool = False) -> bool:
        """Register the frame behind ``va``: from ``pa`` if given (an access),
        else by walking the guest tables (this vCPU's CR3 first)."""
        frame: int | None = None
        if pa is not None:
            frame = pa >> PAGE_SHIFT
        else:
            eng = self._eng()
            cands = [vcpu] + [i for i in range(len(eng.vcpus)) if i != vcpu]
            for i in cands:
                cr3 = self._vcpu_cr3(i)
                if cr3 is None:
                    continue
                w = eng.guest.walk(cr3, va, set_ad=False)
                if w.status is WalkStatus.OK:
                    frame = w.gfn
                    break
        if frame is None:
            if not quiet:
                # a secure-va marker whose walk fails: wait for an access
                self.registry.pending.append(PendingVa(va, "", source, armed=True))
            return False
        self.registry.add_frame(frame, index, source, va=canonical_va(va))
        return True

    def _resolve_on_access(self, index: int, vcpu: int, va: int, pa: int) -> None:
        reg = self.registry
        page = va & ~0xFFF
        if not self._start_seen:
            # no start marker before the first access: "start" anchors here
            self._start_seen = True
            for p in reg.pending:
                if p.anchor == fmt.MARKER_START:
                    p.armed = True
            self._resolve_armed(index, vcpu)
        hit = [p for p in reg.pending if p.armed and p.va == page]
        if not hit:
            return
        for p in hit:
            self._resolve_va(index, vcpu, p.va, p.source, pa)
        reg.pending = [p for p in reg.pending if p not in hit]
        self._registration_changed(index, vcpu)

    def _registration_changed(self, index: int, vcpu: int) -> None:
        reg = self.registry
        if reg.version == self._reg_version:
            return
        self._reg_version = reg.version
        if not reg.active:
            self._secure_tables = set()
            self._secure_only = set()
            return
        self._scan_shadows_for_secure(index, vcpu)
        roots = set(self._loaded_roots())
        roots.update(k[0] for k in self._eng().shadows if k[1] == L4)
        self._evaluate(sorted(roots), index, vcpu)

    def _loaded_roots(self) -> list[int]:
        out = []
        for v in self._eng().vcpus:
            if v.cr3 is not None and cr3_root(v.cr3) not in out:
                out.append(cr3_root(v.cr3))
        return out

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
        return scan

    def _dirty(self, frame: int) -> None:
        roots = self._frame_roots.pop(frame, None)
        if roots:
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

    # ------------------------------------------------------------------ #
    # C2                                                                   #
    # ------------------------------------------------------------------ #
    def _c2(self, index: int, vcpu: int, va: int, frame: int) -> None:
        self._accessed.add((va & ~0xFFF, frame))
        if self._secure_vcpu(vcpu):
            return
        cr3 = self._vcpu_cr3(vcpu)
        root = cr3_root(cr3) if cr3 is not None else None
        f = self._seen("C2", "critical", "", (frame,), root)
        if f is not None:
            f.count += 1
            return
        path: list[int] = []
        if cr3 is not None:
            path = self._eng().guest.walk(cr3, va, set_ad=False).frames
        self._add("C2", "critical", index, vcpu, cr3, va, [frame], path,
                  f"vCPU {vcpu} accessed secure frame {frame:#x} at {va:#x} with "
                  f"non-secure root {root:#x}" if root is not None else
                  f"vCPU {vcpu} accessed secure frame {frame:#x} at {va:#x} with no known CR3")

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

    # ------------------------------------------------------------------ #
    # C6, C7                                                               #
    # ------------------------------------------------------------------ #
    def _take_hazards(self) -> None:
        hz = self._eng().hazards
        for h in hz[self._hazards_seen:]:
            if h.kind == "too-many-cr3-targets":
                self._add("C6", "config-error", h.event, h.vcpu, None, None, [], [],
                          f"CR3-target list: {h.detail}", kind=h.kind)
                continue
            sev = "high" if h.kind in C6_HIGH else "info"
            self._add("C6", sev, h.event, h.vcpu, h.root << PAGE_SHIFT, None, [h.root], [],
                      f"exit-less switch to root {h.root:#x}: {h.kind}: {h.detail}",
                      kind=h.kind)
        self._hazards_seen = len(hz)

    def _c7(self, stats: ReplayStats) -> None:
        reg = self.registry
        for m in stats.mismatches:
            tf = m.trace_pa >> PAGE_SHIFT
            mf = m.model_pa >> PAGE_SHIFT if m.model_pa >= 0 else None
            frames = [tf] if mf is None else [tf, mf]
            secure = any(reg.frame_secure_at(fr, m.event) for fr in frames)
            model = "unmapped" if mf is None else f"{m.model_pa:#x}"
            self._add("C7", "high" if secure else "medium", m.event, m.vcpu,
                      self.cr3_at(m.vcpu, m.event), m.va, frames, [],
                      f"the guest reached {m.trace_pa:#x} at {m.va:#x}, the model's walk "
                      f"gives {model}" + (" (a secure frame)" if secure else ""),
                      kind="mismatch")

    # ------------------------------------------------------------------ #
    # Policy mode                                                          #
    # ------------------------------------------------------------------ #
    def _refuse(self, vcpu: int, target: int, ft: Fetch) -> bool:
        reg = self.registry
        if target not in reg.frames:
            return False
        vs = self._eng().vcpus
        xcr3 = vs[vcpu].xen_cr3 if vcpu < len(vs) else None
        if xcr3 is not None and cr3_root(xcr3) in reg.roots:
            return False
        if ft is Fetch.PREFETCH:
            self.policy_refused_other += 1
        else:
            self.policy_refused_demand += 1
            self._policy_pending.append((vcpu, target, int(ft)))
        return True

    def _policy_flush(self, index: int, vcpu: int, va: int, kind: int) -> None:
        for v, frame, _ft in self._policy_pending:
            if len(self.policy_faults) < self.max_policy_faults:
                self.policy_faults.append(PolicyFault(
                    index, v, self._vcpu_cr3(v), va if kind <= _FETCH else None, frame))
        self._policy_pending = []

    # ------------------------------------------------------------------ #
    # End                                                                  #
    # ------------------------------------------------------------------ #
    def finish(self, stats: ReplayStats | None = None) -> list[Finding]:
        """End of trace: last evaluation, C6 hazards, C7 from the replayer."""
        if self._finished:
            return self.findings
        self._finished = True
        if self.engine is not None:
            self._take_hazards()
            if self.registry.active:
                roots = set(self._loaded_roots())
                roots.update(k[0] for k in self._eng().shadows if k[1] == L4)
                self._evaluate(roots, self._event, -1)
        if stats is None and self.replayer is not None:
            stats = self.replayer.stats
        if stats is not None:
            self._c7(stats)
            self._c7_done = True
        return self.findings

    def summary(self) -> dict[str, Any]:
        """Counts by check and severity, plus policy results and the spec."""
        by_check: dict[str, int] = dict.fromkeys(CHECKS, 0)
        by_sev: dict[str, int] = dict.fromkeys(SEVERITIES, 0)
        table: dict[str, dict[str, int]] = {}
        for f in self._findings.values():
            by_check[f.check] += 1
            by_sev[f.severity] += 1
            row = table.setdefault(f.check, {})
            row[f.severity] = row.get(f.severity, 0) + 1
        out: dict[str, Any] = {
            "findings": len(self._findings),
            "occurrences": sum(f.count for f in self._findings.values()),
            "by_check": by_check,
            "by_severity": by_sev,
            "by_check_severity": table,
            "secure_frames": [
                {"frame": iv.value, "from": iv.start, "to": iv.end, "va": iv.va,
                 "source": iv.source} for iv in self.registry.intervals()],
            "secure_roots": [
                {"root": iv.value, "from": iv.start, "to": iv.end, "source": iv.source}
                for r in sorted(self.registry.root_history)
                for iv in self.registry.root_history[r]],
            "unresolved": [p.source for p in self.registry.pending],
            "warnings": [f"event {e}: {w}" for e, w in self.registry.warnings],
        }
        out["c7_run"] = self._c7_done
        if self.policy:
            out["policy"] = {
                "refused_demand": self.policy_refused_demand,
                "refused_other": self.policy_refused_other,
                "faults": [asdict(p) for p in self.policy_faults],
            }
        return out


def check_file(path: str | Path, specs: Iterable[Spec] = (), config: EngineConfig | None = None,
               *, policy: bool = False, dedup: bool = True,
               allow_truncated: bool = False) -> tuple[Checker, ShadowEngine, ReplayStats]:
    """Replay a trace file with the checks on; returns the finished checker."""
    with TraceReader(path, allow_truncated=allow_truncated) as reader:
        if config is None:
            config = EngineConfig.for_trace(reader.header)
        replayer = Replayer(ShadowEngine(config), dedup=dedup)
        checker = Checker(specs=specs, policy=policy)
        checker.attach(replayer)
        stats = replayer.run(reader)
        checker.finish(stats)
        return checker, replayer.engine, stats
