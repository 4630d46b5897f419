"""Presentation: everything that prints for people. Counting lives elsewhere."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from qmp_tools.capture import CaptureResult

_err = Console(stderr=True, highlight=False)
_out = Console(highlight=False)


@contextlib.contextmanager
def progress_printer(title: str) -> Iterator[Callable[[str], None]]:
    """A status line on stderr while the guest runs (plain lines when not a TTY)."""
    start = time.monotonic()
    if _err.is_terminal:
        with _err.status(title) as status:

            def update(msg: str) -> None:
                status.update(f"{title}: {msg} ({time.monotonic() - start:.1f} s)")

            yield update
    else:

        def plain(msg: str) -> None:
            print(f"[{time.monotonic() - start:6.1f} s] {title}: {msg}", file=sys.stderr)

        yield plain


def print_capture_summary(result: CaptureResult) -> None:
    s = result.summary
    table = Table(title=f"capture {result.trace}", show_header=False)
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
    _out.print(f"console log: {result.console_log}")
    if result.truth is not None:
        _out.print(f"ground truth: {result.truth}")


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=1, default=str, sort_keys=False))
