"""The guest kernel's console lines, from the trace's ``console`` markers.

The plugin records what the kernel writes to its serial console as
``console`` markers at their place in the event order
(:data:`replay.trace.format.MARKER_CONSOLE`); one write can be split over
several markers and one line over several writes. :class:`ConsoleLines`
puts them back together: a line is complete, and belongs to the event of
the marker that held its ``\\n``.
"""

from __future__ import annotations

from ..trace import format as fmt


class ConsoleLines:
    """Feed it every marker in event order; it returns the lines completed."""

    def __init__(self) -> None:
        self._part = bytearray()

    def feed(self, marker: list[str]) -> list[str]:
        """The console lines ``marker`` completes (none for other markers),
        without their line end (``\\r`` too), decoded as UTF-8."""
        data = fmt.console_bytes(marker)
        if not data:
            return []
        self._part += data
        if b"\n" not in data:
            return []
        *done, rest = bytes(self._part).split(b"\n")
        self._part = bytearray(rest)
        return [line.rstrip(b"\r").decode("utf-8", "replace") for line in done]

    @property
    def partial(self) -> str:
        """The text of the line not yet ended."""
        return self._part.decode("utf-8", "replace")


def is_console_marker(marker: list[str]) -> bool:
    """True for the plugin's ``console`` markers."""
    return bool(marker) and marker[0] == fmt.MARKER_CONSOLE
