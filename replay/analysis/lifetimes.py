"""Every shadow's life: when and why it was created and destroyed.

A consumer of the engine's fact stream (a sink of the
:class:`~replay.driver.hub.FactHub`), bounded; ``shadows.parquet`` is made
from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..shadow.types import Fact
from .episodes import TYPE_NAMES


@dataclass
class Lifetime:
    frame: int
    type: str
    created: int
    created_reason: str
    destroyed: int | None = None
    destroyed_reason: str | None = None


class ShadowLifetimes:
    """Every shadow's life (created / destroyed event and reason), bounded:
    after ``max_rows`` finished lives only ``dropped`` counts."""

    #: The facts it takes (replay.driver.hub.FactHub hands it no others).
    FACT_KINDS = frozenset({"created", "destroyed", "reset"})

    def __init__(self, max_rows: int = 1_000_000) -> None:
        self.max_rows = max_rows
        self.rows: list[Lifetime] = []
        self.dropped = 0
        self._live: dict[tuple[int, int], tuple[int, str]] = {}

    def __call__(self, f: Fact) -> None:
        kind = f.kind
        if kind == "created":
            self._live[(f.frame, f.type)] = (f.event, f.reason)
        elif kind == "destroyed":
            born = self._live.pop((f.frame, f.type), None)
            self._end(f.frame, f.type, born, f.event, f.reason)
        elif kind == "reset":
            for (frame, stype), born in self._live.items():
                self._end(frame, stype, born, f.event, "window")
            self._live.clear()

    def _end(self, frame: int, stype: int, born: tuple[int, str] | None, event: int,
             reason: str) -> None:
        if len(self.rows) >= self.max_rows:
            self.dropped += 1
            return
        ev, why = born if born is not None else (-1, "unknown")
        self.rows.append(Lifetime(frame, TYPE_NAMES[stype], ev, why, event, reason))

    def all_rows(self) -> list[Lifetime]:
        """Finished lives, then the shadows still alive (destroyed None)."""
        live = [Lifetime(fr, TYPE_NAMES[t], ev, why) for (fr, t), (ev, why) in self._live.items()]
        room = max(0, self.max_rows - len(self.rows))
        return self.rows + live[:room]

    @property
    def truncated(self) -> bool:
        return self.dropped > 0 or len(self._live) + len(self.rows) > self.max_rows
