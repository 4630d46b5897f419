"""What a sweep shows while it runs and when it ends.

On a terminal, a rich progress bar on stderr; elsewhere one plain line on
stderr per finished task::

    sweep: 3/8 done (private-root out_of_sync=false virtual_tlb=true) 3.4 s
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.table import Table

from ..analysis.checks.findings import CHECKS
from .grid import value_text
from .run import Task

_err = Console(stderr=True, highlight=False)


@contextlib.contextmanager
def sweep_progress(total: int) -> Iterator[Callable[[int, Task, float], None]]:
    """Yields ``done(n_done, task, wall_s)`` for :func:`replay.sweep.run.run`."""
    if not _err.is_terminal:

        def plain(n: int, task: Task, wall: float) -> None:
            print(f"sweep: {n}/{total} done ({task.label}) {wall:.1f} s", file=sys.stderr,
                  flush=True)

        yield plain
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("sweep"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[last]}"), TimeElapsedColumn())
    with Progress(*columns, console=_err, transient=True) as bar:
        job = bar.add_task("sweep", total=total, last="")

        def update(n: int, task: Task, wall: float) -> None:
            bar.update(job, completed=n, last=f"{task.label} {wall:.1f} s")

        yield update


def print_summary(df: Any, keys: list[str]) -> None:
    """The swept keys and the findings per check of each row, on stdout."""
    checks = list(CHECKS)
    table = Table(show_header=True)
    for col in ["trace", *keys, "findings", *checks, "wall_s"]:
        table.add_column(col, justify="left" if col in ("trace", *keys) else "right")
    for r in df.iter_rows(named=True):
        cells = [str(r["trace"])]
        cells += [value_text(r[k]) for k in keys]
        cells += [str(r["findings"]), *(str(r[c]) if r[c] else "-" for c in checks)]
        cells.append(f"{r['wall_s']:.1f}")
        table.add_row(*cells)
    out = Console(highlight=False)
    if not out.is_terminal:  # a file or a pipe: no 80-column wrap
        out = Console(highlight=False, width=max(80, 12 * (len(keys) + 12)))
    out.print(table)
