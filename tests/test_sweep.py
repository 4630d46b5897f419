"""``shadowtrace sweep``: its rows are the replays ``shadowtrace replay`` makes.

The sweep runs as a user runs it (a subprocess, a real Dask LocalCluster of
worker processes) on the recorded ``traces/private-root.trace``, OOS x vTLB
over a base config that lists private-root's two roots as CR3 targets
(``traces/configs/targets-always.toml``: with it the findings, not only the
counters, differ between the four configurations). Each row is held against
a separate ``shadowtrace replay --json`` of the same trace with a
``--config`` TOML file holding the base and that row's configuration, and
the README's "Sweeps" table against the rows. Errors (bad ``--set``, an
unreachable scheduler, a worker killed mid-task) end as one line and leave
no worker process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import polars as pl
import pytest

from replay.report.heatmap import PlotSpec, heatmap_data
from replay.sweep.table import COUNTER

from .conftest import run_cli
from .test_replay_cli import one_line

TOP = Path(__file__).resolve().parent.parent
TRACE = TOP / "traces" / "private-root.trace"
BASE = TOP / "traces" / "configs" / "targets-always.toml"
#: The regression suite's replay of TRACE with BASE (default SHOPT knobs).
GOLDEN = TOP / "traces" / "variants" / "private-root+targets-always.expected.json"
#: The sweep of the brief: 2 values x 2 values.
SETS = ("--set", "out_of_sync=true,false", "--set", "virtual_tlb=true,false")


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, Path, str]:
    folder = tmp_path_factory.mktemp("sweep")
    out = folder / "x.parquet"
    proc = run_cli("sweep", str(TRACE), "--config", str(BASE), *SETS, "--out", str(out),
                   "--plot", "out_of_sync,virtual_tlb:C6/high", timeout=600)
    assert proc.returncode == 0, proc.stderr
    return pl.read_parquet(out), folder, proc.stderr


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _by_check_and_severity(findings: list[dict[str, Any]]) -> dict[str, int]:
    """Distinct findings per check, per check/severity and per C6 kind, as the sweep counts."""
    out: dict[str, int] = {}
    for f in findings:
        keys = [f["check"], f"{f['check']}/{f['severity']}"]
        if f["check"] == "C6":
            keys.append(f"C6/{f['severity']}/{f['kind']}")
        for key in keys:
            out[key] = out.get(key, 0) + 1
    return out


def test_four_rows_match_four_replays(swept: tuple[pl.DataFrame, Path, str]) -> None:
    df, folder, stderr = swept
    # 2 x 2 configurations of one trace, the first --set varying slowest
    assert df.height == 4
    combos = [(True, True), (True, False), (False, True), (False, False)]
    assert list(zip(df["out_of_sync"], df["virtual_tlb"], strict=True)) == combos
    # no terminal: one plain line per finished task
    assert sum(line.startswith("sweep: ") and " done (private-root " in line
               for line in stderr.splitlines()) == 4, stderr
    # the four replays, through the CLI, with the configuration in a --config file
    procs = []
    for oos, vtlb in combos:
        name = f"oos-{_bool(oos)}-vtlb-{_bool(vtlb)}"
        cfg = folder / f"{name}.toml"
        cfg.write_text(BASE.read_text()
                       + f"\nout_of_sync = {_bool(oos)}\nvirtual_tlb = {_bool(vtlb)}\n")
        js = folder / f"{name}.json"
        procs.append((js, subprocess.Popen(
            [sys.executable, "-m", "replay.cli", "replay", str(TRACE), "--config", str(cfg),
             "--json", str(js)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL, text=True)))
    docs = []
    for js, proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        docs.append(json.loads(js.read_text()))
    for row, doc in zip(df.iter_rows(named=True), docs, strict=True):
        assert {k: row[f"{COUNTER}{k}"] for k in doc["counters"]} == doc["counters"]
        want = _by_check_and_severity(doc["findings"])
        got = {k: v for k, v in row.items()
               if v and (k in want or (k[:1] == "C" and k[1:2].isdigit()))}
        assert got == want, (row["out_of_sync"], row["virtual_tlb"])
        assert row["findings"] == len(doc["findings"])
        assert row["c7_mismatches"] == doc["c7"]["mismatches"]
        assert row["events"] == doc["replay"]["events"]
        assert row["trace"] == "private-root"
        assert row["wall_s"] > 0
    # the configurations were really applied: with SHOPT_OUT_OF_SYNC off no
    # page ever goes out of sync, and the four rows differ
    assert [u == 0 for u in df[f"{COUNTER}shadow_unsync"]] == [False, False, True, True]
    assert df["C6/high"].n_unique() > 1
    # the upstream row (both on) is the regression suite's replay with BASE
    golden = json.loads(GOLDEN.read_text())["expected"]
    first = df.row(0, named=True)
    assert {k: first[f"{COUNTER}{k}"] for k in golden["counters"]} == golden["counters"]
    by_key = {k: v for k, v in first.items() if v and "/" in k and k[:1] == "C"
              and not (k.startswith("C6/") and k.count("/") == 1)}
    assert by_key == golden["findings"]


def test_heatmap_is_built_from_the_table(swept: tuple[pl.DataFrame, Path, str]) -> None:
    df, folder, _ = swept
    # the --plot of the sweep went beside --out
    png = folder / "x.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keys = ["out_of_sync", "virtual_tlb"]

    def cells(measure: str, x: str = "out_of_sync", y: str = "virtual_tlb") -> Any:
        return heatmap_data(df, PlotSpec(x, y, measure), keys)

    # x: out_of_sync true, false; y: virtual_tlb true, false. Each exit-less
    # switch pair leaves 2 oos-stale hazards when OOS is on and 2 vtlb-live
    # when the vTLB is on (GOLDEN: 2 and 2 with both on), whatever the other is
    oos = cells("C6/high/oos-stale")
    assert (oos.xs, oos.ys) == (["true", "false"], ["true", "false"])
    assert oos.values == [[2.0, 0.0], [2.0, 0.0]]
    assert oos.max_over == {}
    assert cells("C6/high/vtlb-live").values == [[2.0, 2.0], [0.0, 0.0]]
    # each cell is the row of its two values
    unsync = cells("shadow_unsync")
    assert unsync.column == "counters.shadow_unsync"  # a bare counter name is found
    for r in df.iter_rows(named=True):
        i, j = unsync.ys.index(_bool(r["virtual_tlb"])), unsync.xs.index(_bool(r["out_of_sync"]))
        assert unsync.values[i][j] == r["counters.shadow_unsync"]
    # over one swept key and the trace, the other key is aggregated by max, and said so
    agg = cells("C6/high/vtlb-live", y="trace")
    assert agg.values == [[2.0, 2.0]]
    assert agg.max_over == {"virtual_tlb": 2}
    assert agg.note() == "max over virtual_tlb (2 values)"


#: The variant expectation files of private-root with the list in force from
#: secure-root, by (out_of_sync, virtual_tlb) (traces/configs/targets*.toml).
SECURE_GOLDENS = {
    (True, True): "targets", (False, True): "targets-no-oos", (True, False): "targets-no-vtlb",
    (False, False): "targets-no-oos-no-vtlb",
}
C6_KINDS = ("no-shadow-for-target", "oos-stale", "vtlb-live")


def _readme_sweep_rows() -> list[list[str]]:
    lines = (TOP / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.startswith("| cr3_targets_active | out_of_sync | virtual_tlb |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def test_readme_sweep_table(swept: tuple[pl.DataFrame, Path, str]) -> None:
    """The README's "Sweeps" table: the ``always`` rows are this sweep's (BASE
    lists the roots from the start), the ``secure`` rows the regression
    suite's expectation files of the same configurations."""
    df, _, _ = swept
    rows = _readme_sweep_rows()
    assert len(rows) == 8  # 2 x 2 x 2: cr3_targets_active x out_of_sync x virtual_tlb
    for active, oos_text, vtlb_text, high, *cells in rows:
        oos, vtlb = oos_text == "true", vtlb_text == "true"
        want = [int(high), *(int(c) for c in cells)]
        if active == "always":
            r = df.filter((pl.col("out_of_sync") == oos) & (pl.col("virtual_tlb") == vtlb)
                          ).row(0, named=True)
            got = [r["C6/high"], *(r.get(f"C6/high/{k}", 0) for k in C6_KINDS), r["C6/info"]]
        else:
            assert active == "secure"
            name = f"private-root+{SECURE_GOLDENS[(oos, vtlb)]}.expected.json"
            found = json.loads((TOP / "traces" / "variants" / name).read_text())
            f = found["expected"]["findings"]
            got = [sum(n for k, n in f.items() if k.startswith("C6/high/")),
                   *(f.get(f"C6/high/{k}", 0) for k in C6_KINDS),
                   sum(n for k, n in f.items() if k.startswith("C6/info/"))]
        assert got == want, (active, oos, vtlb)


