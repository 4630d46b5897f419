"""Driving a replay: the fact hub and the chunk loop with observers.

:class:`FactHub` fans the engine's one fact stream out to several
consumers; :func:`drive` is :meth:`Replayer.run <replay.driver.replayer.Replayer.run>`
with observers (:class:`ChunkObserver`) called around each chunk's feed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from ..shadow.types import Fact
from ..trace.reader import Chunk
from .replayer import Replayer, ReplayStats, fewer_collections
from .tools import is_tool


class FactHub:
    """Fan one engine fact stream out to several consumers.

    A sink with a ``FACT_KINDS`` attribute (a set of :attr:`Fact.kind`
    values) is handed only the facts of those kinds; others get every fact.
    Each sink gets its facts in the order the engine made them."""

    def __init__(self, *sinks: Callable[[Fact], None]) -> None:
        self.sinks: list[Callable[[Fact], None]] = []
        #: fact kind -> the sinks that take it, in order (made on first use)
        self._routes: dict[str, list[Callable[[Fact], None]]] = {}
        for sink in sinks:
            self.add(sink)

    def add(self, sink: Callable[[Fact], None]) -> None:
        self.sinks.append(sink)
        self._routes.clear()

    def wants_fact(self, kind: str) -> bool:
        """Whether a sink takes facts of ``kind`` now: one that answers
        ``wants_fact`` itself says, else its ``FACT_KINDS`` (none: all)
        (:meth:`ShadowEngine.facts_wanted <replay.shadow.state.EngineState.facts_wanted>`)."""
        for sink in self.sinks:
            ask = getattr(sink, "wants_fact", None)
            if ask is not None:
                if ask(kind):
                    return True
            else:
                kinds = getattr(sink, "FACT_KINDS", None)
                if kinds is None or kind in kinds:
                    return True
        return False

    def __call__(self, fact: Fact) -> None:
        route = self._routes.get(fact.kind)
        if route is None:
            route = self._routes[fact.kind] = [
                s for s in self.sinks
                if getattr(s, "FACT_KINDS", None) is None
                or fact.kind in getattr(s, "FACT_KINDS", ())]
        for sink in route:
            sink(fact)


class ChunkObserver:
    """Hooks :func:`drive` calls: once before the first chunk, and around
    each chunk (each optional)."""

    def start_replay(self, replayer: Replayer) -> None:  # noqa: B027
        pass

    def before_chunk(self, chunk: Chunk) -> None:  # noqa: B027
        pass

    def after_chunk(self, chunk: Chunk) -> None:  # noqa: B027
        pass


def drive(
    replayer: Replayer,
    chunks: Iterable[Chunk],
    observers: Iterable[Any] = (),
    on_chunk: Callable[[Chunk], None] | None = None,
) -> ReplayStats:
    """:meth:`Replayer.run` with hooks: each observer's ``start_replay``
    (when it has one) is told the replayer before the first chunk; its
    ``before_chunk`` and ``after_chunk`` (when it has them) run right around
    the chunk's feed, so the engine state they see is that of the chunk's
    start and end. An observer that is an event tool
    (:func:`~replay.driver.tools.is_tool`) is also added to the replayer's
    tools."""
    obs = list(observers)
    for o in obs:
        if is_tool(o):
            replayer.add_tool(o)
    for o in obs:
        if hasattr(o, "start_replay"):
            o.start_replay(replayer)
    before = [o.before_chunk for o in obs if hasattr(o, "before_chunk")]
    after = [o.after_chunk for o in obs if hasattr(o, "after_chunk")]
    with fewer_collections():
        it = iter(chunks)
        cur = next(it, None)
        while cur is not None:
            nxt = next(it, None)
            following = int(nxt.kind[0]) if nxt is not None and nxt.n else None
            for b in before:
                b(cur)
            replayer.feed(cur, following)
            for a in after:
                a(cur)
            if on_chunk is not None:
                on_chunk(cur)
            cur = nxt
    return replayer.stats
