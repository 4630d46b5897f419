"""The fidelity table: every recorded scenario, the model beside the real Xen.

``python -m replay.xen.fidelity [--traces DIR] XEN_ROOT [SCENARIO ...]``
compares ``DIR/NAME.trace`` (default ``traces/``, the recorded marker-window
traces: a cold start) with the Xen run in ``XEN_ROOT/NAME`` (the ``--out``
of ``shadowtrace xen --scenario NAME``) for each scenario and prints the
README's "Model vs real Xen" tables as Markdown. ``make xen-fidelity``
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
from .compare import compare

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


def run(xen_root: Path, scenarios: list[str],
        traces: Path = TOP / "traces") -> dict[str, dict[str, Any]]:
    docs = {}
    for name in scenarios:
        if name not in WATCH:
            raise ShadowtraceError(f"no recorded scenario {name!r}; known: {', '.join(WATCH)}")
        docs[name] = compare(traces / f"{name}.trace", xen_root / name,
                             watch_console=WATCH[name])
    return docs



def _after(xen: dict[str, Any]) -> str:
    """The guest faults Xen passed on before its answer record, if any."""
    n = int(xen.get("guest_faults_before") or 0)
    return "" if not n else f" (after {n} guest fault{'s' if n > 1 else ''})"

def markdown(docs: dict[str, dict[str, Any]]) -> str:
    out = ["| scenario | VA (model / Xen) | model | Xen | agree |", "|---|---|---|---|---|"]
    for name, doc in docs.items():
        if not doc["answers"]:
            out.append(f"| {name} | (no watched page) | | | |")
        for a in doc["answers"]:
            m, x = a["model"], a["xen"]
            out.append(
                f"| {name} | `{a['va_model']}` / `{a['va_xen']}` | {m['kind']} "
                f"`{m['symbol'] or '-'}` | {x['kind']} `{x['symbol'] or '-'}`{_after(x)} | "
                f"{'yes' if a['agree'] else '**no**'} |"
            )
    names = [m["name"] for m in next(iter(docs.values()))["metrics"]] if docs else []
    starts = sorted({doc["start"] for doc in docs.values()})
    out += ["", f"Model replays: {' and '.join(starts)} start.",
            "", "| metric | " + " | ".join(docs) + " |",
            "|---|" + "---|" * len(docs)]
    for metric in names:
        cells = []
        for doc in docs.values():
            m = next(x for x in doc["metrics"] if x["name"] == metric)
            cells.append(f"{_num(m['model'])} / {_num(m['xen'])}")
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
    p.add_argument("scenarios", nargs="*", default=list(WATCH))
    args = p.parse_args(argv)
    try:
        print(markdown(run(args.xen_root, args.scenarios, args.traces)))
    except ShadowtraceError as err:
        print(f"fidelity: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
