"""The commands users run, timed (``make bench-replay``).

* Every recorded trace (``traces/NAME.trace``) replayed by a bare
  :class:`~replay.driver.replayer.Replayer` in this process, and by the
  command ``shadowtrace replay`` with what its expectation file asks for
  (secure specs, watched VAs and console watches) plus, when the file
  registers nothing secure, its watched VAs as secure too: so the checks,
  C7 and the timeline all run, as for a user.
* A whole-boot capture of ``seed`` (``shadowtrace capture --window all``)
  made here, then ``shadowtrace replay`` of it with checks and a watched VA:
  the ratio replay time / capture time on the same machine in the same run.

Each command is a child process; its peak memory is its own ``ru_maxrss``
(:func:`os.wait4`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..analysis.golden import read_expectation, stored_options
from ..driver.replayer import Replayer
from ..session import DEFAULT_CONSOLE_REGEX
from ..shadow.config import EngineConfig
from ..shadow.engine import ShadowEngine
from ..trace import format as fmt
from ..trace.reader import TraceReader


@dataclass
class Timed:
    """One finished (or stopped) child process."""

    argv: list[str]
    wall: float
    peak_mib: float
    returncode: int
    stderr: str
    timed_out: bool = False

    def failure(self) -> str | None:
        """None if it succeeded, else one line saying how it failed."""
        if self.timed_out:
            return f"stopped after {self.wall:.0f} s"
        if self.returncode != 0:
            last = self.stderr.strip().splitlines()[-1:] or ["(no message)"]
            return f"exit {self.returncode}: {last[0]}"
        return None


def shadowtrace(*args: str) -> list[str]:
    """The ``shadowtrace`` command line of this interpreter."""
    return [sys.executable, "-m", "replay.cli", *args]


def timed(argv: list[str], timeout: float) -> Timed:
    """Run ``argv`` (stdout dropped, stderr kept) and time it; a child still
    running after ``timeout`` seconds is killed (with its process group)."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err, start_new_session=True)
        timed_out = False
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if time.perf_counter() - t0 > timeout:
                timed_out = True
                os.killpg(proc.pid, 9)
                _, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.02)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        err.seek(0)
        text = err.read().decode(errors="replace")
    return Timed(argv, wall, usage.ru_maxrss / 1024, proc.returncode, text, timed_out)


def replay_args(expect: Path, trace: Path) -> list[str]:
    """``shadowtrace replay`` arguments for ``trace`` as its expectation file
    asks, with its watched VAs (or console watch) also registered secure
    when it registers nothing itself."""
    options, _ = read_expectation(expect)
    stored = stored_options(options)
    args = ["replay", str(trace)]
    if stored["config"] is not None:
        args += ["--config", str(expect.parent / stored["config"])]
    for va in stored["watch"]:
        args += ["--watch", va]
    console = stored["watch_console"]
    if console is not None:
        args += ["--watch-console", console]
    secure = list(stored["secure"]) or [f"va:{va}" for va in stored["watch"]] or (
        [f"console:{console}"] if console is not None else [])
    for spec in secure:
        args += ["--secure", spec]
    if stored["policy"]:
        args.append("--policy")
    return args


def bare_replay(trace: Path) -> tuple[int, float]:
    """(events, seconds) of a bare replay (no tools) in this process."""
    t0 = time.perf_counter()
    with TraceReader(trace) as reader:
        rep = Replayer(ShadowEngine(EngineConfig.for_trace(reader.header)))
        stats = rep.run(reader)
    return stats.events, time.perf_counter() - t0


@dataclass
class CommandReplay:
    """``shadowtrace replay`` of one trace, with what its JSON says."""

    timed: Timed
    events: int = 0
    #: The command's own replay time (the JSON's ``replay.duration_s``:
    #: reading, replaying and checking, not the interpreter's start).
    replay_s: float = 0.0
    c7_mismatches: int = 0
    table_writes: int = 0
    findings: int = 0
    #: ``--truth``'s counts summed over vCPUs: (pages, agree, differ, unknown).
    truth: tuple[int, int, int, int] | None = None


