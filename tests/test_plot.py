"""``shadowtrace plot``: the counted series are right, and the PNG is a real
image of the requested size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from replay.report.plot import Series, draw, series_for
from replay.trace import format as fmt
from replay.trace.reader import read_all

from .conftest import run_cli
from .replays import Goldens

SEED = Path(__file__).resolve().parent.parent / "traces" / "seed.trace"


@pytest.fixture(scope="module")
def seed_series() -> Series:
    return series_for(SEED, bins=200)


def test_series_totals(seed_series: Series, goldens: Goldens) -> None:
    s = seed_series
    _, chunks, footer = read_all(SEED)
    assert footer is not None
    kinds = np.concatenate([c.kind for c in chunks])
    engine = goldens("seed").replay.engine  # seed as `shadowtrace check` replays it
    assert s.events == len(kinds) == footer["events"]
    assert s.bins == 200 and s.edges[0] == 0 and s.edges[-1] == s.events
    assert len(s.faults) == len(s.prefetches) == len(s.cr3_writes) == len(s.live) == s.bins
    # every CR3_WRITE of the trace, in the bin of its index
    assert s.cr3_writes.sum() == int((kinds == fmt.Kind.CR3_WRITE).sum()) == 10
    where = np.flatnonzero(kinds == fmt.Kind.CR3_WRITE)
    np.testing.assert_array_equal(s.cr3_writes, np.histogram(where, bins=s.edges)[0])
    # faults and prefetches add up to the engine's counters
    c = engine.counters
    assert s.faults.sum() == c["shadow_fault"] and s.prefetches.sum() == c["shadow_prefetch"]
    # the pool at the end: created minus destroyed, per type too
    assert s.live[-1] == c["shadow_created"] - c["shadow_destroyed"] == len(engine.shadows)
    for name, values in s.live_by_type.items():
        assert values[-1] == c[f"shadow_created_{name}"] - c[f"shadow_destroyed_{name}"]
    assert s.live_max >= s.live.max()
    assert [text for _, text in s.markers] == ["start", "stop"]


def test_png_decodes_with_size(seed_series: Series, tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "seed.png"
    draw(seed_series, out, size=(9.0, 6.0), dpi=100)
    img = matplotlib.image.imread(out)
    assert img.shape[:2] == (600, 900)
    # not a blank canvas: drawn pixels of several colours
    assert len(np.unique(img.reshape(-1, img.shape[-1]), axis=0)) > 20


def test_plot_cli(tmp_path: Path) -> None:
    import matplotlib.image

    out = tmp_path / "p.png"
    proc = run_cli("plot", str(SEED), "--out", str(out), "--size", "8x5", "--bins", "50")
    assert proc.returncode == 0, proc.stderr
    assert matplotlib.image.imread(out).shape[:2] == (500, 800)
    bad = run_cli("plot", str(SEED), "--out", str(out), "--size", "big")
    assert bad.returncode == 1 and len(bad.stderr.splitlines()) == 1
