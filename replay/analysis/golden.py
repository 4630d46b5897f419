"""Regression expectations: the stable part of a replay's results.

``expectation(doc)`` keeps what a behaviour change must not move silently:
every counter, shadows by type, the C7 count, findings by check and
severity (C6 also by hazard kind), and for each watched VA the answer and
the event and reason of each level of its first shadow path. ``compare`` lists the differences as
readable lines (``counters.shadow_fault: expected 120, got 121``).
"""

from __future__ import annotations

from typing import Any


def expectation(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of a results document (replay/results.py) kept as golden."""
    findings: dict[str, int] = {}
    for f in doc.get("findings") or []:
        key = f"{f['check']}/{f['severity']}"
        if f["check"] == "C6" and f.get("kind"):
            # which hazard an exit-less switch left is the point of C6
            key += f"/{f['kind']}"
        findings[key] = findings.get(key, 0) + 1
    timelines = []
    for tl in doc.get("timelines") or []:
        first = (tl.get("guest") or {}).get("first_access") or {}
        episodes = tl.get("episodes") or []
        levels = []
        if episodes:
            for level in episodes[0].get("levels") or []:
                levels.append(
                    {k: level.get(k) for k in ("level", "event", "reason", "symbol", "shared")}
                )
        timelines.append(
            {
                "va": tl["va"],
                "answer": tl.get("answer"),
                "first_access": {k: first.get(k) for k in ("event", "kind", "symbol")},
                "first_path": levels,
            }
        )
    return {
        "counters": doc["counters"],
        "shadows": doc["shadows"],
        "c7_mismatches": doc["c7"]["mismatches"],
        "findings": dict(sorted(findings.items())),
        "timelines": timelines,
    }


def compare(expected: Any, got: Any, where: str = "") -> list[str]:
    """Differences between two JSON-like values, one line each."""
    if isinstance(expected, dict) and isinstance(got, dict):
        lines = []
        for key in sorted(set(expected) | set(got), key=str):
            at = f"{where}.{key}" if where else str(key)
            if key not in got:
                lines.append(f"{at}: expected {expected[key]!r}, missing")
            elif key not in expected:
                lines.append(f"{at}: not expected, got {got[key]!r}")
            else:
                lines += compare(expected[key], got[key], at)
        return lines
    if isinstance(expected, list) and isinstance(got, list) and len(expected) == len(got):
        lines = []
        for i, (e, g) in enumerate(zip(expected, got, strict=True)):
            lines += compare(e, g, f"{where}[{i}]")
        return lines
    return [] if expected == got else [f"{where}: expected {expected!r}, got {got!r}"]
