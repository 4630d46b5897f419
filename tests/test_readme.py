"""The README's figures from the recorded traces match what a replay gives.

The seed table and counts are held against a replay of ``traces/seed.trace``
made here, as ``shadowtrace replay --watch-console`` prints it (the path
under the root the guest ran when the path became complete). The findings
table is held against the expectation files (``traces/*.expected.json``),
which tests/test_regression.py checks against a fresh replay of every trace
on each run. So a figure in the README cannot go stale without a test
failing.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from replay.session import DEFAULT_CONSOLE_REGEX, ReplayOptions, replay

TOP = Path(__file__).resolve().parent.parent
README = (TOP / "README.md").read_text()


def _expected(trace: str) -> dict[str, Any]:
    doc = json.loads((TOP / "traces" / f"{trace}.expected.json").read_text())
    return dict(doc["expected"])


def _table_after(heading: str) -> list[list[str]]:
    """The cells of the first Markdown table after the line starting with ``heading``."""
    lines = README.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(heading))
    rows: list[list[str]] = []
    for line in lines[start + 1:]:
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif rows:
            break
    return rows[1:]  # the heading is the header row: skip the |---| line


def _number(cell: str) -> int:
    return int(cell.replace(",", ""))


@pytest.fixture(scope="module")
def seed_doc() -> dict[str, Any]:
    opts = ReplayOptions(trace=TOP / "traces" / "seed.trace",
                         watch_console=DEFAULT_CONSOLE_REGEX)
    return replay(opts).doc


def _main_episode(tl: dict[str, Any]) -> dict[str, Any]:
    """The episode the terminal report shows first (replay.report.console._print_timeline)."""
    eps = tl["episodes"]
    return next((e for e in eps if e["cr3"] and int(e["cr3"], 16) >> 12 << 12
                 == int(e["root"], 16)), eps[0])


def test_seed_shadow_path_table(seed_doc: dict[str, Any]) -> None:
    rows = _table_after("| level | built at event | why | PC symbol |")
    ep = _main_episode(seed_doc["timelines"][0])
    path = {lv["level"]: lv for lv in ep["levels"]}
    # each README row names one or more levels of the path
    levels = {
        "L4 shadow": ["L4"], "L4 entry": ["L4e"], "L3 shadow, L3 entry, L2 shadow":
        ["L3", "L3e", "L2"], "L2 entry, L1 shadow": ["L2e", "L1"], "L1 entry": ["L1e"],
    }
    seen = set()
    for label, event, _why, symbol in rows:
        key = next(k for k in levels if label.startswith(k))
        for level in levels[key]:
            got = path[level]
            assert got["event"] == _number(event), (label, level)
            assert f"`{got['symbol']}`" == symbol, (label, level)
            seen.add(level)
    assert seen == set(path)  # all eight levels are in the table


def _cell_findings(check: str, cell: str) -> dict[str, int]:
    if cell == "-":
        return {}
    out = {}
    for part in cell.split(","):
        n, severity = part.split()
        out[f"{check}/{severity}"] = int(n)
    return out


def test_findings_table() -> None:
    header = "| trace | secure registration | C1 | C2 | C3 | C4 | C5 | C6 | C7 mismatches |"
    rows = _table_after(header)
    checked = []
    for row in rows:
        traces = [t.strip() for t in row[0].split(",")]
        want: dict[str, int] = {}
        for check, cell in zip(("C1", "C2", "C3", "C4", "C5", "C6"), row[2:8], strict=True):
            want.update(_cell_findings(check, cell))
        for trace in traces:
            exp = _expected(trace)
            # C6 is keyed by hazard kind in the expectations: summed per severity here
            got: dict[str, int] = {}
            for key, n in exp["findings"].items():
                check, severity = key.split("/")[:2]
                if check in ("C1", "C2", "C3", "C4", "C5", "C6"):
                    got[f"{check}/{severity}"] = got.get(f"{check}/{severity}", 0) + n
            assert got == want, trace
            assert exp["c7_mismatches"] == _number(row[8]), trace
            checked.append(trace)
    # every recorded trace has a row
    assert sorted(checked) == sorted(p.name[: -len(".expected.json")]
                                     for p in (TOP / "traces").glob("*.expected.json"))


def test_seed_event_count_and_page(seed_doc: dict[str, Any]) -> None:
    m = re.search(r"\(`traces/seed\.trace`, ([\d,]+) events\)", README)
    assert m is not None
    assert seed_doc["replay"]["events"] == _number(m.group(1))
    console = (TOP / "traces" / "seed.console.log").read_text()
    va = re.search(r"The address allocated is ([0-9a-f]+)", console)
    assert va is not None and f"The address allocated is {va.group(1)}" in README
