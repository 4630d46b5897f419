"""Presentation: everything that prints for people. Counting lives elsewhere."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ..errors import UsageError


class CaptureResult(Protocol):
    """What :func:`print_capture_summary` shows of a capture
    (``qmp_tools.capture.CaptureResult``; the replay side does not import
    the capture side)."""

    @property
    def trace(self) -> Path: ...
    @property
    def console_log(self) -> Path: ...
    @property
    def truth(self) -> Path | None: ...
    @property
    def duration(self) -> float: ...
    @property
    def summary(self) -> dict[str, Any]: ...


_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


@contextlib.contextmanager
def progress_printer(title: str) -> Iterator[Callable[[str], None]]:
    """A status line on stderr while the guest runs (plain lines when not a TTY)."""
    start = time.monotonic()
    if _err.is_terminal:
        with _err.status(title) as status:

            def update(msg: str) -> None:  # msg may carry guest text (markers)
                status.update(Text(f"{title}: {msg} ({time.monotonic() - start:.1f} s)"))

            yield update
    else:

        def plain(msg: str) -> None:
            print(f"[{time.monotonic() - start:6.1f} s] {title}: {msg}", file=sys.stderr)

        yield plain


def print_capture_summary(result: CaptureResult) -> None:
    """The capture's counts; paths are printed whole, never as markup."""
    s = result.summary
    _out.print(Text(f"capture {result.trace}"), soft_wrap=True)
    table = Table(show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    for kind, count in s["by_kind"].items():
        table.add_row(f"events {kind}", f"{count:,}")
    table.add_row("events", f"{s['events']:,}")
    table.add_row("bytes", f"{s['bytes']:,}")
    bpa = s["bytes_per_access"]
    table.add_row("bytes per access", "-" if bpa is None else f"{bpa:.2f}")
    table.add_row("CR3 writes", f"{s['cr3_writes']:,}")
    table.add_row("table frames tracked", f"{s['tables_tracked']:,}")
    if s.get("seen") is not None:
        table.add_row("accesses seen in window", f"{s['seen']:,}")
        table.add_row("accesses de-duplicated", f"{s['deduplicated']:,}")
    table.add_row("duration", f"{result.duration:.1f} s")
    _out.print(table)
    _out.print(Text(f"console log: {result.console_log}"), soft_wrap=True)
    if result.truth is not None:
        _out.print(Text(f"ground truth: {result.truth}"), soft_wrap=True)


def warn(message: str) -> None:
    """One line on stderr for people (trace-derived text: never markup)."""
    _err.print(Text(message), soft_wrap=True)


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, default=str, sort_keys=False))


# --------------------------------------------------------------------------
# replay
# --------------------------------------------------------------------------
#: Seconds between two progress lines when stderr is not a terminal
#: (environment variable SHADOWTRACE_PROGRESS_EVERY overrides it).
PROGRESS_EVERY = 5.0


def progress_every() -> float:
    """The progress interval: SHADOWTRACE_PROGRESS_EVERY or the default."""
    import os

    text = os.environ.get("SHADOWTRACE_PROGRESS_EVERY")
    if text is None:
        return PROGRESS_EVERY
    try:
        every = float(text)
    except ValueError:
        every = -1.0
    if not every >= 0:
        raise UsageError(f"SHADOWTRACE_PROGRESS_EVERY={text!r}: not a number of seconds >= 0")
    return every


def _position(reader: Any) -> int | None:
    pos = getattr(reader, "position", None)
    return int(pos) if pos is not None else None