@pytest.mark.parametrize(("sets", "words"), [
    (["out_of_sync"], ["expected KEY=V1,V2"]),
    (["no_such_knob=1"], ["unknown engine option 'no_such_knob'", "out_of_sync", "pool_pages"]),
    (["out_of_sync=maybe"], ["out_of_sync takes true or false", "'maybe'"]),
    (["cr3_targets_active=never"], ["cr3_targets_active must be one of always, secure"]),
    (["pool_pages=lots"], ["pool_pages takes a number or 'default'"]),
    (["pool_pages=0"], ["pool_pages must be positive"]),
    (["out_of_sync=true", "out_of_sync=false"], ["'out_of_sync' is already set"]),
    (["out_of_sync=true,true"], ["given twice"]),
])
def test_bad_set_is_one_line_and_exit_2(tmp_path: Path, sets: list[str],
                                        words: list[str]) -> None:
    args = [a for s in sets for a in ("--set", s)]
    proc = run_cli("sweep", str(TRACE), *args, "--out", str(tmp_path / "x.parquet"))
    assert proc.returncode == 2, proc.stderr
    line = one_line(proc.stderr)
    for word in words:
        assert word in line
    assert not (tmp_path / "x.parquet").exists()


def test_bad_plot_and_missing_trace(tmp_path: Path) -> None:
    out = str(tmp_path / "x.parquet")
    proc = run_cli("sweep", str(TRACE), "--set", "out_of_sync=true,false", "--out", out,
                   "--plot", "out_of_sync,prefetch:C6")
    assert proc.returncode == 2
    assert "'prefetch' is not a swept key" in one_line(proc.stderr)
    proc = run_cli("sweep", str(tmp_path / "none.trace"), "--set", "out_of_sync=true",
                   "--out", out)
    assert proc.returncode == 1
    assert "no such trace" in one_line(proc.stderr)


