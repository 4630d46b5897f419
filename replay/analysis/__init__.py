"""Consumers of a replay: what the engine's facts and the events mean.

``secure`` (the secure specification: spec strings, markers, intervals),
``checks`` (the leak checks C1-C8, :class:`~replay.analysis.checks.Checker`
as the façade), ``timeline`` with ``episodes`` (when each level of a watched
VA's shadow path came to be), ``lifetimes`` (every shadow's life),
``events`` (the events of interest, for Parquet) and ``golden`` (the stable
part of a replay's results, and expectation files).
"""

from .checks import Checker, Finding
from .lifetimes import ShadowLifetimes
from .timeline import Timeline

__all__ = ["Checker", "Finding", "Timeline", "ShadowLifetimes"]
