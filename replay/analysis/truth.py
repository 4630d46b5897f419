"""The rebuilt tables against QEMU's own view (``replay --truth``).

A capture pauses the guest after the stop marker and keeps, beside the
trace, each vCPU's CR3 and QEMU's ``info tlb`` (``NAME.truth.json.gz``,
:func:`replay.paths.side_paths`): the mappings the real page tables held.
After a replay, the guest model holds the tables rebuilt from the trace
alone (snapshots, table stores, untracks). This module walks the model's
tables for every page ``info tlb`` lists, under the CR3 QEMU had, and
counts where they agree: the evidence that the trace lets the replayer
rebuild every table it needs.

The capture pauses the guest when it reads the stop marker's console line,
so the walk is made when the replay reaches the stop marker
(:class:`TruthAtStop`), not at the trace's end: a whole-run capture
(``--window all``) goes on recording after it until power-off (seed: 1.4 M
events more, whose processes replace the paused one's tables; at the end 98
of 74,407 pages differed, at the stop marker 2). The guest still runs a
little between the stop marker and the pause (the next step starts, say),
so a few pages may differ without a fault in the capture: the report gives
the counts and samples, the reader judges. A trace without a stop marker
is checked at its end.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..driver.tools import NO_ACCESSES, Interest
from ..errors import UsageError
from ..guest.memory import (
    CR3_ADDR_MASK,
    PAGE_SHIFT,
    TRANSLATE_UNKNOWN,
    TRANSLATE_UNMAPPED,
    GuestMemory,
)
from ..trace import format as fmt

_MARKER = int(fmt.Kind.MARKER)
#: One ``info tlb`` line of x86-64 QEMU: ``VA: PA FLAGS`` (hex, 16 digits).
_LINE = re.compile(r"^([0-9a-f]{16}): ([0-9a-f]{16}) ", re.MULTILINE)
#: Samples of disagreeing pages kept per vCPU.
MAX_SAMPLES = 20


@dataclass
class TruthCheck:
    """One vCPU's ``info tlb`` against the model's walk under the same CR3."""

    vcpu: int
    cr3: int
    #: Pages ``info tlb`` lists.
    pages: int = 0
    #: ... that the model maps to the same frame,
    agree: int = 0
    #: ... that it maps elsewhere or not at all,
    differ: int = 0
    #: ... and whose walk reaches a frame the trace never described.
    unknown: int = 0
    #: (va, QEMU's pa, the model's pa or None) of some that differ.
    samples: list[tuple[int, int, int | None]] = field(default_factory=list)
    #: The vCPU's CR3 at the trace's end (None: not given or never loaded).
    #: Another value than ``cr3`` means the guest switched address space
    #: between the window's end and the pause: the pages of a root built
    #: after the trace ended cannot agree.
    trace_cr3: int | None = None
    #: The event (the stop marker) at which the tables were walked; None:
    #: at the trace's end (no stop marker).
    event: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "vcpu": self.vcpu, "cr3": f"{self.cr3:#x}",
            "trace_cr3": None if self.trace_cr3 is None else f"{self.trace_cr3:#x}",
            "event": self.event, "pages": self.pages,
            "agree": self.agree, "differ": self.differ, "unknown": self.unknown,
            "samples": [{"va": f"{va:#x}", "qemu": f"{pa:#x}",
                         "model": None if m is None else f"{m:#x}"}
                        for va, pa, m in self.samples],
        }


def read_truth(path: Path) -> dict[str, Any]:
    """The ground-truth file of a capture (one clear error if unreadable)."""
    try:
        with gzip.open(path, "rt") as f:
            truth: Any = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"{path}: no ground truth beside the trace (a capture writes it "
                         "after the stop marker)") from None
    except (OSError, EOFError, ValueError) as e:
        raise UsageError(f"{path}: not a ground-truth file ({e})") from None
    if (not isinstance(truth, dict) or not isinstance(truth.get("cr3"), list)
            or not isinstance(truth.get("tlb"), list)
            or len(truth["cr3"]) != len(truth["tlb"])):
        raise UsageError(f"{path}: not a ground-truth file (wants lists 'cr3' and 'tlb' "
                         "of one length)")
    return truth


class TruthAtStop:
    """Event tool (:mod:`replay.driver.tools`): walks the tables when the
    replay reaches the first ``stop`` marker, where the capture paused the
    guest; :meth:`result` walks them at the end if there was none."""

    def __init__(self, engine: Any, truth: dict[str, Any]) -> None:
        self.engine = engine
        self.truth = truth
        self.checks: list[TruthCheck] | None = None

    def interest(self) -> Interest:
        return NO_ACCESSES

    def on_event(self, index: int, kind: int, vcpu: int, info: int, va: int, pa: int,
                 val: int, marker: list[str] | None) -> None:
        if self.checks is None and kind == _MARKER and marker and marker[0] == "stop":
            self.checks = self._walk(index)

    def result(self) -> list[TruthCheck]:
        return self.checks if self.checks is not None else self._walk(None)

    def _walk(self, event: int | None) -> list[TruthCheck]:
        return check_truth(self.engine.guest, self.truth,
                           [v.cr3 for v in self.engine.vcpus], event)


def check_truth(guest: GuestMemory, truth: dict[str, Any],
                trace_cr3: Sequence[int | None] = (),
                event: int | None = None) -> list[TruthCheck]:
    """Each vCPU's ``info tlb`` pages walked in the model's tables;
    ``trace_cr3[v]``: vCPU v's CR3 then, if known; ``event``: where in the
    trace that is (None: its end)."""
    checks = []
    for vcpu, (cr3, tlb) in enumerate(zip(truth["cr3"], truth["tlb"], strict=True)):
        last = trace_cr3[vcpu] if vcpu < len(trace_cr3) else None
        check = TruthCheck(vcpu, int(cr3) & CR3_ADDR_MASK,
                           trace_cr3=None if last is None else last & CR3_ADDR_MASK,
                           event=event)
        for m in _LINE.finditer(str(tlb)):
            va, pa = int(m.group(1), 16), int(m.group(2), 16)
            check.pages += 1
            model = guest.translate(check.cr3, va)
            if model == TRANSLATE_UNKNOWN:
                check.unknown += 1
            elif model != TRANSLATE_UNMAPPED and model >> PAGE_SHIFT == pa >> PAGE_SHIFT:
                check.agree += 1
            else:
                check.differ += 1
                if len(check.samples) < MAX_SAMPLES:
                    check.samples.append(
                        (va, pa, None if model == TRANSLATE_UNMAPPED else model))
        checks.append(check)
    return checks
