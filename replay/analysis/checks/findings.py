"""What the checks report: :class:`Finding` records and policy-mode faults."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Final

CHECKS: Final = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "C8")
SEVERITIES: Final = ("info", "medium", "high", "critical", "config-error")


@dataclass
class Finding:
    """One check result (de-duplicated: ``count`` occurrences, ``event`` the first)."""

    check: str
    severity: str
    event: int
    vcpu: int
    cr3: int | None
    va: int | None
    frames: list[int]
    path: list[int]
    message: str
    count: int = 1
    #: Sub-kind (C1 "guest"/"shadow", C5 "writable"/"written"/"as-table",
    #: C6 the hazard kind, ...); part of the de-duplication key.
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        where = [f"event {self.event}"]
        if self.vcpu >= 0:
            where.append(f"vcpu {self.vcpu}")
        if self.cr3 is not None:
            where.append(f"cr3 {self.cr3:#x}")
        if self.va is not None:
            where.append(f"va {self.va:#x}")
        times = f" (x{self.count})" if self.count > 1 else ""
        return f"{self.check} {self.severity}: {self.message} [{', '.join(where)}]{times}"


@dataclass
class PolicyFault:
    """Policy mode: an access whose leaf the policy refused (it would fault)."""

    event: int
    vcpu: int
    cr3: int | None
    va: int | None
    frame: int
