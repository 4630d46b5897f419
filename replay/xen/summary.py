"""Turn one Xen run into its table: decode, annotate, write Parquet, count.

Counting only; :func:`replay.report.print_xen_summary` prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from ..errors import UsageError
from ..guest.symbols import from_markers
from .annotate import annotate, console_markers
from .decode import decode

#: The windows of :func:`replay.xen.annotate.annotate`, in time order.
WINDOWS: tuple[str, ...] = ("before", "marker", "inside", "after")


@dataclass
class XenTable:
    """The decoded and annotated records of one Xen run."""

    table: pl.DataFrame
    lost: int
    unknown: int
    #: True when the guest's console named kernel symbols (a ``stmark: kernel`` line)
    symbols: bool


def namer_for(console: str, kallsyms: Path | None, module_dirs: Sequence[Path]) -> Callable[
    [int], str
]:
    """PC -> ``symbol+0xoff [module]`` for a guest that printed its markers."""
    markers = [text.split() for text in console_markers(console)]
    syms = from_markers(markers, system_map=kallsyms, module_dirs=module_dirs)
    return syms.name


def build_table(
    raw: Path,
    *,
    console: str,
    pcpus: Sequence[int],
    kallsyms: Path | None = None,
    module_dirs: Sequence[Path] = (),
    names: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> XenTable:
    """Decode ``raw`` and give its rows vCPU, window and symbols."""
    decoded = decode(raw, progress=progress)
    has_kernel = any(t.startswith("kernel _text ") for t in console_markers(console))
    name_pc = namer_for(console, kallsyms, module_dirs) if kallsyms is not None else None
    df = annotate(decoded, pcpus=pcpus, console=console, name_pc=name_pc, names=names)
    return XenTable(df, decoded.lost, decoded.unknown, has_kernel and name_pc is not None)


def counts(df: pl.DataFrame) -> dict[str, dict[str, int]]:
    """Records by kind and window: ``{kind: {"before": n, "inside": n, ...}}``,
    guest vCPUs only, kinds in order of their total count."""
    guest = df.filter(pl.col("vcpu").is_not_null())
    grouped = guest.group_by(["kind", "window"]).len()
    out: dict[str, dict[str, int]] = {}
    for kind, window, n in grouped.iter_rows():
        out.setdefault(kind, dict.fromkeys(WINDOWS, 0))[window] = int(n)
    return dict(sorted(out.items(), key=lambda kv: (-sum(kv[1].values()), kv[0])))


def write_parquet(df: pl.DataFrame, path: Path) -> Path:
    try:
        df.write_parquet(path)
    except OSError as err:
        raise UsageError(f"{path}: cannot write: {err.strerror or err}") from None
    return path


def read_parquet(path: Path) -> pl.DataFrame:
    """A table written by :func:`write_parquet` (``NAME.xen.parquet``)."""
    try:
        df = pl.read_parquet(path)
    except (OSError, pl.exceptions.PolarsError) as err:
        raise UsageError(f"{path}: not a Xen record table ({err})") from None
    missing = {"kind", "va", "window", "symbol", "vcpu", "flag_names"} - set(df.columns)
    if missing:
        raise UsageError(f"{path}: not a Xen record table (no {', '.join(sorted(missing))})")
    return df


def summary_doc(xt: XenTable, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Counts and health of a run, as printed and as JSON."""
    return {
        "records": xt.table.height,
        "lost": xt.lost,
        "unknown": xt.unknown,
        "symbols": xt.symbols,
        "by_kind": counts(xt.table),
        **(extra or {}),
    }
