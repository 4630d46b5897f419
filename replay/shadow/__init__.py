"""A model of Xen's x86 shadow paging (``xen/arch/x86/mm/shadow/``).

``config`` (the SHOPT_* knobs and sizes), ``types`` (shadow types, entry
bits, facts, hazards, counters), ``state`` (the engine's state and queries),
then the behaviour split along Xen's own files: ``multi`` (multi.c),
``common`` (common.c), ``oos`` (out of sync), ``targets`` (the CR3-target
list); ``engine`` composes them into :class:`ShadowEngine`.
"""

from .config import EngineConfig
from .engine import ShadowEngine
from .types import Fact, Hazard, ShadowType

__all__ = ["ShadowEngine", "EngineConfig", "ShadowType", "Fact", "Hazard"]
