"""Run a sweep on Dask distributed: one task per (trace, configuration).

Each task is one call of :func:`replay.session.replay` (the one replay
wiring) with the sweep's replay options and the configuration as
``config_overrides``; it returns its table row (:func:`replay.sweep.table.row`).

Where it runs: by default a :class:`distributed.LocalCluster` of worker
processes (one thread each, as many as there are cores or tasks, whichever
is fewer), closed when the sweep ends, however it ends; with ``address``, a
running scheduler's workers. Workers open the trace by its absolute path:
they must see the same files (this machine, or a shared file system mounted
at the same place) and have shadowtrace installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import ShadowtraceError, UsageError
from ..session import ReplayOptions
from .grid import Grid, describe

#: Seconds to wait for a scheduler given with ``--address`` (the default of
#: ``--connect-timeout``).
CONNECT_TIMEOUT = 5.0


class SweepError(ShadowtraceError):
    """A sweep that could not finish (a task failed, a worker died)."""


@dataclass(frozen=True)
class Task:
    """One replay of a sweep: its place in the table, its options, its configuration."""

    index: int
    opts: ReplayOptions
    combo: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.opts.trace.name.removesuffix('.trace')} {describe(self.combo)}"


def tasks(traces: Sequence[Path], grid: Grid, base: ReplayOptions) -> list[Task]:
    """Every (trace, configuration) of the sweep, traces first, each checked here.

    The trace must open and every configuration must make a valid engine config
    over the trace header and the base config file (so that a mistake is found
    before any worker starts).
    """
    from ..shadow.config import engine_config
    from ..trace.reader import TraceReader

    out: list[Task] = []
    for trace in traces:
        if not trace.is_file():
            raise UsageError(f"{trace}: no such trace")
        with TraceReader(trace, allow_truncated=base.allow_truncated) as reader:
            header = reader.header
        for combo in grid.combinations():
            try:
                engine_config(base.config, header, combo)
            except UsageError as err:
                raise UsageError(f"{trace} ({describe(combo)}): {err}") from None
            opts = replace(base, trace=trace.resolve(), config_overrides=combo, progress=False,
                           json=None, parquet=None)
            out.append(Task(len(out), opts, combo))
    return out


def run_task(task: Task) -> dict[str, Any]:
    """What a worker runs: one replay, as one table row."""
    from ..session import replay
    from .table import row

    start = time.monotonic()
    try:
        done = replay(task.opts)
    except ShadowtraceError as err:
        # a plain error travels back from the worker whole (some of ours do not pickle)
        raise SweepError(f"{task.label}: {err}") from None
    return row(task.opts.trace, task.combo, done.doc, time.monotonic() - start)


def run(
    todo: Sequence[Task], *, address: str | None = None, workers: int | None = None,
    on_done: Callable[[int, Task, float], None] = lambda n, t, s: None,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> list[dict[str, Any]]:
    """Run every task; the rows in task order. ``on_done(n_done, task, wall_s)``
    is called as each one finishes; ``connect_timeout``: seconds to wait for
    the scheduler at ``address``."""
    from distributed import as_completed
    from distributed.client import FutureCancelledError
    from distributed.scheduler import KilledWorker

    rows: list[dict[str, Any] | None] = [None] * len(todo)
    n = workers or max(1, min(_cores(), len(todo)))
    with _client(address, n, connect_timeout) as client:
        futures = {client.submit(run_task, t, key=f"sweep-{t.index}-{os.getpid()}",
                                 pure=False): t for t in todo}
        try:
            for n_done, fut in enumerate(as_completed(futures), 1):
                task = futures[fut]
                try:
                    got = fut.result()
                except KilledWorker:
                    raise SweepError(f"{task.label}: the worker running it died, as many "
                                     "times as Dask retries a task (distributed.scheduler."
                                     "allowed-failures)") from None
                except FutureCancelledError:
                    raise SweepError(f"{task.label}: cancelled (the scheduler went away?)"
                                     ) from None
                rows[task.index] = got
                on_done(n_done, task, float(got["wall_s"]))
        finally:
            client.cancel(list(futures))
    return [r for r in rows if r is not None]


@contextlib.contextmanager
def _client(address: str | None, workers: int, timeout: float) -> Iterator[Any]:
    """A Dask client: of the scheduler at ``address``, else of a LocalCluster
    started here and closed on the way out (whatever happens in between)."""
    from distributed import Client, LocalCluster

    if address is not None:
        try:
            client = Client(address, timeout=timeout)
        except (OSError, TimeoutError, ValueError) as err:
            raise UsageError(f"--address {address}: cannot reach the scheduler: {err}") from None
        try:
            yield client
        finally:
            client.close()
        return
    # loopback only; the scheduler's HTTP server (the dashboard, when bokeh is
    # installed) on a free port, not 8787, which another cluster may hold
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                           host="127.0.0.1", dashboard_address="127.0.0.1:0",
                           silence_logs=logging.CRITICAL)
    try:
        client = Client(cluster)
        try:
            yield client
        finally:
            client.close()
    finally:
        cluster.close()


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