def command_replay(args: list[str], timeout: float) -> CommandReplay:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "replay.json"
        run = timed(shadowtrace(*args, "--json", str(out)), timeout)
        if run.failure() is not None:
            return CommandReplay(run)
        doc: dict[str, Any] = json.loads(out.read_text())
    by_kind = (doc["trace"].get("footer") or {}).get("by_kind") or {}
    return CommandReplay(
        run, events=int(doc["replay"]["events"]), replay_s=float(doc["replay"]["duration_s"]),
        c7_mismatches=int(doc["c7"]["mismatches"]),
        table_writes=int(by_kind.get(str(int(fmt.Kind.TABLE_WRITE)),
                                     by_kind.get(int(fmt.Kind.TABLE_WRITE), 0))),
        findings=len(doc.get("findings") or []),
        truth=None if not doc.get("truth") else tuple(  # type: ignore[arg-type]
            sum(int(t[k]) for t in doc["truth"]) for k in ("pages", "agree", "differ", "unknown")))


def recorded(traces: Path, timeout: float) -> list[str]:
    """The report lines of every recorded trace, bare and as the command."""
    lines = ["| trace | events | bare replay | `shadowtrace replay` (its replay time) "
             "| command wall | peak | C7 |", "|---|---|---|---|---|---|---|"]
    worst = float("inf")
    for expect in sorted(traces.glob("*.expected.json")):
        name = expect.name.removesuffix(".expected.json")
        trace = traces / f"{name}.trace"
        events, bare_s = bare_replay(trace)
        cmd = command_replay(replay_args(expect, trace), timeout)
        failed = cmd.timed.failure()
        if failed is not None:
            lines.append(f"| {name} | {events:,} | {events / bare_s / 1e6:.2f} M/s | "
                         f"FAILED: {failed} | | | |")
            worst = 0.0
            continue
        rate = cmd.events / max(cmd.replay_s, 1e-9) / 1e6
        worst = min(worst, rate)
        lines.append(
            f"| {name} | {events:,} | {events / bare_s / 1e6:.2f} M/s ({bare_s:.2f} s) | "
            f"{rate:.2f} M/s ({cmd.replay_s:.2f} s) | {cmd.timed.wall:.2f} s | "
            f"{cmd.timed.peak_mib:.0f} MiB | {cmd.c7_mismatches} |")
    met = "met" if worst >= 5.0 else "MISSED"
    lines.append(f"target: `shadowtrace replay` >= 5 M events/s on every recorded trace "
                 f"(slowest {worst:.2f} M/s): {met}")
    return lines


def whole_boot(work: Path, timeout: float) -> list[str]:
    """Capture a whole boot of seed, replay it with checks and a watched VA."""
    trace = work / "boot.trace"
    cap = timed(shadowtrace("capture", "--scenario", "seed", "--window", "all",
                            "--out", str(trace)), timeout)
    failed = cap.failure()
    if failed is not None:
        return [f"whole-boot capture failed: {failed}"]
    size = trace.stat().st_size
    rep = command_replay(["replay", str(trace), "--watch-console",
                          "--secure", f"console:{DEFAULT_CONSOLE_REGEX}", "--truth"], timeout)
    lines = [f"whole-boot capture (`shadowtrace capture --scenario seed --window all`): "
             f"{cap.wall:.1f} s, {size / 2**20:.0f} MiB"]
    failed = rep.timed.failure()
    if failed is not None:
        lines.append(f"its `shadowtrace replay` (checks, C7, watched VA): {failed}; "
                     f"replay / capture > {rep.timed.wall / cap.wall:.1f}: MISSED")
        return lines
    ratio = rep.timed.wall / cap.wall
    lines += [
        f"its `shadowtrace replay` (checks, C7, watched VA): {rep.timed.wall:.1f} s wall, "
        f"{rep.events:,} events ({rep.table_writes:,} TABLE_WRITEs), "
        f"{rep.events / max(rep.replay_s, 1e-9) / 1e6:.2f} M events/s, "
        f"peak {rep.timed.peak_mib:.0f} MiB, C7 mismatches {rep.c7_mismatches}",
        "ground truth (`--truth`: QEMU's info tlb at the pause against the rebuilt tables): "
        + ("none" if rep.truth is None else
           f"{rep.truth[0]:,} pages, {rep.truth[1]:,} alike, {rep.truth[2]:,} differ, "
           f"{rep.truth[3]:,} unknown"),
        f"targets: replay / capture = {ratio:.2f} (<= 2: {'met' if ratio <= 2 else 'MISSED'}), "
        f"peak < 1 GiB ({'met' if rep.timed.peak_mib < 1024 else 'MISSED'}), "
        f"TABLE_WRITEs <= 10 M ({'met' if rep.table_writes <= 10_000_000 else 'MISSED'})",
    ]
    return lines
