"""Replay results as Parquet tables, via polars (``shadowtrace replay --parquet DIR``).

``events.parquet``: the events of interest
(:class:`~replay.analysis.events.EventTable`: every non-access event, every
access at which the engine did something, every access to a watched page; at
most ``max_rows``); ``shadows.parquet``: one row per shadow life
(:class:`~replay.analysis.lifetimes.ShadowLifetimes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..analysis.events import EventTable
from ..analysis.lifetimes import ShadowLifetimes
from ..errors import UsageError
from ..trace import format as fmt
from .results import Namer, _sym


def write_parquet(
    folder: str | Path,
    events: EventTable | None,
    lifetimes: ShadowLifetimes,
    namer: Namer | None = None,
) -> list[Path]:
    """Write ``events.parquet`` and ``shadows.parquet`` into ``folder``."""
    import polars as pl

    d = Path(folder)
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"{d}: cannot create: {err.strerror}") from err
    written = []
    if events is not None:
        cols = events.columns()
        kinds = {int(k): k.name for k in fmt.Kind}
        pcs, inverse = np.unique(cols["pc"], return_inverse=True)
        names = [_sym(namer, int(pc)) for pc in pcs.tolist()]
        symbol = [names[i] for i in inverse.ravel().tolist()]
        df = pl.DataFrame({
            "index": pl.Series(cols["index"], dtype=pl.UInt64),
            "kind": pl.Series([kinds[k] for k in cols["kind"].tolist()], dtype=pl.Utf8),
            "vcpu": pl.Series(cols["vcpu"], dtype=pl.UInt8),
            "info": pl.Series(cols["info"], dtype=pl.UInt8),
            "va": pl.Series(cols["va"], dtype=pl.UInt64),
            "pa": pl.Series(cols["pa"], dtype=pl.UInt64),
            "pc": pl.Series(cols["pc"], dtype=pl.UInt64),
            "val": pl.Series(cols["val"], dtype=pl.UInt64),
            "faulted": pl.Series(cols["faulted"], dtype=pl.Boolean),
            "symbol": pl.Series(symbol, dtype=pl.Utf8),
        })
        written.append(_write(df, d / "events.parquet"))
    rows = lifetimes.all_rows()
    sdf = pl.DataFrame({
        "frame": pl.Series([r.frame for r in rows], dtype=pl.UInt64),
        "type": pl.Series([r.type for r in rows], dtype=pl.Utf8),
        "created": pl.Series([r.created for r in rows], dtype=pl.Int64),
        "created_reason": pl.Series([r.created_reason for r in rows], dtype=pl.Utf8),
        "destroyed": pl.Series([r.destroyed for r in rows], dtype=pl.Int64),
        "destroyed_reason": pl.Series([r.destroyed_reason for r in rows], dtype=pl.Utf8),
    })
    written.append(_write(sdf, d / "shadows.parquet"))
    return written


def _write(df: Any, path: Path) -> Path:
    try:
        df.write_parquet(path)
    except OSError as err:
        raise UsageError(f"{path}: cannot write: {err.strerror}") from err
    return path