def test_unreachable_scheduler(tmp_path: Path) -> None:
    start = time.monotonic()
    proc = run_cli("sweep", str(TRACE), "--set", "out_of_sync=true", "--out",
                   str(tmp_path / "x.parquet"), "--address", "tcp://127.0.0.1:1",
                   "--connect-timeout", "1", timeout=60)
    took = time.monotonic() - start
    assert proc.returncode == 1
    assert "cannot reach the scheduler" in one_line(proc.stderr)
    # --connect-timeout 1 (the default is 5 s); the rest is Python starting up
    assert took < 15, took
    bad = run_cli("sweep", str(TRACE), "--set", "out_of_sync=true", "--out",
                  str(tmp_path / "x.parquet"), "--connect-timeout", "0")
    assert bad.returncode == 2 and "--connect-timeout 0" in one_line(bad.stderr)


def _children(pid: int) -> list[int]:
    """The child processes of ``pid``, made by any of its threads."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _has_open(pid: int, path: Path) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if Path(os.readlink(fd)) == path:
                return True
        except OSError:
            continue
    return False


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def test_killed_worker_is_one_line_and_leaves_no_process(tmp_path: Path) -> None:
    # Dask retries a task whose worker died (allowed-failures, 3 by default);
    # with 0 the first death fails the sweep
    env = {**os.environ, "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "replay.cli", "sweep", str(TRACE), "--set",
         "out_of_sync=true,false", "--workers", "2", "--out", str(tmp_path / "x.parquet")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env=env)
    workers: list[int] = []
    seen: set[int] = set()
    busy: list[int] = []
    deadline = time.monotonic() + 120
    # a worker with the trace open is inside its task (a replay takes seconds)
    while not busy and time.monotonic() < deadline and proc.poll() is None:
        workers = [p for p in _children(proc.pid) if "spawn_main" in _cmdline(p)]
        seen.update(_children(proc.pid))
        busy = [p for p in workers if _has_open(p, TRACE)]
        time.sleep(0.05)
    assert busy, "no worker process opened the trace"
    os.kill(busy[0], signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err
    line = one_line(err)
    assert "the worker running it died" in line
    assert "private-root out_of_sync=" in line
    # the cluster was closed: none of the sweep's processes is left (a worker
    # still tearing down its memory when the sweep exits is given a moment)
    seen.update(workers)
    deadline = time.monotonic() + 10
    while (left := [p for p in seen if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert left == [], [_cmdline(p) for p in left]
