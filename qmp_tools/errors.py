"""Errors of the capture side.

::

    ShadowtraceError (replay.errors)
     +-- CaptureError          a capture that could not complete
          +-- SetupError       something `make setup` builds is missing
          +-- GuestError       the guest panicked, hung, or QEMU died
"""

from __future__ import annotations

from replay.errors import ShadowtraceError


class CaptureError(ShadowtraceError):
    """A capture that could not complete."""


class SetupError(CaptureError):
    """A part that ``make setup`` builds is missing, or a bad capture option."""


class GuestError(CaptureError):
    """The guest panicked or hung, or QEMU died; ``console_tail`` has its last lines."""

    def __init__(self, message: str, console_tail: str = "") -> None:
        self.console_tail = console_tail
        super().__init__(message)
