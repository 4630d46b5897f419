"""The fidelity table: every recorded scenario, the model beside the real Xen.

``python -m replay.xen.fidelity [--traces DIR] [--runs N] XEN_ROOT [SCENARIO ...]``
compares ``DIR/NAME.trace`` (default ``traces/``, the recorded marker-window
traces: a cold start) with the Xen run in ``XEN_ROOT/NAME`` (the ``--out``
of ``shadowtrace xen --scenario NAME``), and with ``--runs N`` also with
the runs in ``XEN_ROOT/NAME.2`` ... ``NAME.N`` (Xen's counts vary from run
to run: the guest's timing under Xen is not deterministic), for each
scenario, and prints the README's "Model vs real Xen" tables as Markdown,
a range where the runs differ. ``make xen-fidelity``
captures each scenario from boot first (``capture --window all
--no-untrack``: a warm start, see ``docs/compare.md``), runs Xen, and
passes ``--traces`` those captures. Counting is :mod:`replay.xen.compare`'s;
this module only lays the results out.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import ShadowtraceError
from ..report.console import answer_label
from .compare import against, check_xen_dir, model_side

TOP = Path(__file__).resolve().parent.parent.parent
#: Each scenario's console line that names the page it is about (group 1: the VA).
WATCH: dict[str, str | None] = {
    "seed": r"The address allocated is ([0-9a-f]+)",
    "vmalloc": r"area 0 page 0 va=0x([0-9a-f]+)",
    "fork": None,
    "smp-fork": None,
    "private-root": r"secure page va=0x([0-9a-f]+)",
    "shared-l1": r"secure page va=0x([0-9a-f]+)",
    "secretmem": r"secret page va=0x([0-9a-f]+)",
    "reserved-root": r"secure page va=0x([0-9a-f]+)",
    "reserved-root-lazy": r"secure page va=0x([0-9a-f]+)",
}


def run_dirs(xen_root: Path, name: str, runs: int) -> list[Path]:
    """The folders of ``name``'s Xen runs: ``XEN_ROOT/NAME``, then
    ``XEN_ROOT/NAME.2`` ... ``XEN_ROOT/NAME.RUNS``."""
    dirs = [xen_root / name] + [xen_root / f"{name}.{k}" for k in range(2, runs + 1)]
    for d in dirs:
        if not d.is_dir():
            raise ShadowtraceError(f"no Xen run {d} ('make xen-fidelity XEN_RUNS={runs}' "
                                   "makes it)")
    return dirs


def run(xen_root: Path, scenarios: list[str], traces: Path = TOP / "traces",
        runs: int = 1) -> dict[str, list[dict[str, Any]]]:
    """Each scenario's comparison documents, one per Xen run (the model's
    replay made once per scenario); every run is checked before any replay."""
    plan = {}
    for name in scenarios:
        if name not in WATCH:
            raise ShadowtraceError(f"no recorded scenario {name!r}; known: {', '.join(WATCH)}")
        trace = traces / f"{name}.trace"
        dirs = run_dirs(xen_root, name, runs)
        for d in dirs:
            check_xen_dir(trace, d, WATCH[name])
        plan[name] = (trace, dirs)
    docs = {}
    for name, (trace, dirs) in plan.items():
        model = model_side(trace, watch_console=WATCH[name])
        docs[name] = [against(model, d) for d in dirs]
    return docs


def _after(xen: dict[str, Any]) -> str:
    """The guest faults Xen passed on before its answer record, if any."""
    n = int(xen.get("guest_faults_before") or 0)
    return "" if not n else f" (after {n} guest fault{'s' if n > 1 else ''})"


def _distinct(cells: list[str]) -> str:
    """Cells of several runs: one if they are all alike, else each once, in order."""
    return "; ".join(dict.fromkeys(cells))


def _span(values: list[Any]) -> str:
    """Values of several runs: the value, or lowest-highest (as printed:
    shares that round alike are one)."""
    lo, hi = _num(min(values)), _num(max(values))
    return lo if lo == hi else f"{lo}-{hi}"


def markdown(docs: dict[str, list[dict[str, Any]]]) -> str:
    """The README's tables: per scenario, one comparison per Xen run (ranges
    over the runs where they differ)."""
    out = ["| scenario | VA (model / Xen) | model | Xen | agree |", "|---|---|---|---|---|"]
    for name, runs in docs.items():
        if not runs[0]["answers"]:
            out.append(f"| {name} | (no watched page) | | | |")
        for i, first in enumerate(runs[0]["answers"]):
            answers = [doc["answers"][i] for doc in runs]
            m = first["model"]
            xen_va = _distinct([f"`{a['va_xen']}`" for a in answers])
            xen = _distinct([f"{a['xen']['kind']} `{a['xen']['symbol'] or '-'}`{_after(a['xen'])}"
                             for a in answers])
            agreed = sum(bool(a["agree"]) for a in answers)
            verdict = ("yes" if agreed == len(answers) else "**no**" if not agreed
                       else f"{agreed} of {len(answers)} runs")
            out.append(f"| {name} | `{first['va_model']}` / {xen_va} | {answer_label(m)} "
                       f"`{m['symbol'] or '-'}` | {xen} | {verdict} |")
    first_runs = next(iter(docs.values())) if docs else []
    names = [m["name"] for m in first_runs[0]["metrics"]] if first_runs else []
    starts = sorted({doc["start"] for runs in docs.values() for doc in runs})
    counts = sorted({len(runs) for runs in docs.values()})
    runs_said = " or ".join(str(n) for n in counts)
    out += ["", f"Model replays: {' and '.join(starts)} start. Xen: {runs_said} "
            f"run{'s' if counts != [1] else ''} per scenario"
            + (" (lowest-highest where the runs differ)." if counts != [1] else "."),
            "", "| metric | " + " | ".join(docs) + " |",
            "|---|" + "---|" * len(docs)]
    for metric in names:
        cells = []
        for runs in docs.values():
            ms = [next(x for x in doc["metrics"] if x["name"] == metric) for doc in runs]
            cells.append(f"{_span([m['model'] for m in ms])} / {_span([m['xen'] for m in ms])}")
        out.append(f"| `{metric}` | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}"
    return f"{v:,}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m replay.xen.fidelity", description=__doc__)
    p.add_argument("--traces", type=Path, default=TOP / "traces", metavar="DIR",
                   help="where NAME.trace is (default traces/)")
    p.add_argument("xen_root", type=Path)
    p.add_argument("--runs", type=int, default=1, metavar="N",
                   help="Xen runs per scenario: XEN_ROOT/NAME, NAME.2 ... NAME.N (default 1)")
    p.add_argument("scenarios", nargs="*", default=list(WATCH))
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error(f"--runs {args.runs}: at least 1")
    try:
        print(markdown(run(args.xen_root, args.scenarios, args.traces, args.runs)))
    except ShadowtraceError as err:
        print(f"fidelity: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
