"""Each recorded trace replayed once per configuration, shared by the tests.

A golden file (``traces/NAME.expected.json``, or
``traces/variants/NAME+CONFIG.expected.json`` for NAME replayed with
``traces/configs/CONFIG.toml``) names a trace and the options to replay it
with. :class:`Goldens` (the ``goldens`` session fixture of conftest.py)
replays each the first time a test asks for it, exactly as ``shadowtrace
check`` does (:func:`replay.session.check_options`, :func:`replay.session.replay`,
:func:`replay.analysis.golden.observed`), and keeps the result: the
regression test, the golden invariants, the fast-path equivalence test and
the cut and plot tests all read that one replay.

For the goldens in :data:`LOCKSTEP`, the same replay also drives the
event-by-event reference: a second replayer (``Replayer(fast=False)``, on an
engine of the same configuration, with its own checker of the same secure
specs as its event tool) gets every chunk right after the replay's own one,
which takes the fast path as every user command does; the two engines and
replay stats are compared after every chunk, as ``both_paths`` of
tests/test_replayer.py does for synthetic traces, and the two checkers'
findings and summaries at the end.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replay.analysis.checks.checker import Checker
from replay.analysis.golden import observed, read_expectation, write_expectation
from replay.driver.replayer import Replayer, ReplayStats
from replay.session import (
    Replay,
    ReplayOptions,
    check_options,
    console_text,
    has_console_events,
    replay,
)
from replay.shadow.engine import ShadowEngine
from replay.shadow.types import Fact
from replay.trace.reader import Chunk, TraceReader

TRACES = Path(__file__).resolve().parent.parent / "traces"
EXPECTED = sorted(TRACES.glob("*.expected.json"))
#: traces/variants/TRACE+CONFIG.expected.json: TRACE replayed with
#: traces/configs/CONFIG.toml (the file's options name it).
VARIANTS = sorted((TRACES / "variants").glob("*.expected.json"))
#: Every recorded trace, with the configuration it is replayed with (None:
#: the header's defaults), plus two configuration replays of
#: traces/variants that stress other engine paths: the CR3-target list
#: (exit-less CR3 switches between two roots) and a pool so small that
#: shadows are evicted and the current roots' unhooked.
REAL = [(p.name.removesuffix(".trace"), None) for p in sorted(TRACES.glob("*.trace"))] + [
    ("private-root", "targets"), ("fork", "pool-48")]
#: The goldens whose replay also runs the fast path in lockstep.
LOCKSTEP = {f"{n}+{v}" if v else n for n, v in REAL}


def golden_name(golden: Path) -> str:
    """``seed``, ``fork+pool-48`` ... (the golden file's name)."""
    return golden.name.removesuffix(".expected.json")


def trace_of(golden: Path) -> Path:
    return TRACES / f"{golden_name(golden).split('+')[0]}.trace"


def golden_path(name: str) -> Path:
    return TRACES / ("variants" if "+" in name else "") / f"{name}.expected.json"


def engine_state(eng: ShadowEngine) -> dict[str, Any]:
    """Everything the engine holds as a result, event numbers included.

    Left out: ``restrict_gen`` and ``leaf_log``, the change log the fast
    path consumes (bookkeeping for the replayer, not a result)."""
    return {
        "counters": dict(eng.counters),
        "shadows": {k: (s.refcount, s.pinned, tuple(s.entries)) for k, s in eng.shadows.items()},
        "pins": list(eng.pins),
        "pt_types": eng.pt_types,
        "parents": eng.parents,
        "rw_maps": eng.rw_maps,
        "oos": (eng.oos_where, eng.oos_may_write),
        "mmio_frames": eng.mmio_frames,
        "facts": list(eng.facts),
        "hazards": list(eng.hazards),
        "vcpus": [dataclasses.asdict(v) for v in eng.vcpus],
        "last": (eng._event, eng._vcpu),
        "guest_layout": eng.guest.layout,
    }


@dataclass
class LockstepResult:
    """What the lockstep found: the first difference (None: none), and the
    replay's (fast path) stats and counts."""

    difference: str | None
    chunks: int
    fast_stats: ReplayStats
    fast_accesses: int
    fast_bulk: int
    slow_bulk: int


class Lockstep:
    """A chunk observer and fact sink of one replay: feeds the reference
    path one chunk behind the replay's own replayer (it is told a chunk
    before the replay feeds it, and then feeds the one before, whose next
    kind is now known), so both engines are compared at the same point."""

    def __init__(self, opts: ReplayOptions) -> None:
        self.opts = opts
        self.slow: Replayer | None = None
        self.fast: Replayer | None = None
        self.slow_checker: Checker | None = None
        #: The replay's facts as its fact hub hands them out (its engine
        #: keeps no log: replays run with ``record_facts`` off).
        self.fast_facts: list[Fact] = []
        self.difference: str | None = None
        self._pending: Chunk | None = None
        self._chunks = 0

    def __call__(self, fact: Fact) -> None:
        self.fast_facts.append(fact)

    def start_replay(self, replayer: Replayer) -> None:
        self.fast = replayer
        config = dataclasses.replace(replayer.engine.config, record_facts=True)
        engine = ShadowEngine(config)
        opts = self.opts
        # the checker as replay.session makes it: console: specs follow the
        # trace's console events, or the log beside a trace without them
        with TraceReader(opts.trace) as reader:
            events = has_console_events(reader.header)
        console = (console_text(opts.trace) if not events
                   and any(s.startswith("console:") for s in opts.secure) else None)
        self.slow_checker = Checker(engine, secure=list(opts.secure), console=console,
                                    console_events=events, policy=opts.policy)
        self.slow = Replayer(engine, fast=False, dedup=replayer.dedup,
                             tools=[self.slow_checker])

    def before_chunk(self, chunk: Chunk) -> None:
        if self._pending is not None:
            self._step(int(chunk.kind[0]) if chunk.n else None)
        self._pending = chunk

    def finish(self, checker: Checker | None) -> LockstepResult:
        """End: the last chunk, then the checkers (``checker``: the replay's)."""
        if self._pending is not None:
            self._step(None)
            self._pending = None
        assert self.fast is not None and self.slow is not None
        assert self.slow_checker is not None and checker is not None
        ref = self.slow_checker
        ref.finish(self.slow.stats)
        if self.difference is None:
            if [dataclasses.asdict(f) for f in ref.findings] != [
                    dataclasses.asdict(f) for f in checker.findings]:
                self.difference = "findings"
            elif ref.summary() != checker.summary():
                self.difference = "checker summary"
        fast = self.fast
        result = LockstepResult(self.difference, self._chunks, fast.stats,
                                fast.engine.counters["accesses"], fast.bulk_accesses,
                                self.slow.bulk_accesses)
        self.fast = self.slow = None  # the engines are not kept for the session
        self.slow_checker = None
        self.fast_facts = []
        return result

    def _step(self, next_kind: int | None) -> None:
        assert self.fast is not None and self.slow is not None and self._pending is not None
        i = self._chunks
        self._chunks += 1
        if self.difference is not None:
            return  # the first difference is reported; the rest is not needed
        fast, slow = self.fast, self.slow
        slow.feed(self._pending, next_kind)
        state_f, state_s = engine_state(fast.engine), engine_state(slow.engine)
        # facts: the reference engine's log against the replay's fact
        # stream, the part since the last chunk (both only grow; the earlier
        # parts were equal), which is then dropped on both sides
        facts_f, facts_s = state_f.pop("facts"), state_s.pop("facts")
        assert facts_f == []  # the replay's engine keeps no log
        if facts_s != self.fast_facts:
            self.difference = f"chunk {i}: facts"
            return
        slow.engine.facts.clear()
        self.fast_facts.clear()
        if state_f.keys() != state_s.keys():
            self.difference = f"chunk {i}: {sorted(state_f.keys() ^ state_s.keys())}"
            return
        for key in state_f:
            if state_f[key] != state_s[key]:
                self.difference = f"chunk {i}: {key}"
                return
        # C7 and dedup counts, mismatch samples (in order) and markers
        if dataclasses.asdict(fast.stats) != dataclasses.asdict(slow.stats):
            self.difference = f"chunk {i}: replay stats"


@dataclass
class GoldenRun:
    """One golden file replayed as ``shadowtrace check`` does."""

    golden: Path
    trace: Path
    options: dict[str, Any]
    #: What the file holds (rewritten from ``got`` under --update-golden).
    expected: Any
    #: What the replay gives, as the file would store it.
    got: Any
    replay: Replay
    lockstep: LockstepResult | None


class Goldens:
    """The replays of the golden files, each made once (see the module)."""

    def __init__(self, update: bool = False) -> None:
        self.update = update
        self._runs: dict[Path, GoldenRun] = {}

    def __call__(self, golden: str | Path) -> GoldenRun:
        path = golden_path(golden) if isinstance(golden, str) else golden
        run = self._runs.get(path)
        if run is None:
            run = self._runs[path] = self._run(path)
        return run

    def _run(self, golden: Path) -> GoldenRun:
        options, expected = read_expectation(golden)
        trace = trace_of(golden)
        opts = check_options(trace, golden, options)
        lock = Lockstep(opts) if golden_name(golden) in LOCKSTEP else None
        extra = [] if lock is None else [lock]
        result = replay(opts, sinks=extra, observers=extra)
        got = observed(result.doc)
        if self.update:
            write_expectation(golden, options, got)  # as ``check --update`` does
            expected = got
        return GoldenRun(golden, trace, options, expected, got, result,
                         None if lock is None else lock.finish(result.checker))
