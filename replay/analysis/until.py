"""Where a secure registration ends: the ``@until:`` part of a spec.

A frame spec (``frame``, ``pa``, ``va``, ``console``: :mod:`replay.analysis.secure`)
may end with ``@until:END``; the registration then ends at the first END
after it began, or at ``secure-end`` if that comes first:

``@until:marker:NAME``
    the first marker named NAME (``stop``, or one of the guest's own).
``@until:REGEX``, ``@until:console:REGEX``
    the first console line REGEX matches (the trace's console events: a
    trace recorded before them cannot place a line). If REGEX has a group,
    group 1 must be the registered VA in hex, so that one spec can follow
    several pages, each ended by its own line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UsageError

_VA_BITS = (1 << 48) - 1
_MARKER_NAME = re.compile(r"[\w.-]+")


@dataclass(frozen=True)
class Until:
    """The end of a registration: the first marker named ``marker``, or the
    first console line ``console`` matches (group 1, if any, = the VA)."""

    text: str
    marker: str | None = None
    console: re.Pattern[str] | None = None

    def ends_at_line(self, line: str, va: int | None) -> bool:
        """Does console ``line`` end a registration made at ``va``?"""
        if self.console is None:
            return False
        for m in self.console.finditer(line):
            if self.console.groups == 0:
                return True
            raw = m.group(1)
            try:
                got = int(raw, 16) if raw is not None else None
            except ValueError:
                got = None
            if got is not None and va is not None and (
                    (got ^ va) & _VA_BITS & ~0xFFF) == 0:
                return True
        return False


def parse_until(spec: str, end: str, console_events: bool) -> Until:
    """Parse ``end``, what follows ``@until:`` in secure spec ``spec``;
    ``console_events``: the trace has console events. Raises :class:`UsageError`."""
    if end.startswith("marker:"):
        name = end.removeprefix("marker:").strip()
        if not _MARKER_NAME.fullmatch(name):
            raise UsageError(
                f"secure spec {spec!r}: bad marker name {name!r} after '@until:marker:'")
        return Until(end, marker=name)
    pattern = end.removeprefix("console:")
    if not pattern:
        raise UsageError(f"secure spec {spec!r}: nothing after '@until:'")
    if not console_events:
        raise UsageError(
            f"secure spec {spec!r}: '@until:REGEX' needs a trace with console events "
            "(this one was recorded before them); use '@until:marker:NAME'")
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise UsageError(
            f"secure spec {spec!r}: bad regular expression after '@until:': {err}") from None
    return Until(end, console=rx)
