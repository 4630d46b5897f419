"""A heatmap of one measure of a sweep over two of its keys (``sweep --plot``).

``--plot KEY1,KEY2:MEASURE``: KEY1 across (x), KEY2 down (y), each cell the
MEASURE column (``C6``, ``findings``, ``C6/high``, ``counters.shadow_fault``
or just ``shadow_fault``) of the rows with those two values. Where other
columns vary too (the other swept keys, or ``trace`` when the sweep had
several), a cell is the **maximum** over those rows, and the figure says so
("max over virtual_tlb (2 values)"): the worst configuration of the cell.
:func:`heatmap_data` is the table the picture is drawn from.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ArgumentError, UsageError

#: The prefix of engine counter columns (replay.sweep.table.COUNTER).
_COUNTER = "counters."


@dataclass(frozen=True)
class PlotSpec:
    """``--plot X,Y:MEASURE``."""

    x: str
    y: str
    measure: str


@dataclass
class HeatmapData:
    """The cells of a heatmap: ``values[i][j]`` is at ``ys[i]``, ``xs[j]``."""

    spec: PlotSpec
    #: The measure's column (``shadow_fault`` resolved to ``counters.shadow_fault``).
    column: str
    xs: list[str]
    ys: list[str]
    values: list[list[float | None]]
    #: Other columns that vary, with their number of values: a cell is the max over them.
    max_over: dict[str, int]

    def note(self) -> str:
        """``max over virtual_tlb (2 values)``, or "" if each cell is one row."""
        if not self.max_over:
            return ""
        return "max over " + ", ".join(f"{k} ({n} values)" for k, n in self.max_over.items())


def parse_plot(text: str, keys: list[str]) -> PlotSpec:
    """``X,Y:MEASURE`` with X and Y two different swept keys (or ``trace``)."""
    axes, colon, measure = text.partition(":")
    x, comma, y = axes.partition(",")
    x, y, measure = x.strip(), y.strip(), measure.strip()
    if not colon or not comma or not x or not y or not measure or "," in y:
        raise ArgumentError(f"--plot {text!r}: expected KEY1,KEY2:MEASURE "
                            "(e.g. out_of_sync,virtual_tlb:C6)")
    allowed = [*keys, "trace"]
    for key in (x, y):
        if key not in allowed:
            raise ArgumentError(f"--plot {text!r}: {key!r} is not a swept key; "
                                f"one of: {', '.join(allowed)}")
    if x == y:
        raise ArgumentError(f"--plot {text!r}: two different keys, please")
    return PlotSpec(x, y, measure)


def heatmap_data(df: Any, spec: PlotSpec, keys: list[str]) -> HeatmapData:
    """The heatmap's cells from a sweep table (replay.sweep.table.frame)."""
    import polars as pl

    column = _measure_column(df, spec.measure)
    if not df.schema[column].is_numeric() and df.schema[column] != pl.Boolean:
        raise UsageError(f"--plot: column {column!r} is not a number")
    others = [k for k in [*keys, "trace"] if k not in (spec.x, spec.y)]
    max_over = {k: n for k in others if (n := df[k].n_unique()) > 1}
    xs = _levels(df, spec.x)
    ys = _levels(df, spec.y)
    cells = df.group_by([spec.x, spec.y]).agg(pl.col(column).cast(pl.Float64).max())
    got = {(_label(r[spec.x]), _label(r[spec.y])): r[column]
           for r in cells.iter_rows(named=True)}
    values = [[got.get((x, y)) for x in xs] for y in ys]
    return HeatmapData(spec, column, xs, ys, values, max_over)


def draw_heatmap(data: HeatmapData, out: Path) -> None:
    """Write the heatmap as a PNG (matplotlib, Agg), each cell labelled with its value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    grid = np.array([[np.nan if v is None else v for v in row] for row in data.values],
                    dtype=float)
    width = max(4.0, 1.2 * len(data.xs) + 2.5)
    height = max(3.0, 0.8 * len(data.ys) + 2.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    try:
        image = ax.imshow(grid, cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(data.xs)), labels=data.xs)
        ax.set_yticks(range(len(data.ys)), labels=data.ys)
        ax.set_xlabel(data.spec.x)
        ax.set_ylabel(data.spec.y)
        title = data.column
        if data.max_over:
            title += "\n" + textwrap.fill(f"({data.note()})", width=int(8 * width))
        ax.set_title(title, fontsize=10)
        finite = grid[np.isfinite(grid)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for i, row in enumerate(data.values):
            for j, v in enumerate(row):
                text = "-" if v is None else f"{v:g}"
                colour = "white" if v is None or v <= middle else "black"
                ax.text(j, i, text, ha="center", va="center", color=colour)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        try:
            fig.savefig(out)
        except OSError as err:
            raise UsageError(f"{out}: cannot write: {err.strerror or err}") from None
    finally:
        plt.close(fig)


def _measure_column(df: Any, measure: str) -> str:
    if measure in df.columns:
        return measure
    if _COUNTER + measure in df.columns:
        return _COUNTER + measure
    raise UsageError(f"--plot: no column {measure!r} in the sweep's table (findings, C1 .. C8, "
                     "C6/high, C6/high/KIND, c7_mismatches, events, wall_s, or an engine "
                     "counter such as shadow_fault)")


def _levels(df: Any, key: str) -> list[str]:
    """A key's values in the order the sweep gave them (first seen first)."""
    seen: list[str] = []
    for v in df[key].to_list():
        label = _label(v)
        if label not in seen:
            seen.append(label)
    return seen


def _label(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "default" if value is None else str(value)
