"""Driving a trace through the guest model and the shadow engine.

``replayer`` (canonical dedup, the per-event loop, the C7 cross-check),
``fastpath`` (the bulk path for runs of accesses already allowed) and
``hub`` (the fact hub and :func:`drive`, the chunk loop with observers).
"""

from .hub import ChunkObserver, FactHub, drive
from .replayer import Replayer, ReplayStats

__all__ = ["Replayer", "ReplayStats", "drive", "FactHub", "ChunkObserver"]
