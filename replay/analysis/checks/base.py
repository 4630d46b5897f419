"""The checker's state, and what every group of checks reads.

:class:`CheckerBase` builds the state of a
:class:`~replay.analysis.checks.checker.Checker` (``__init__``), records
findings (de-duplicated) and answers per-vCPU questions (which CR3, which
roots are loaded). The checks are grouped by where their evidence comes
from, each a class over this state that the Checker composes:
``guest_tables.py`` (C1 high, C3, C4, C5 from the guest tables),
``shadows.py`` (C1 critical, C5 as-table, C8 from the engine's facts and
shadows), ``accesses.py`` (C2 and policy mode, from the accesses) and
``hazards.py`` (C6 from the engine's hazards, C7 from the replayer's
cross-check).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ...driver.replayer import Replayer
from ...driver.tools import NO_ACCESSES, Interest
from ...guest.memory import cr3_root
from ...shadow.engine import ShadowEngine
from ...shadow.types import Fact, ShadowType
from ..console import ConsoleLines
from ..secure import SecureRegistry, Spec, parse_specs
from .findings import Finding, PolicyFault
from .scan import RootScan


class CheckerBase:
    """The state of the leak checks (see :class:`~replay.analysis.checks.checker.Checker`)."""

    def __init__(self, engine: ShadowEngine | None = None, *, specs: Iterable[Spec] = (),
                 secure: Iterable[str] = (), console: str | None = None,
                 console_events: bool = False, policy: bool = False,
                 max_policy_faults: int = 20) -> None:
        self.registry = SecureRegistry.from_specs(
            [*specs, *parse_specs(secure, console, console_events=console_events)])
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
        #: Whether frames were registered when the engine last asked
        #: which facts the checker takes (``wants_fact``).
        self._took_facts = False
        self._hazards_seen = 0
        self._chained: Any = None
        self._finished = False
        self._c7_done = False
        self._start_seen = False
        #: interest(): the key it was built from, and the object
        self._interest_key: tuple[Any, ...] | None = None
        self._interest: Interest = NO_ACCESSES
        #: The console lines, assembled from the trace's console markers.
        self._console = ConsoleLines()
        # guest-table scans
        self._scans: dict[int, RootScan] = {}
        self._frame_roots: dict[int, set[int]] = {}
        #: Bumped when _frame_roots or _secure_only changes (interest()).
        self._tables_version = 0
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

    def _loaded_roots(self) -> list[int]:
        out = []
        for v in self._eng().vcpus:
            if v.cr3 is not None and cr3_root(v.cr3) not in out:
                out.append(cr3_root(v.cr3))
        return out

    if TYPE_CHECKING:
        # checker.py
        def attach(self, target: ShadowEngine | Replayer) -> None: ...
