"""A sweep's results as a table: one row per (trace, configuration), written with polars.

Columns, in order (``docs/sweep.md``):

* ``trace`` (the trace's name, ``private-root``) and ``trace_path``;
* each swept key, as its own column (``out_of_sync``: bool, ``pool_pages``:
  int, null for ``default``, ``cr3_targets``: its ``--set`` text);
* ``wall_s``: the replay's wall time on its worker, in seconds;
* ``events``: events replayed (``shadowtrace replay``'s "events");
* ``findings``: distinct findings of every check, then ``C1`` .. ``C8`` (per
  check), ``C1/info`` .. ``C8/config-error`` (per check and severity, every
  pair a column) and ``C6/SEVERITY/KIND`` per C6 hazard kind that any row has
  (as the expectation files key them);
* ``c7_mismatches``: the replayer's translation mismatches;
* ``counters.NAME``: every engine counter (``engine.counters``).

Counts of findings are distinct findings (what ``replay --json`` lists), not
their occurrences.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..analysis.checks.findings import CHECKS, SEVERITIES
from ..errors import UsageError
from .grid import column_value

#: The prefix of the engine counters' columns.
COUNTER = "counters."


def row(trace: Path, combo: dict[str, Any], doc: dict[str, Any], wall: float) -> dict[str, Any]:
    """One row from a replay's results document (replay.report.results)."""
    out: dict[str, Any] = {"trace": trace.name.removesuffix(".trace"), "trace_path": str(trace)}
    out.update({k: column_value(v) for k, v in combo.items()})
    findings = doc.get("findings") or []
    out["wall_s"] = round(wall, 3)
    out["events"] = doc["replay"]["events"]
    out["findings"] = len(findings)
    out.update(dict.fromkeys(CHECKS, 0))
    out.update({f"{c}/{s}": 0 for c in CHECKS for s in SEVERITIES})
    kinds: dict[str, int] = {}
    for f in findings:
        check, severity = f["check"], f["severity"]
        out[check] += 1
        out[f"{check}/{severity}"] += 1
        if check == "C6" and f.get("kind"):
            key = f"C6/{severity}/{f['kind']}"
            kinds[key] = kinds.get(key, 0) + 1
    out.update(sorted(kinds.items()))
    out["c7_mismatches"] = doc["c7"]["mismatches"]
    out.update({f"{COUNTER}{k}": v for k, v in doc["counters"].items()})
    return out


def frame(rows: list[dict[str, Any]]) -> Any:
    """The rows as a polars DataFrame: the C6 kind columns of any row in every
    row (0 where a row has none), in row order."""
    import polars as pl

    kinds = sorted({k for r in rows for k in r if k.startswith("C6/") and k.count("/") == 2})
    filled = []
    for r in rows:
        full: dict[str, Any] = {}
        for key, value in r.items():
            if key == "c7_mismatches":
                full.update({k: r.get(k, 0) for k in kinds})
            if not (key.startswith("C6/") and key.count("/") == 2):
                full[key] = value
        filled.append(full)
    return pl.from_dicts(filled, infer_schema_length=None)


def write(df: Any, out: Path) -> None:
    """Write the table as Parquet (UsageError if the file cannot be written)."""
    try:
        df.write_parquet(out)
    except OSError as err:
        raise UsageError(f"--out {out}: cannot write: {err.strerror or err}") from None
