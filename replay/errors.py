"""Errors of the replay package.

::

    ShadowtraceError            root of every error this project raises
     +-- TraceError             a trace file cannot be used
     |    +-- TraceFormatError  bytes that are not a valid trace
     |    +-- TraceVersionError a valid trace of a version this reader lacks
     +-- UsageError             a bad option or argument
          +-- ArgumentError     one the argument parser cannot tell (exit 2)
"""

from __future__ import annotations


class ShadowtraceError(Exception):
    """Root of every error shadowtrace raises on purpose."""


class UsageError(ShadowtraceError):
    """A bad command-line option or argument."""


class ArgumentError(UsageError):
    """A malformed argument found after parsing (``sweep --set``): the command
    exits with status 2, as for the argument parser's own errors."""


class TraceError(ShadowtraceError):
    """A trace that cannot be used, with where the problem is."""

    def __init__(
        self,
        path: str,
        message: str,
        *,
        offset: int | None = None,
        chunk: int | None = None,
        event: int | None = None,
    ) -> None:
        self.path = path
        self.message = message
        self.offset = offset
        self.chunk = chunk
        self.event = event
        where = [path]
        if chunk is not None:
            where.append(f"chunk {chunk}")
        if event is not None:
            where.append(f"event {event}")
        if offset is not None:
            where.append(f"byte {offset}")
        super().__init__(f"{', '.join(where)}: {message}")


class TraceFormatError(TraceError):
    """The file is not a valid trace (bad bytes, bad structure, truncated)."""


class TraceVersionError(TraceError):
    """The trace is of a format version this reader does not know."""
