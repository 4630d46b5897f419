"""Checks whose evidence is what the engine and the replayer flagged: C6, C7.

C6: the hazards an exit-less CR3 switch left (``ShadowEngine.hazards``);
the kinds LEAK-CHECKS.md names are high, the others info. C7: the
replayer's translation cross-check (trace pa against the model's walk),
high when a secure frame is involved.
"""

from __future__ import annotations

from typing import Final

from ...driver.replayer import ReplayStats
from ...guest.memory import PAGE_SHIFT
from .base import CheckerBase

#: Hazard kinds LEAK-CHECKS.md names for C6 (high); other hazards are info.
C6_HIGH: Final = frozenset({
    "oos-stale", "oos-other-vcpus", "vtlb-live", "no-shadow-for-target", "target-not-pinned",
})


class HazardChecks(CheckerBase):
    """C6 (exit-less switch hazards) and C7 (translation mismatches)."""

    # ------------------------------------------------------------------ #
    # C6, C7                                                               #
    # ------------------------------------------------------------------ #
    def _take_hazards(self) -> None:
        hz = self._eng().hazards
        for h in hz[self._hazards_seen:]:
            if h.kind == "too-many-cr3-targets":
                self._add("C6", "config-error", h.event, h.vcpu, None, None, [], [],
                          f"CR3-target list: {h.detail}", kind=h.kind)
                continue
            sev = "high" if h.kind in C6_HIGH else "info"
            self._add("C6", sev, h.event, h.vcpu, h.root << PAGE_SHIFT, None, [h.root], [],
                      f"exit-less switch to root {h.root:#x}: {h.kind}: {h.detail}",
                      kind=h.kind)
        self._hazards_seen = len(hz)

    def _c7(self, stats: ReplayStats) -> None:
        reg = self.registry
        for m in stats.mismatches:
            tf = m.trace_pa >> PAGE_SHIFT
            mf = m.model_pa >> PAGE_SHIFT if m.model_pa >= 0 else None
            frames = [tf] if mf is None else [tf, mf]
            secure = any(reg.frame_secure_at(fr, m.event) for fr in frames)
            model = "unmapped" if mf is None else f"{m.model_pa:#x}"
            self._add("C7", "high" if secure else "medium", m.event, m.vcpu,
                      self.cr3_at(m.vcpu, m.event), m.va, frames, [],
                      f"the guest reached {m.trace_pa:#x} at {m.va:#x}, the model's walk "
                      f"gives {model}" + (" (a secure frame)" if secure else ""),
                      kind="mismatch")
