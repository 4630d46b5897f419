"""Regression expectations: the stable part of a replay's results.

``expectation(doc)`` keeps what a behaviour change must not move silently:
every counter, shadows by type, the C7 count, findings by check and
severity (C6 also by hazard kind), and for each watched VA the answer and
the event and reason of each level of its first shadow path. ``compare`` lists the differences as
readable lines (``counters.shadow_fault: expected 120, got 121``).

An expectation file (``traces/*.expected.json``, ``shadowtrace check
--expect FILE``) holds the replay ``options`` it was made with
(:data:`CHECK_OPTIONS`; a config path relative to the file) and the
``expected`` part: :func:`read_expectation`, :func:`write_expectation`,
:func:`observed` (what a results document gives, as stored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import UsageError

#: Replay options an expectation file keeps, with their defaults.
CHECK_OPTIONS: dict[str, Any] = {
    "config": None, "watch": [], "watch_console": None, "secure": [], "policy": False,
    "no_dedup": False,
}


def read_expectation(path: Path) -> tuple[dict[str, Any], Any]:
    """The (options, expected) of an expectation file."""
    try:
        stored = json.loads(path.read_text())
        options = stored["options"]
        expected = stored["expected"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UsageError(f"{path}: not an expectation file ({err})") from None
    return options, expected


def stored_options(options: dict[str, Any]) -> dict[str, Any]:
    """An expectation file's options, every one of :data:`CHECK_OPTIONS` (defaults filled)."""
    return {k: options.get(k, default) for k, default in CHECK_OPTIONS.items()}


def observed(doc: dict[str, Any]) -> Any:
    """The expectation of results ``doc`` as a file stores it (JSON values only)."""
    return json.loads(json.dumps(expectation(doc), default=str))


def write_expectation(path: Path, options: dict[str, Any], got: Any) -> None:
    path.write_text(
        json.dumps({"options": options, "expected": got}, indent=1, sort_keys=True) + "\n"
    )


def expectation(doc: dict[str, Any]) -> dict[str, Any]:
    """The part of a results document (replay/report/results.py) kept as golden."""
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
