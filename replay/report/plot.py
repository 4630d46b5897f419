"""``shadowtrace plot``: a PNG timeline of one replay, over event index.

Counting and drawing are apart: :func:`series_for` (or :func:`collect` on
an open reader) replays the trace and returns a :class:`Series` -- per bin
of event indexes: live shadows at the bin's end (from the engine's
``created`` / ``destroyed`` / ``reset`` facts, in all and per type), shadow
faults, prefetched entries and CR3 writes, plus the markers worth a line
(``start``, ``stop``, ``secure-*``). :func:`draw` turns a Series into a PNG
with matplotlib's Agg backend.

Faults and prefetches are the engine's ``shadow_fault`` and
``shadow_prefetch`` counters, sampled after every event that reaches the
engine, so their totals are the counters' final values. CR3 writes are the
CR3_WRITE events the engine is fed (every one: the replayer never drops
them), so their total is the trace's CR3_WRITE count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..driver.replayer import Replayer
from ..driver.tools import NO_ACCESSES, Interest
from ..shadow.config import engine_config
from ..shadow.engine import ShadowEngine
from ..shadow.types import Fact, ShadowType
from ..trace import format as fmt
from ..trace.reader import TraceReader

#: Marker names drawn as vertical lines.
LINE_MARKERS = (fmt.MARKER_START, fmt.MARKER_STOP, fmt.MARKER_SECURE_FRAME,
                fmt.MARKER_SECURE_ROOT, fmt.MARKER_SECURE_VA, fmt.MARKER_SECURE_END)
_CR3_WRITE = int(fmt.Kind.CR3_WRITE)
TYPE_NAMES = {int(t): t.name.lower() for t in ShadowType}


@dataclass
class Series:
    """What :func:`draw` draws; arrays have one value per bin."""

    scenario: str
    trace: str
    events: int
    #: Bin edges over event index (``bins + 1`` values, the last = ``events``).
    edges: npt.NDArray[np.int64]
    #: Live shadows at the end of each bin (all types), and per type name.
    live: npt.NDArray[np.int64]
    live_by_type: dict[str, npt.NDArray[np.int64]]
    faults: npt.NDArray[np.int64]
    prefetches: npt.NDArray[np.int64]
    cr3_writes: npt.NDArray[np.int64]
    #: (event index, marker text) of the markers drawn as lines.
    markers: list[tuple[int, str]] = field(default_factory=list)
    #: Most live shadows at any event.
    live_max: int = 0

    @property
    def bins(self) -> int:
        return len(self.edges) - 1

    def totals(self) -> dict[str, int]:
        return {"faults": int(self.faults.sum()), "prefetches": int(self.prefetches.sum()),
                "cr3_writes": int(self.cr3_writes.sum()), "live_end": int(self.live[-1]),
                "live_max": self.live_max}


class _Counter:
    """Engine fact sink and event hook that logs what the Series needs."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.live: dict[tuple[int, int], None] = {}
        #: (event, type or -1 for reset, +1/-1/0) per change of the pool.
        self.pool: list[tuple[int, int, int]] = []
        self.faults: list[tuple[int, int]] = []
        self.prefetches: list[tuple[int, int]] = []
        self.cr3: list[int] = []
        self.markers: list[tuple[int, str]] = []
        self._faults = 0
        self._prefetches = 0

    def fact(self, f: Fact) -> None:
        key = (f.frame, f.type)
        if f.kind == "created" and key not in self.live:
            self.live[key] = None
            self.pool.append((f.event, f.type, 1))
        elif f.kind == "destroyed" and key in self.live:
            del self.live[key]
            self.pool.append((f.event, f.type, -1))
        elif f.kind == "reset":
            for frame_type in self.live:
                self.pool.append((f.event, frame_type[1], -1))
            self.live.clear()

    def interest(self) -> Interest:
        """Event tool: the engine's events only (counters change at those)."""
        return NO_ACCESSES

    def on_event(self, index: int, kind: int, vcpu: int, info: int, va: int, pa: int,
                 val: int, marker: list[str] | None) -> None:
        c = self.counters
        faults, prefetches = c["shadow_fault"], c["shadow_prefetch"]
        if faults != self._faults:
            self.faults.append((index, faults - self._faults))
            self._faults = faults
        if prefetches != self._prefetches:
            self.prefetches.append((index, prefetches - self._prefetches))
            self._prefetches = prefetches
        if kind == _CR3_WRITE:
            self.cr3.append(index)
        elif marker is not None:
            words = " ".join(marker).split()
            if words and words[0] in LINE_MARKERS:
                self.markers.append((index, " ".join(words)))


