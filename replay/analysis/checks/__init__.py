"""The secure-page leak checks C1-C8, with :class:`Checker` as the façade.

``checker`` (the Checker: wiring, the event hook, registration, the end),
``base`` (its state, finding records, per-vCPU questions), ``findings``
(what is reported), ``scan`` (a root's guest tables with numpy), and one
file per evidence source: ``guest_tables`` (C1 high, C3, C4, C5),
``shadows`` (C1 critical, C5 as-table, C8), ``accesses`` (C2, policy mode),
``hazards`` (C6, C7).
"""

from .checker import Checker, check_file
from .findings import CHECKS, SEVERITIES, Finding, PolicyFault
from .hazards import C6_HIGH
from .scan import Leaf, RootScan, scan_root

__all__ = [
    "Checker",
    "Finding",
    "check_file",
    "PolicyFault",
    "CHECKS",
    "SEVERITIES",
    "C6_HIGH",
    "RootScan",
    "Leaf",
    "scan_root",
]
