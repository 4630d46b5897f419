"""Checks whose evidence is the accesses themselves: C2, and policy mode.

C2: a vCPU not on a secure root accessed a frame in S. Policy mode: the
engine asks (``refuse_leaf``) before propagating a leaf of a frame in S
while the vCPU, as Xen knows it, is not secure; refused demand faults are
listed as the accesses that would then fault.
"""

from __future__ import annotations

from ...guest.memory import cr3_root
from ...shadow.types import Fetch
from ...trace import format as fmt
from .base import CheckerBase
from .findings import PolicyFault

_FETCH = int(fmt.Kind.FETCH)


class AccessChecks(CheckerBase):
    """C2 and policy mode: from the accesses that reach the engine."""

    # ------------------------------------------------------------------ #
    # C2                                                                   #
    # ------------------------------------------------------------------ #
    def _c2(self, index: int, vcpu: int, va: int, frame: int) -> None:
        self._accessed.add((va & ~0xFFF, frame))
        if self._secure_vcpu(vcpu):
            return
        cr3 = self._vcpu_cr3(vcpu)
        root = cr3_root(cr3) if cr3 is not None else None
        f = self._seen("C2", "critical", "", (frame,), root)
        if f is not None:
            f.count += 1
            return
        path: list[int] = []
        if cr3 is not None:
            path = self._eng().guest.walk(cr3, va, set_ad=False).frames
        self._add("C2", "critical", index, vcpu, cr3, va, [frame], path,
                  f"vCPU {vcpu} accessed secure frame {frame:#x} at {va:#x} with "
                  f"non-secure root {root:#x}" if root is not None else
                  f"vCPU {vcpu} accessed secure frame {frame:#x} at {va:#x} with no known CR3")

    # ------------------------------------------------------------------ #
    # Policy mode                                                          #
    # ------------------------------------------------------------------ #
    def _refuse(self, vcpu: int, target: int, ft: Fetch) -> bool:
        reg = self.registry
        if target not in reg.frames:
            return False
        vs = self._eng().vcpus
        xcr3 = vs[vcpu].xen_cr3 if vcpu < len(vs) else None
        if xcr3 is not None and cr3_root(xcr3) in reg.roots:
            return False
        if ft is Fetch.PREFETCH:
            self.policy_refused_other += 1
        else:
            self.policy_refused_demand += 1
            self._policy_pending.append((vcpu, target, int(ft)))
        return True

    def _policy_flush(self, index: int, vcpu: int, va: int, kind: int) -> None:
        for v, frame, _ft in self._policy_pending:
            if len(self.policy_faults) < self.max_policy_faults:
                self.policy_faults.append(PolicyFault(
                    index, v, self._vcpu_cr3(v), va if kind <= _FETCH else None, frame))
        self._policy_pending = []
