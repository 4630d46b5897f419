"""Secure-page leak checks C1-C8 (``shared/LEAK-CHECKS.md``) over a replay.

A :class:`Checker` watches a :class:`~replay.driver.replayer.Replayer` run as
one of its event tools (:mod:`replay.driver.tools`: the events the engine
handles, and the accesses to secure frames and to VAs waiting to be
resolved), the engine's facts (``ShadowEngine.on_fact``), its hazards,
and the guest table model. It keeps
the secure specification (:class:`~replay.analysis.secure.SecureRegistry`) up to date
from spec strings and trace markers, and produces :class:`Finding` records::

    engine = ShadowEngine(config)
    checker = Checker(engine, secure=["root:0x2864000"], policy=False)
    replayer = Replayer(engine, tools=[checker])
    replayer.run(reader)
    checker.finish(replayer.stats)      # stats: for C7
    checker.findings, checker.summary()

(or ``Checker(specs=...)`` then ``checker.attach(replayer)``, which also
makes it one of the replayer's tools; then
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

from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

from ...driver.replayer import Replayer, ReplayStats
from ...driver.tools import Interest
from ...guest.memory import PAGE_SHIFT, WalkStatus, cr3_root
from ...shadow.config import EngineConfig
from ...shadow.engine import ShadowEngine
from ...shadow.types import L4, Fact
from ...trace import format as fmt
from ...trace.reader import TraceReader
from ..secure import PendingVa, Spec, canonical_va
from ..until import Until
from .accesses import AccessChecks
from .findings import CHECKS, SEVERITIES, Finding
from .guest_tables import GuestTableChecks
from .hazards import HazardChecks
from .shadows import ShadowChecks

_K = fmt.Kind
_FETCH = int(_K.FETCH)
_CR3_KINDS: Final = (int(_K.CR3_WRITE), int(_K.CR3_CURRENT))


class Checker(HazardChecks, AccessChecks, ShadowChecks, GuestTableChecks):
    """Runs the leak checks over one replay (see the module docstring).

    :param engine: the engine to watch (or attach later with :meth:`attach`).
    :param specs: parsed secure specs (:func:`replay.analysis.secure.parse_specs`).
    :param secure: spec strings, parsed here (with ``console``, the console
        log, for ``console:`` specs on a trace without console events;
        ``console_events``: the trace has them); markers in the trace add
        to both.
    :param policy: policy mode: refuse propagating a leaf of a frame in S
        while the vCPU (as Xen knows it: the CR3 it last intercepted) is not
        secure, and list the accesses that would then fault.
    :param max_policy_faults: how many :class:`PolicyFault` samples to keep.
    """

    # ------------------------------------------------------------------ #
    # Wiring                                                               #
    # ------------------------------------------------------------------ #
    def attach(self, target: ShadowEngine | Replayer) -> None:
        """Hook into an engine (or a replayer's engine) before the replay.

        Given a replayer, becomes one of its event tools (given an engine,
        the caller passes the checker to the replayer's ``tools``); sets
        ``engine.refuse_leaf`` in policy mode, and routes engine facts to
        the checker: as ``engine.on_fact`` when there is none, added to a
        fact hub (anything with ``add``), else chained after the existing
        callback. The checker is itself a fact sink (callable); a fact
        delivered twice is taken once. Given a replayer, :meth:`finish`
        takes C7 from its stats.
        """
        if isinstance(target, Replayer):
            self.replayer = target
            target.add_tool(self)
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
        eng.facts_wanted()
        if self.policy:
            eng.refuse_leaf = self._refuse
        self._take_hazards()

    def wants_fact(self, kind: str) -> bool:
        """Fact sink: facts are kept only while a frame is registered (see
        :meth:`__call__`), or all go on to a chained sink; on_event asks the
        engine again when that changes (``ShadowEngine.facts_wanted``)."""
        return bool(self.registry.frames) or self._chained is not None

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

    # ------------------------------------------------------------------ #
    # The event hook                                                       #
    # ------------------------------------------------------------------ #
    def interest(self) -> Interest:
        """Event tool: besides the engine's events, the accesses to frames in
        S (C2) and, while VAs wait to be resolved, those at their pages (all
        accesses until the first one when no start marker came first); of
        the stores into frames without shadow, those into tables a scan
        covers or secure-only tables, and, while something is registered,
        those that link a watched frame (see ``_table_write``)."""
        reg = self.registry
        key = (reg.version, self._start_seen,
               tuple(p.va for p in reg.pending if p.armed) if reg.pending else (),
               self._tables_version, self._watch_version, reg.active)
        if key != self._interest_key:
            self._interest_key = key
            active = reg.active
            self._interest = Interest(
                accesses=bool(reg.pending) and not self._start_seen,
                frames=frozenset(reg.frames),
                pages=frozenset(va >> PAGE_SHIFT for va in key[2]),
                table_frames=frozenset(self._frame_roots).union(
                    self._secure_only if active else ()),
                link_targets=self._watched if active else frozenset())
        return self._interest

    def on_event(self, index: int, kind: int, vcpu: int, info: int, va: int, pa: int,
                 val: int, marker: list[str] | None) -> None:
        """Event tool: called after the engine took event ``index``."""
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
            self._tables_version += 1
            self._sec_sh.clear()
        elif kind in _CR3_KINDS and reg.active:
            root = cr3_root(val)
            scan = self._scans.get(root)
            if scan is None or not self._fresh(scan):
                self._evaluate([root], index, vcpu)
        if len(self._eng().hazards) > self._hazards_seen:
            self._take_hazards()
        if bool(reg.frames) is not self._took_facts:
            # frames came or went: the engine asks again which facts to make
            self._took_facts = bool(reg.frames)
            self._eng().facts_wanted()

    # ------------------------------------------------------------------ #
    # Registration                                                         #
    # ------------------------------------------------------------------ #
    def _marker(self, index: int, vcpu: int, marker: list[str]) -> None:
        reg = self.registry
        words = marker[0].split() if marker else []
        name = words[0] if words else ""
        if name == fmt.MARKER_CONSOLE:
            for line in self._console.feed(marker):  # every part, for whole lines
                self._console_line(index, vcpu, line)
            return
        if reg.frames:
            self._end_frames(reg.ending_at_marker(name), index, vcpu)
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

    def _console_line(self, index: int, vcpu: int, line: str) -> None:
        """A console line completed at ``index``: it may end registrations
        (``@until:REGEX``) and start ``console:`` ones."""
        reg = self.registry
        if reg.frames:
            self._end_frames(reg.ending_at_line(line), index, vcpu)
        reg.pending = [p for p in reg.pending
                       if p.until is None or not p.until.ends_at_line(line, p.va)]
        for spec, va in reg.console_starts(line, index):
            self._resolve_va(index, vcpu, va, f"{spec.text} -> {canonical_va(va):#x}", None,
                             until=spec.until)
        self._registration_changed(index, vcpu)

    def _end_frames(self, frames: list[int], index: int, vcpu: int) -> None:
        """End these frames' registrations at ``index`` (their ``@until``)."""
        if not frames:
            return
        # catch changes made while registered before the intervals close
        self._evaluate(self._loaded_roots(), index, vcpu)
        for f in frames:
            self.registry.end_frame(f, index)
        ended = set(frames)
        self._sec_sh = {k: f for k, f in self._sec_sh.items() if f not in ended}
        self._registration_changed(index, vcpu)

    def _resolve_armed(self, index: int, vcpu: int) -> None:
        still = []
        for p in self.registry.pending:
            if p.armed and self._resolve_va(index, vcpu, p.va, p.source, None, quiet=True,
                                            until=p.until):
                continue
            still.append(p)
        changed = len(still) != len(self.registry.pending)
        self.registry.pending = still
        if changed:
            self._registration_changed(index, vcpu)

    def _resolve_va(self, index: int, vcpu: int, va: int, source: str, pa: int | None,
                    *, quiet: bool = False, until: Until | None = None) -> bool:
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
                self.registry.pending.append(PendingVa(va, "", source, armed=True, until=until))
            return False
        self.registry.add_frame(frame, index, source, va=canonical_va(va), until=until)
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
            self._resolve_va(index, vcpu, p.va, p.source, pa, until=p.until)
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
            self._tables_version += 1
            return
        self._scan_shadows_for_secure(index, vcpu)
        roots = set(self._loaded_roots())
        roots.update(k[0] for k in self._eng().shadows if k[1] == L4)
        self._evaluate(sorted(roots), index, vcpu)

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
                # the last event the replay fed (tools are not told them all)
                self._evaluate(roots, self._eng()._event, -1)
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
            "unresolved": [p.source for p in self.registry.pending] + [
                f"{s.text}: no console line matched" for s in self.registry.console_specs
                if s.text not in self.registry.console_matched],
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
