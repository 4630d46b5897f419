"""What a timeline records: path episodes, their levels, guest-side events.

The records :class:`~replay.analysis.timeline.Timeline` builds (pure data):
for a watched VA, a :class:`VaTimeline` with its :class:`PathEpisode` s (one
per root whose shadow path to it became complete, eight
:class:`LevelRecord` s each, every one with its :class:`Birth`) and the
guest-side :class:`GuestEvent` s of its page.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..guest.memory import PAGE_SHIFT

#: Type names as they appear in records (``fl1``, ``l1`` .. ``l4``).
TYPE_NAMES: dict[int, str] = {0: "fl1", 1: "l1", 2: "l2", 3: "l3", 4: "l4"}
#: The eight rows of a path, top down.
LEVELS: tuple[str, ...] = ("L4", "L4e", "L3", "L3e", "L2", "L2e", "L1", "L1e")


class Birth(NamedTuple):
    """When and why a shadow or a shadow entry came to exist."""

    event: int
    reason: str
    vcpu: int
    cr3: int | None
    pc: int
    #: The va column of the event (the faulting access, the store ...).
    va: int
    #: The entry's value when it appeared (0 for a shadow).
    value: int
    #: The kind of that event (``read``, ``write``, ``fetch``, ``table_write``,
    #: ``cr3_write`` ...; "" when the event was not in the chunk at hand).
    access: str = ""


@dataclass(eq=False)
class LevelRecord:
    """One level of a shadow path as one root saw it."""

    level: str
    frame: int
    type: str
    #: Entry index (entry rows), None for shadow rows.
    index: int | None
    birth: Birth
    #: Already built from another root: it existed before this root's L4
    #: entry linked the path, or was built while the guest ran another root.
    shared: bool = False
    #: (event, reason) when it went away.
    destroyed: tuple[int, str] | None = None
    #: Later changes of an entry's flags: (event, reason, value), bounded.
    changes: list[tuple[int, str, int]] = field(default_factory=list)
    episode: PathEpisode | None = field(default=None, repr=False)


@dataclass(eq=False)
class PathEpisode:
    """A complete shadow path for a watched VA under one root."""

    va: int
    root: int
    #: The event that completed the path, its vCPU and that vCPU's CR3.
    complete_event: int
    vcpu: int
    cr3: int | None
    levels: list[LevelRecord]
    #: (event, reason, level) of the first level that went away.
    ended: tuple[int, str, str] | None = None

    def row(self, level: str) -> LevelRecord:
        return self.levels[LEVELS.index(level)]


@dataclass
class GuestEvent:
    """A guest-side event of a watched page."""

    event: int
    kind: str
    vcpu: int
    cr3: int | None
    pc: int
    va: int
    pa: int
    val: int = 0
    #: For table writes: the level (4..1) of the guest table written.
    level: int | None = None
    #: What the engine did at this event (facts, summarised), bounded.
    effects: list[str] = field(default_factory=list)


@dataclass
class VaTimeline:
    """Everything recorded for one watched VA."""

    va: int
    episodes: list[PathEpisode] = field(default_factory=list)
    episodes_dropped: int = 0
    first_access: GuestEvent | None = None
    first_write: GuestEvent | None = None
    accesses: int = 0
    table_writes: list[GuestEvent] = field(default_factory=list)
    table_writes_total: int = 0

    @property
    def page(self) -> int:
        return self.va >> PAGE_SHIFT

    def answer(self) -> dict[str, Any]:
        """When the leaf of this VA was first built, relative to its first
        access: ``first-access`` (built by that very event), ``before-first-
        access`` (prefetch, validation or another root got there first),
        ``after-first-access`` (the first access did not build it, e.g. an
        unknown walk), or ``never``."""
        if not self.episodes:
            built = None
        else:
            built = min((e.row("L1e").birth for e in self.episodes), key=lambda b: b.event)
        first = self.first_access
        if built is None:
            when = "never"
        elif first is None:
            when = "no-access"
        elif built.event == first.event:
            when = "first-access"
        elif built.event < first.event:
            when = "before-first-access"
        else:
            when = "after-first-access"
        return {
            "when": when,
            "leaf_event": None if built is None else built.event,
            "leaf_reason": None if built is None else built.reason,
            "leaf_pc": None if built is None else built.pc,
            "first_access_event": None if first is None else first.event,
        }
