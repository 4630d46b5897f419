"""The replay benchmark: ``python -m replay.bench`` (``make bench-replay``).

One run measures, side by side: the synthetic trace's decode and bare
replay rates (:mod:`.synthetic`), every recorded trace replayed bare and by
``shadowtrace replay`` with checks, and a whole-boot capture replayed by
the command, against the capture's own time (:mod:`.commands`).
"""

from __future__ import annotations

from .synthetic import write_trace

__all__ = ["write_trace"]
