"""One replay, wired once: the code every command that replays a trace uses.

``shadowtrace replay``, ``check``, ``compare`` and ``sweep`` (and ``plot``
for the engine configuration) build a :class:`ReplayOptions` and call
:func:`replay`; nothing else puts an engine, its fact consumers, the checks
and the replayer together.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .analysis.timeline import Timeline
from .driver.replayer import ReplayStats
from .errors import UsageError
from .paths import BuildPaths, side_paths
from .shadow.config import engine_config
from .shadow.engine import ShadowEngine
from .shadow.types import Fact

if TYPE_CHECKING:
    from .analysis.checks.checker import Checker
    from .trace.symtab import TraceSymbols

#: --watch-console's default: the seed module's printk.
DEFAULT_CONSOLE_REGEX = r"The address allocated is ([0-9a-f]+)"


@dataclass
class ReplayOptions:
    """What a replay is asked to do (the options of ``shadowtrace replay``)."""

    trace: Path
    config: Path | None = None
    watch: list[int] = field(default_factory=list)
    watch_console: str | None = None
    no_dedup: bool = False
    secure: list[str] = field(default_factory=list)
    policy: bool = False
    json: Path | None = None
    parquet: Path | None = None
    allow_truncated: bool = False
    #: Engine options over the config file's (one configuration of
    #: ``shadowtrace sweep``; keys and values as EngineConfig.from_dict takes them).
    config_overrides: dict[str, Any] = field(default_factory=dict)
    #: The progress bar on a terminal (off where many replays run at once).
    progress: bool = True
    #: Check the rebuilt tables against the ground truth beside the trace
    #: (``--truth``, :mod:`replay.analysis.truth`).
    truth: bool = False


@dataclass
class Replay:
    """A finished replay: the results document and the parts that made it."""

    doc: dict[str, Any]
    engine: ShadowEngine
    timeline: Timeline
    stats: ReplayStats
    namer: Callable[[int], str] | None
    checker: Checker | None = None


def parse_va(text: str, option: str = "--watch") -> int:
    try:
        va = int(text, 16)
    except ValueError:
        raise UsageError(f"{option} {text!r}: not a hex address") from None
    if not 0 <= va < 1 << 64:
        raise UsageError(f"{option} {text!r}: not a 64-bit address")
    return va


def check_options(trace: Path, expect: Path, options: dict[str, Any]) -> ReplayOptions:
    """The replay of ``trace`` an expectation file ``expect`` asks for, from
    its stored ``options`` (``shadowtrace check``; the config path is relative
    to the file)."""
    from .analysis.golden import stored_options

    stored = stored_options(options)
    config = stored["config"]
    return ReplayOptions(
        trace=trace,
        config=None if config is None else expect.parent / config,
        watch=[parse_va(v) for v in stored["watch"]],
        watch_console=stored["watch_console"], no_dedup=stored["no_dedup"],
        secure=list(stored["secure"]), policy=stored["policy"],
    )


def console_vas(text: str, regex: str, where: str) -> list[int]:
    """Group 1 of every match of ``regex`` in a console text, as VAs, first seen first."""
    from .analysis.secure import va_pattern

    pattern = va_pattern(regex, f"--watch-console {regex!r}")
    vas: list[int] = []
    for m in pattern.finditer(text):
        try:
            va = int(m.group(1), 16)
        except (TypeError, ValueError):
            raise UsageError(f"{where}: {m.group(0)!r}: group 1 is not a hex VA") from None
        if va not in vas:
            vas.append(va)
    if not vas:
        raise UsageError(f"{where}: no line matches {regex!r}")
    return vas


def console_text(trace: Path) -> str:
    """The guest console log kept beside a trace (capture's NAME.console.log)."""
    log = console_path(trace)
    try:
        return log.read_text(errors="replace")
    except OSError as err:
        raise UsageError(f"{log}: cannot read the console log: {err.strerror}") from None


def has_console_events(header: dict[str, Any]) -> bool:
    """Was the trace recorded with the kernel's console as events
    (:data:`~replay.trace.format.OPTION_CONSOLE` among its plugin options)?"""
    from .trace import format as fmt

    options = header.get("options")
    return isinstance(options, dict) and fmt.OPTION_CONSOLE in options


def console_path(trace: Path) -> Path:
    """Where capture puts a trace's console log (``NAME.console.log``)."""
    return side_paths(trace)[0]


def namer_for_trace(
    header: dict[str, Any], markers: list[tuple[int, int, list[str]]],
    symbols: TraceSymbols | None = None,
) -> Callable[[int], str]:
    """PC -> ``symbol+0xoff [module]``: from the trace's own symbols map,
    else (a trace captured before traces carried them) from the guest build's
    symbols placed by the trace's markers. Says once on stderr when there are
    none at all (every PC is then a bare address)."""
    from .guest.symbols import Symbols, from_markers
    from .report.console import warn

    if symbols:
        syms = Symbols.from_entries(symbols.entries())
    else:
        paths = BuildPaths.default()
        scenario = str(header.get("scenario") or "")
        dirs = [paths.module_dir(scenario)] if scenario else []
        syms = from_markers([m for _, _, m in markers], system_map=paths.kallsyms,
                            module_dirs=dirs)
        if not syms:
            warn(f"no symbols: PCs shown as addresses (trace has none and "
                 f"{paths.kallsyms} is missing)")
    cache: dict[int, str] = {}

    def name(pc: int) -> str:
        got = cache.get(pc)
        if got is None:
            got = cache[pc] = syms.name(pc)
        return got

    return name


def replay(
    opts: ReplayOptions,
    *,
    sinks: Iterable[Callable[[Fact], None]] = (),
    attach: Callable[[ShadowEngine], None] | None = None,
    observers: Iterable[Any] = (),
) -> Replay:
    """Replay as the options say; write --json/--parquet; return the results.

    :param sinks: more consumers of the engine's facts (after the built-in ones).
    :param attach: called with the engine before the first event (to set its
        ``on_fault`` / ``on_marker`` hooks, say).
    :param observers: more chunk observers for :func:`~replay.driver.hub.drive`
        (after the built-in ones).
    """
    from .analysis.checks.checker import Checker
    from .analysis.events import EventTable
    from .analysis.lifetimes import ShadowLifetimes
    from .driver.hub import FactHub, drive
    from .driver.replayer import Replayer
    from .report import results
    from .report.console import replay_progress
    from .report.parquet import write_parquet
    from .trace.reader import TraceReader

    watch = list(opts.watch)
    truth = None
    if opts.truth:
        from .analysis.truth import read_truth
        truth = read_truth(side_paths(opts.trace)[1])  # before the replay: fail early
    if opts.watch_console is not None:
        text = console_text(opts.trace)
        found = console_vas(text, opts.watch_console, str(console_path(opts.trace)))
        watch += [va for va in found if va not in watch]
    start = time.monotonic()
    with TraceReader(opts.trace, allow_truncated=opts.allow_truncated) as reader:
        header, symbols = reader.header, reader.symbols
        cfg = engine_config(opts.config, header, opts.config_overrides)
        hub = FactHub()
        engine = ShadowEngine(cfg, on_fact=hub)
        if attach is not None:
            attach(engine)
        timeline = Timeline(engine, watch, fixed_watch=True)
        lifetimes = ShadowLifetimes()
        hub.add(lifetimes)
        chunk_observers: list[Any] = []
        if watch:
            hub.add(timeline)
            chunk_observers.append(timeline)
        events = None
        if opts.parquet is not None:
            events = EventTable(watched=timeline.watched_pages)
            hub.add(events)
            chunk_observers.append(events)
        # console: specs follow the trace's console events; a trace recorded
        # before them is searched through the console log beside it
        console_events = has_console_events(header)
        console = None
        if not console_events and any(spec.startswith("console:") for spec in opts.secure):
            console = console_text(opts.trace)
        checker = Checker(engine, secure=list(opts.secure), console=console,
                          console_events=console_events, policy=opts.policy)
        # (the checker, given the engine, joined its fact hub itself)
        for sink in sinks:
            hub.add(sink)
        chunk_observers += observers
        tools: list[Any] = [checker]
        at_stop = None
        if truth is not None:
            from .analysis.truth import TruthAtStop
            at_stop = TruthAtStop(engine, truth)
            tools.append(at_stop)
        replayer = Replayer(engine, dedup=not opts.no_dedup, tools=tools)
        with replay_progress(opts.trace, enabled=opts.progress) as progress:
            stats = drive(replayer, reader, chunk_observers,
                          on_chunk=lambda c: progress(reader, c))
        footer, truncated = reader.footer, reader.truncated
    # ---- findings: the secure-page checks (replay.analysis.checks) report here ----
    checker.finish(stats)  # C7 comes from the replayer's cross-check
    findings = list(checker.findings)
    duration = time.monotonic() - start
    namer = (namer_for_trace(header, stats.markers, symbols)
             if watch or events or findings else None)
    doc = results.build(
        trace=opts.trace, header=header, footer=footer, truncated=truncated, config=cfg,
        engine=engine, stats=stats, dedup=not opts.no_dedup, duration=duration,
        timeline=timeline if watch else None, findings=findings, namer=namer,
    )
    if at_stop is not None:
        doc["truth"] = [c.to_dict() for c in at_stop.result()]
    if opts.json is not None:
        results.write_json(opts.json, doc)
    if opts.parquet is not None:
        write_parquet(opts.parquet, events, lifetimes, namer)
    return Replay(doc, engine, timeline, stats, namer, checker)