def collect(reader: TraceReader, config: Any, *, bins: int = 400) -> Series:
    """Replay ``reader`` with engine config ``config`` and count per bin."""
    counter = _Counter()
    engine = ShadowEngine(config, on_fact=counter.fact)
    counter.counters = engine.counters
    Replayer(engine, tools=[counter]).run(reader)
    events = reader.events
    edges = np.unique(np.linspace(0, max(events, 1), bins + 1).round().astype(np.int64))

    def per_bin(pairs: list[tuple[int, int]]) -> npt.NDArray[np.int64]:
        if not pairs:
            return np.zeros(len(edges) - 1, dtype=np.int64)
        at, n = np.array(pairs, dtype=np.int64).T
        return np.histogram(at, bins=edges, weights=n)[0].astype(np.int64)

    def live_at_ends(changes: list[tuple[int, int]]) -> tuple[npt.NDArray[np.int64], int]:
        if not changes:
            return np.zeros(len(edges) - 1, dtype=np.int64), 0
        at, d = np.array(changes, dtype=np.int64).T
        level = np.cumsum(d)
        # value after the last change before each bin's end
        k = np.searchsorted(at, edges[1:], side="left") - 1
        return np.where(k >= 0, level[np.maximum(k, 0)], 0), int(level.max())

    live, live_max = live_at_ends([(e, d) for e, _, d in counter.pool])
    by_type = {name: live_at_ends([(e, d) for e, t, d in counter.pool if t == code])[0]
               for code, name in TYPE_NAMES.items()}
    header = reader.header
    return Series(
        scenario=str(header.get("scenario") or "?"), trace=Path(reader.path).name,
        events=events, edges=edges, live=live, live_by_type=by_type,
        faults=per_bin(counter.faults), prefetches=per_bin(counter.prefetches),
        cr3_writes=per_bin([(i, 1) for i in counter.cr3]), markers=counter.markers,
        live_max=live_max,
    )


def series_for(trace: str | Path, config_path: Path | None = None, *,
               bins: int = 400) -> Series:
    """:func:`collect` on a trace file; the engine config as ``replay`` makes it."""
    with TraceReader(trace) as reader:
        return collect(reader, engine_config(config_path, reader.header), bins=bins)


def draw(series: Series, out: str | Path, *, size: tuple[float, float] = (12.0, 8.0),
         dpi: int = 100) -> None:
    """Write ``series`` as a PNG of ``size`` inches at ``dpi``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=dpi, layout="constrained")
    ax_live, ax_faults, ax_cr3 = fig.subplots(3, 1, sharex=True,
                                              height_ratios=(3, 3, 2))
    x = series.edges[1:]
    # each value holds over its bin (it is the count at the bin's end)
    ax_live.step(x, series.live, where="pre", color="black", lw=1.6, label="all")
    for name, values in series.live_by_type.items():
        if values.any():
            ax_live.step(x, values, where="pre", lw=0.9, label=name)
    ax_live.set_ylim(0, series.live_max * 1.3 + 1)  # room for the legend above the lines
    ax_live.set_ylabel("live shadows")
    ax_live.legend(loc="upper left", fontsize="small", ncols=6)

    width = np.diff(series.edges)
    t = series.totals()
    ax_faults.bar(series.edges[:-1], series.faults, width=width, align="edge",
                  color="tab:red", alpha=0.75, label=f"shadow faults ({t['faults']})")
    ax_faults.bar(series.edges[:-1], series.prefetches, width=width, align="edge",
                  color="tab:blue", alpha=0.5, label=f"prefetched entries ({t['prefetches']})")
    ax_faults.set_yscale("log")
    ax_faults.set_ylim(bottom=0.8)
    ax_faults.set_ylabel(f"per bin of {int(width.mean())} events")
    ax_faults.legend(loc="upper left", fontsize="small")

    ax_cr3.step(x, np.cumsum(series.cr3_writes), where="pre", color="tab:green",
                label=f"CR3 writes, cumulative ({t['cr3_writes']})")
    ax_cr3.set_ylabel("CR3 writes")
    ax_cr3.set_xlabel("event index")
    ax_cr3.legend(loc="upper left", fontsize="small")
    ax_cr3.set_xlim(0, series.events)

    # marker lines; labels above the top axes, in rows when they crowd
    colours = {fmt.MARKER_START: "tab:green", fmt.MARKER_STOP: "tab:red"}
    row_end: list[float] = []
    span = max(series.events, 1)
    for index, text in series.markers:
        name = text.split()[0]
        colour = colours.get(name, "tab:purple")
        for ax in (ax_live, ax_faults, ax_cr3):
            ax.axvline(index, color=colour, ls="--", lw=0.8, alpha=0.8)
        at = index / span
        row = next((r for r, end in enumerate(row_end) if at > end), len(row_end))
        ha = "right" if at > 0.85 else "left"
        if row == len(row_end):
            row_end.append(0.0)
        row_end[row] = at + 0.01 * len(text) if ha == "left" else at
        ax_live.annotate(text, (index, 1.0), xycoords=("data", "axes fraction"),
                         xytext=(0, 2 + 9 * row), textcoords="offset points",
                         va="bottom", ha=ha, fontsize="x-small", color=colour)
    ax_live.set_title(" ", pad=6 + 9 * len(row_end))  # room for the marker rows
    fig.suptitle(f"{series.scenario}: {series.trace}, {series.events} events "
                 f"(live shadows max {t['live_max']})")
    fig.savefig(out, dpi=dpi, format="png")