@contextlib.contextmanager
def replay_progress(trace: Any, every: float | None = None, enabled: bool = True
                    ) -> Iterator[Callable[[Any, Any], None]]:
    """Progress on stderr while a trace replays: a rich bar on a terminal,
    else one plain line every ``every`` seconds (none for a replay that
    ends sooner), so a long replay in a pipe or a CI log shows it is alive.

    Yields ``update(reader, chunk)``; both follow the reader's position in
    the file. ``every`` defaults to :func:`progress_every`; nothing is
    shown unless ``enabled``.
    """
    import os

    if not enabled:
        yield lambda reader, chunk: None
        return
    if every is None:
        every = progress_every()
    try:
        size = os.path.getsize(trace)
    except OSError:
        size = None
    if not _err.is_terminal:
        start = time.monotonic()
        due = start + every

        def line(reader: Any, chunk: Any) -> None:
            nonlocal due
            now = time.monotonic()
            if now < due:
                return
            due = now + every
            events = chunk.first + chunk.n
            pos = _position(reader)
            part = f" ({100 * pos / size:.0f}% of the file)" if pos and size else ""
            rate = events / max(now - start, 1e-9) / 1e6
            _err.print(Text(f"replay {trace}: {events:,} events{part}, "
                            f"{rate:.2f} M events/s, {now - start:.0f} s"), soft_wrap=True)

        yield line
        return
    from rich.progress import (
        BarColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (TextColumn("replay"), BarColumn(), TextColumn("{task.fields[events]:,} events"),
               TimeElapsedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=_err, transient=True) as bar:
        task = bar.add_task("replay", total=size, events=0)

        def update(reader: Any, chunk: Any) -> None:
            bar.update(task, completed=_position(reader), events=chunk.first + chunk.n)

        yield update


def _plain(text: Any) -> Text:
    """Text from a trace (symbols like ``f+0x9 [module]``, VAs, reasons):
    never read as rich markup."""
    return Text("-" if text is None else str(text))


def _cells(*values: Any) -> list[Text]:
    return [_plain(v) for v in values]


def _wide() -> Console:
    """Replay output: the terminal's width, or 160 columns into a file/pipe."""
    return _out if _out.is_terminal else Console(highlight=False, width=160)


def _episode_table(tl: dict[str, Any], ep: dict[str, Any]) -> Table:
    table = Table(title=Text(f"shadow path of {tl['va']} under root {ep['root']}"
                             f" (complete at event {ep['complete_event']:,})"))
    for col in ("level", "shadow", "entry", "event", "why", "vCPU", "CR3", "PC", "symbol",
                "destroyed"):
        table.add_column(col, justify="right" if col in ("event", "vCPU") else "left")
    for lv in ep["levels"]:
        why = lv["reason"] + (" (already built: shared)" if lv["shared"] else "")
        gone = lv["destroyed"]
        table.add_row(*_cells(
            lv["level"], f"{lv['type']} {lv['frame']}",
            "" if lv["index"] is None else f"[{lv['index']}] {lv['value']}",
            f"{lv['event']:,}", why, str(lv["vcpu"]), lv["cr3"] or "-", lv["pc"] or "-",
            lv["symbol"] or "-",
            "" if gone is None else f"{gone['event']:,} {gone['reason']}",
        ))
    return table


def _print_timeline(tl: dict[str, Any]) -> None:
    out = _wide()
    g = tl["guest"]
    ans = tl["answer"]
    out.print(Text.assemble((f"watched VA {tl['va']}", "bold"),
                            f": {g['accesses']:,} accesses, "
                            f"{g['table_writes_total']:,} table writes on its guest path"))
    for label in ("first_access", "first_write"):
        ev = g[label]
        if ev is not None:
            out.print(f"  {label.replace('_', ' ')}: event {ev['event']:,} {ev['kind']} "
                       f"vCPU {ev['vcpu']} CR3 {ev['cr3']} PC {ev['pc']} "
                       f"{ev['symbol'] or ''}".rstrip(), markup=False)
    eps = tl["episodes"]
    if not eps:
        out.print("  no complete shadow path was built for it")
    else:
        # the root the guest ran on when the path first became complete
        main = next((e for e in eps if e["cr3"] and int(e["cr3"], 16) >> 12 << 12
                     == int(e["root"], 16)), eps[0])
        out.print(_episode_table(tl, main))
        others = [e for e in eps if e is not main]
        if others:
            t = Table(title="other roots reaching it", show_header=True)
            for col in ("root", "complete", "built under this root", "shared levels", "ended"):
                t.add_column(col)
            for e in others:
                shared = [lv["level"] for lv in e["levels"] if lv["shared"]]
                here = [lv["level"] for lv in e["levels"][1:] if not lv["shared"]]
                end = e["ended"]
                t.add_row(*_cells(e["root"], f"{e['complete_event']:,}", " ".join(here) or "-",
                                  " ".join(shared) or "-",
                                  "-" if end is None else f"{end['event']:,} {end['reason']}"))
            out.print(t)
        if tl["episodes_dropped"]:
            out.print(f"  ({tl['episodes_dropped']} more episodes not kept)")
    when = {
        "first-access": "built by its first access",
        "before-first-access": "built before its first access",
        "after-first-access": "built after its first access",
        "never": "never built",
        "no-access": "built, though the guest never accessed it",
    }[ans["when"]]
    where = ""
    if ans["leaf_event"] is not None:
        sym = f" {ans['leaf_symbol']}" if ans["leaf_symbol"] else ""
        where = f" (event {ans['leaf_event']:,}, {ans['leaf_reason']}, PC {ans['leaf_pc']}{sym})"
    out.print(f"  answer: the shadow leaf entry was {when}{where}", markup=False)


def print_replay_summary(doc: dict[str, Any]) -> None:
    """The replay results (``replay.report.results.build``) for people."""
    out = _wide()
    tr = doc["trace"]
    rp = doc["replay"]
    head = tr["header"]
    out.print(Text.assemble(
        (f"replay {tr['path']}", "bold"),
        f": scenario {head.get('scenario')}, {rp['events']:,} events, "
        f"{rp['accesses']:,} accesses ({rp['deduplicated']:,} dropped as repeats"
        f"{'' if rp['dedup'] else ', dedup off'}), {rp['duration_s']:.1f} s"))
    if doc["truncated"]:
        out.print("[bold red]TRUNCATED trace[/bold red]: no footer; the valid prefix was "
                   "replayed, results stop there")
    counters = Table(title=f"counters (config {doc['config']['opt_flags']}, "
                     f"pool {doc['config']['pool']:,} pages)", show_header=True)
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for name, value in doc["counters"].items():
        if value and not name.startswith(("shadow_created", "shadow_destroyed")):
            counters.add_row(name, f"{value:,}")
    out.print(counters)
    shadows = Table(title="shadows by type", show_header=True)
    for col in ("type", "live at end", "created", "destroyed"):
        shadows.add_column(col, justify="left" if col == "type" else "right")
    for t, v in doc["shadows"].items():
        shadows.add_row(t, f"{v['live']:,}", f"{v['created']:,}", f"{v['destroyed']:,}")
    out.print(shadows)
    c7 = doc["c7"]
    out.print(f"C7 translation mismatches: {c7['mismatches']:,} "
               f"({c7['checked']:,} accesses checked, {c7['unknown']:,} with unknown walks)")
    if doc["hazards"]["count"]:
        out.print(f"exit-less CR3 hazards (C6 input): {doc['hazards']['count']:,}")
    for t in doc["truth"] or []:
        at = ("the trace's end" if t.get("event") is None
              else f"the stop marker, event {t['event']:,}")
        out.print(f"ground truth, vCPU {t['vcpu']} (QEMU's info tlb under CR3 {t['cr3']}, "
                  f"the tables as at {at}): "
                  f"{t['pages']:,} pages, {t['agree']:,} mapped alike by the rebuilt tables, "
                  f"{t['differ']:,} differ, {t['unknown']:,} unknown")
        if t.get("trace_cr3") not in (None, t["cr3"]):
            out.print(f"  (vCPU {t['vcpu']} had CR3 {t['trace_cr3']} at {at}: the "
                      "guest switched address space before the pause)")
    for tl in doc["timelines"] or []:
        _print_timeline(tl)
    findings = doc["findings"]
    if findings is None:
        out.print("secure-page checks: not run")
    else:
        by: dict[str, int] = {}
        for f in findings:
            by[str(f["severity"])] = by.get(str(f["severity"]), 0) + 1
        if not by:
            out.print("findings: none")
        else:
            t = Table(title="findings by severity")
            t.add_column("severity")
            t.add_column("count", justify="right")
            for sev, n in sorted(by.items()):
                t.add_row(_plain(sev), f"{n:,}")
            out.print(t)


# --------------------------------------------------------------------------
# the real Xen (replay.xen)
# --------------------------------------------------------------------------
def print_xen_summary(doc: dict[str, Any]) -> None:
    """``shadowtrace xen``'s table: Xen's records by kind and window."""
    out = _wide()
    out.print(Text(f"Xen run of {doc['scenario']}: {doc['records']:,} records, "
                   f"{doc['duration_s']:.1f} s"))
    windows = ("before", "inside", "after")
    table = Table(title="Xen trace records by kind (guest vCPUs; inside = between the "
                  "start and stop markers)")
    table.add_column("kind")
    for w in windows:
        table.add_column(w, justify="right")
    for kind, by in doc["by_kind"].items():
        table.add_row(_plain(kind), *(f"{by.get(w, 0):,}" for w in windows))
    out.print(table)
    if doc["lost"]:
        out.print(Text(f"WARNING: Xen lost {doc['lost']:,} records (trace buffer full)"))
    if doc["unknown"]:
        out.print(Text(f"{doc['unknown']:,} records of unknown kind (counted, not decoded)"))
    if not doc["symbols"]:
        out.print(Text("no kernel symbols: the guest console had no 'stmark: kernel' line"))
    for label in ("console_log", "xentrace", "parquet"):
        out.print(Text(f"{label.replace('_', ' ')}: {doc[label]}"))


def answer_label(model: dict[str, Any]) -> str:
    """compare's model answer kind as the tables print it (``held`` says
    how the leaf it holds was built before the window)."""
    if model["kind"] == "held" and model.get("built"):
        return f"held (built by {model['built']} at event {model['event']:,})"
    return str(model["kind"])


def print_compare(doc: dict[str, Any]) -> None:
    """``shadowtrace compare``: answers and window metrics, model beside Xen."""
    out = _wide()
    answers = Table(title="first shadow event of each watched VA inside the window")
    for col in ("VA (model)", "model", "model symbol", "VA (Xen)", "Xen", "Xen symbol",
                "agree"):
        answers.add_column(col)
    for a in doc["answers"]:
        m, x = a["model"], a["xen"]
        answers.add_row(_plain(a["va_model"]), _plain(answer_label(m)), _plain(m["symbol"]),
                        _plain(a["va_xen"]), _plain(x["kind"]), _plain(x["symbol"]),
                        "yes" if a["agree"] else "NO")
    out.print(answers)
    start = doc.get("start", "cold")
    metrics = Table(title=f"inside the marker window, model with a {start} start: "
                    "model vs real Xen")
    for col in ("metric", "model", "Xen", "model / Xen"):
        metrics.add_column(col, justify="left" if col == "metric" else "right")
    for m in doc["metrics"]:
        ratio = "-" if m["ratio"] is None else f"{m['ratio']:.3g}"
        metrics.add_row(_plain(m["name"]), _fmt(m["model"]), _fmt(m["xen"]), ratio)
    out.print(metrics)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return f"{value:,}"
