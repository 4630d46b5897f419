"""The CR3-target list: CR3 writes that do not exit to Xen (check C6).

A CR3 write to a listed root is invisible to Xen: :meth:`Cr3Targets._exitless_switch`
records as :class:`~replay.shadow.types.Hazard` what such a switch leaves
wrong (stale OOS L1s, a live vTLB, no or an unpinned shadow for the target,
...), and ``cr3_targets_active = "secure"`` turns the list on and off with
the secure-root markers (:meth:`Cr3Targets._secure_marker`). The list in
force is ``EngineState._targets``; the CR3 path (``engine.py``) asks it.
"""

from __future__ import annotations

from ..trace import format as fmt
from .state import EngineState
from .types import L4, Hazard, Key, VCpu


class Cr3Targets(EngineState):
    """The CR3-target list in force and what an exit-less switch leaves wrong."""

    def _secure_marker(self, name: str) -> None:
        """``cr3_targets_active = "secure"``: the hypervisor programs the
        CR3-target list when a secure root is registered and clears it when
        the registrations end."""
        if name == fmt.MARKER_SECURE_ROOT and not self._targets:
            self._targets = self.config.target_roots()
            self._fact("cr3-targets", -1, -1, -1, 0, len(self._targets), "on")
        elif name == fmt.MARKER_SECURE_END and self._targets:
            self._targets = frozenset()
            self._fact("cr3-targets", -1, -1, -1, 0, 0, "off")

    def _exitless_switch(self, v: VCpu, vcpu: int, cr3: int, root: int) -> None:
        """A CR3 write to a listed root: Xen never sees it. Record what this
        leaves wrong (check C6), then let the hardware run on that root's
        L4 shadow if there is one."""
        self.counters["cr3_write_not_intercepted"] += 1
        ev = self._event
        key: Key = (root, L4)
        if v.oos_frames():
            self.hazards.append(Hazard(ev, vcpu, "oos-stale", root,
                                       f"this vCPU's OOS L1s stay stale: {v.oos_frames()}"))
        others = [f for i, o in enumerate(self.vcpus) if i != vcpu for f in o.oos_frames()]
        if others:
            self.hazards.append(Hazard(ev, vcpu, "oos-other-vcpus", root,
                                       f"other vCPUs' OOS L1s not synced: {others}"))
        if v.vtlb_live():
            self.hazards.append(Hazard(ev, vcpu, "vtlb-live", root,
                                       f"{v.vtlb_live()} vTLB entries survive the switch"))
        if v.last_write_emul_ok:
            self.hazards.append(Hazard(ev, vcpu, "fast-emulation-live", root,
                                       f"last emulated frame {v.last_emulated_mfn:#x} kept"))
        sh = self.shadows.get(key)
        if sh is None:
            self.hazards.append(Hazard(ev, vcpu, "no-shadow-for-target", root,
                                       "the target root has no L4 shadow"))
        elif not sh.pinned:
            self.hazards.append(Hazard(ev, vcpu, "target-not-pinned", root,
                                       "the target's L4 shadow is not pinned"))
        if v.slot is not None and v.slot != key:
            self.hazards.append(Hazard(ev, vcpu, "ref-on-old-root", root,
                                       f"the slot still holds root {v.slot[0]:#x}"))
        if not self.is_page_table(root):
            self.hazards.append(Hazard(ev, vcpu, "root-not-write-protected", root,
                                       "the new root frame is not write-protected"))
        v.cr3 = cr3
        v.hw_root = key if sh is not None else None
