"""Event tools: analyses that say which events they must see one by one.

An event tool (the checks, the plot's counters) is told events through
``on_event(index, kind, vcpu, info, va, pa, val, marker)`` (marker: the
MARKER's ``[name, args...]``, else None), always after the engine has taken
the event. Which events it is told, in trace order:

* every event the engine handles itself: every event that is neither an
  access nor a store into a frame without shadow, and every access the
  replayer hands to the engine that the engine did not find allowed (a
  fault, an access before any CR3) or that is an MMIO access. Engine
  facts, hazards and every counter but ``accesses``, ``events`` and
  ``table_writes`` change only at these;
* of the accesses the replayer takes in bulk (the engine would only count
  them) and of those the engine found allowed (it changed nothing else
  either: no fact, hazard or other counter), those its :class:`Interest`
  names: every access, or those to given guest frames (``pa >> 12``) or at
  given virtual pages (``va >> 12``);
* of the TABLE_WRITEs into frames without shadow (the replayer applies them
  to the guest tables itself: the engine would do nothing else), those its
  interest names: all, those into given frames, or those whose new entry is
  present and points at a given frame (any present large-page entry counts
  as pointing at every frame).

A tool's interest may change only while it is told an event (or in a chunk
observer's hooks): the replayer asks for it again after each ``on_event``.
A tool returns the same :class:`Interest` object while nothing changed, so
asking is cheap. The event-by-event reference path
(``Replayer(fast=False)``) tells every tool every event; what a tool
computes must not depend on the accesses it did not ask for (tests replay
every recorded trace both ways and compare).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from operator import is_
from typing import Protocol

import numpy as np
import numpy.typing as npt

from ..guest.memory import ADDR_MASK, PAGE_SHIFT, PTE_P, PTE_PS


@dataclass(frozen=True)
class Interest:
    """The bulk accesses a tool must be told (beyond the engine's events)."""

    #: Every access.
    accesses: bool = False
    #: Accesses to these guest frames (``pa >> 12``).
    frames: frozenset[int] = field(default_factory=frozenset)
    #: Accesses at these virtual pages (``va >> 12``, all 64 bits).
    pages: frozenset[int] = field(default_factory=frozenset)
    #: Every TABLE_WRITE into a frame without shadow.
    table_writes: bool = False
    #: TABLE_WRITEs into these frames.
    table_frames: frozenset[int] = field(default_factory=frozenset)
    #: TABLE_WRITEs whose new entry is present and points at one of these
    #: frames (or is a present large-page entry).
    link_targets: frozenset[int] = field(default_factory=frozenset)


#: A tool that wants no bulk access.
NO_ACCESSES = Interest()


class EventTool(Protocol):
    """What the replayer needs of an event tool (see the module)."""

    def interest(self) -> Interest: ...

    def on_event(self, index: int, kind: int, vcpu: int, info: int, va: int, pa: int,
                 val: int, marker: list[str] | None) -> None: ...


def is_tool(obj: object) -> bool:
    """Whether ``obj`` is an event tool (has both methods)."""
    return callable(getattr(obj, "on_event", None)) and callable(getattr(obj, "interest", None))


class ToolSet:
    """The replayer's tools and their joint interest.

    :meth:`refresh` re-reads every tool's interest (cheap when none changed);
    :meth:`select` picks, from a run of bulk accesses, the ones some tool
    wants; :meth:`wants` answers for one access."""

    def __init__(self, tools: Iterable[EventTool] = ()) -> None:
        self.tools: list[EventTool] = list(tools)
        self._seen: list[Interest] = []
        #: The tools' bound methods (asked once per event: looked up once).
        self._interests: list[Callable[[], Interest]] = [t.interest for t in self.tools]
        self._on_events: list[Callable[..., None]] = [t.on_event for t in self.tools]
        self.any = False
        self.all = False
        #: Bumped whenever the joint interest changes.
        self.version = 0
        self.frames: frozenset[int] = frozenset()
        self.pages: frozenset[int] = frozenset()
        #: Some tool wants some TABLE_WRITEs into frames without shadow.
        self.tw_any = False
        self.tw_all = False
        self.tw_frames: frozenset[int] = frozenset()
        self.tw_links: frozenset[int] = frozenset()
        self._frames_np: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        self._pages_np: npt.NDArray[np.uint64] = np.zeros(0, dtype=np.uint64)
        self.refresh()

    def add(self, tool: EventTool) -> None:
        if not any(t is tool for t in self.tools):
            self.tools.append(tool)
            self._interests.append(tool.interest)
            self._on_events.append(tool.on_event)
            self.refresh()

    def __bool__(self) -> bool:
        return bool(self.tools)

    def refresh(self) -> None:
        """Read the tools' interests again; rebuild the joint one if any changed."""
        now = [f() for f in self._interests]
        if len(now) == len(self._seen) and all(map(is_, now, self._seen)):
            return
        self._seen = now
        self.version += 1
        self.all = any(i.accesses for i in now)
        self.frames = frozenset().union(*(i.frames for i in now))
        self.pages = frozenset().union(*(i.pages for i in now))
        self.any = self.all or bool(self.frames) or bool(self.pages)
        self.tw_all = any(i.table_writes for i in now)
        self.tw_frames = frozenset().union(*(i.table_frames for i in now))
        self.tw_links = frozenset().union(*(i.link_targets for i in now))
        self.tw_any = self.tw_all or bool(self.tw_frames) or bool(self.tw_links)
        self._frames_np = np.array(sorted(self.frames), dtype=np.uint64)
        self._pages_np = np.array(sorted(self.pages), dtype=np.uint64)

    def tell(self, index: int, kind: int, vcpu: int, info: int, va: int, pa: int, val: int,
             marker: list[str] | None) -> None:
        """Tell every tool one event, then read their interests again."""
        for on_event in self._on_events:
            on_event(index, kind, vcpu, info, va, pa, val, marker)
        self.refresh()

    def wants(self, frame: int, page: int) -> bool:
        """Whether some tool wants the access to ``frame`` at virtual ``page``."""
        return self.all or frame in self.frames or page in self.pages

    def wants_table_write(self, frame: int, value: int) -> bool:
        """Whether some tool wants a TABLE_WRITE of ``value`` into ``frame``
        (a frame without shadow)."""
        if self.tw_all or frame in self.tw_frames:
            return True
        if not value & PTE_P or not self.tw_links:
            return False
        return bool(value & PTE_PS) or (value & ADDR_MASK) >> PAGE_SHIFT in self.tw_links

    def select(self, frames: npt.NDArray[np.uint64], pages: npt.NDArray[np.uint64]
               ) -> npt.NDArray[np.intp]:
        """Positions (into the two arrays, one entry per access) some tool wants."""
        if self.all:
            return np.arange(len(frames), dtype=np.intp)
        hit = np.zeros(len(frames), dtype=bool)
        if len(self._frames_np):
            hit |= np.isin(frames, self._frames_np)
        if len(self._pages_np):
            hit |= np.isin(pages, self._pages_np)
        return np.flatnonzero(hit)
