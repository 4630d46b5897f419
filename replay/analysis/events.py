"""The events of interest of a replay, collected as it runs (for ``events.parquet``).

Kept: every non-access event, every access at which the engine produced a
fact (a shadow fault that did something), every access to a watched page.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import numpy.typing as npt

from ..shadow.types import Fact
from ..trace import format as fmt
from ..trace.reader import Chunk


class EventTable:
    """Collects the events of interest while the replay runs.

    Kept: every non-access event, every access at which the engine produced
    a fact (a shadow fault that did something), every access to a watched
    page. At most ``max_rows`` rows; ``truncated`` tells when more were
    left out. Plug it as a fact sink and as a :func:`~replay.driver.hub.drive`
    observer.
    """

    COLUMNS = ("index", "kind", "vcpu", "info", "va", "pa", "pc", "val")

    def __init__(self, max_rows: int = 1_000_000, watched: Callable[[], Iterable[int]] = list
                 ) -> None:
        self.max_rows = max_rows
        self.watched = watched
        self.rows = 0
        self.truncated = False
        self._parts: dict[str, list[npt.NDArray[Any]]] = {c: [] for c in self.COLUMNS}
        self._faulted: list[npt.NDArray[np.bool_]] = []
        self._fact_events: set[int] = set()

    def __call__(self, fact: Fact) -> None:
        self._fact_events.add(fact.event)

    def after_chunk(self, chunk: Chunk) -> None:
        facts = self._fact_events
        self._fact_events = set()
        if chunk.n == 0 or self.rows >= self.max_rows:
            self.truncated |= chunk.n > 0
            return
        faulted = np.zeros(chunk.n, dtype=bool)
        if facts:
            rel = np.fromiter((e - chunk.first for e in facts), dtype=np.int64, count=len(facts))
            rel = rel[(rel >= 0) & (rel < chunk.n)]
            faulted[rel] = True
        keep = (chunk.kind > fmt.Kind.FETCH) | faulted
        pages = list(self.watched())
        if pages:
            pg = np.array(pages, dtype=np.uint64)
            keep |= np.isin(chunk.va >> np.uint64(12), pg) & (chunk.kind <= fmt.Kind.FETCH)
        idx = np.flatnonzero(keep)
        room = self.max_rows - self.rows
        if len(idx) > room:
            idx = idx[:room]
            self.truncated = True
        self.rows += len(idx)
        self._parts["index"].append(idx.astype(np.uint64) + np.uint64(chunk.first))
        for c in self.COLUMNS[1:]:
            self._parts[c].append(getattr(chunk, c)[idx])
        self._faulted.append(faulted[idx])

    def columns(self) -> dict[str, npt.NDArray[Any]]:
        out: dict[str, npt.NDArray[Any]] = {}
        dtypes = {"index": np.uint64, "kind": np.uint8, "vcpu": np.uint8, "info": np.uint8}
        for c in self.COLUMNS:
            parts = self._parts[c]
            out[c] = np.concatenate(parts) if parts else np.zeros(0, dtypes.get(c, np.uint64))
        out["faulted"] = np.concatenate(self._faulted) if self._faulted else np.zeros(0, bool)
        return out
