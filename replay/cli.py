"""The ``shadowtrace`` command: wiring only.

Every expected failure (bad option, bad trace, missing set-up, guest trouble)
ends as one line on stderr and exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import ShadowtraceError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"shadowtrace: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shadowtrace", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cap = sub.add_parser("capture", help="boot the test guest and record a trace")
    cap.add_argument("--scenario", default="seed", help="scenario folder name (default seed)")
    cap.add_argument("--out", type=Path, help="trace file (default traces/SCENARIO.trace)")
    cap.add_argument("--dedup", choices=("on", "off"), default="on",
                     help="drop accesses that cannot change shadow state (default on)")
    cap.add_argument("--window", choices=("markers", "all"), default="markers",
                     help="record between the start/stop markers, or the whole run")
    cap.add_argument("--smp", type=int, default=1, help="vCPUs (default 1)")
    cap.add_argument("--deterministic", action="store_true",
                     help="icount, fixed RTC, no KASLR: repeatable captures")
    cap.add_argument("--timeout", type=float, default=600.0,
                     help="seconds before the guest counts as hung (default 600)")
    cap.set_defaults(func=_capture)

    info = sub.add_parser("info", help="print a trace's header, footer and counts")
    info.add_argument("trace", type=Path)
    info.add_argument("--allow-truncated", action="store_true")
    info.set_defaults(func=_info)

    rep = sub.add_parser("replay", help="replay a trace through the shadow engine")
    rep.add_argument("trace", type=Path)
    _add_replay_options(rep)
    rep.add_argument("--json", type=Path, metavar="FILE", help="write the results as JSON")
    rep.add_argument("--parquet", type=Path, metavar="DIR",
                     help="write events.parquet and shadows.parquet into DIR")
    rep.add_argument("--allow-truncated", action="store_true",
                     help="replay the valid prefix of a trace without footer")
    rep.set_defaults(func=_replay)

    chk = sub.add_parser("check", help="replay a trace and compare with stored expectations")
    chk.add_argument("trace", type=Path)
    chk.add_argument("--expect", type=Path, required=True, metavar="FILE",
                     help="expectation file (JSON: replay options and expected results)")
    chk.add_argument("--update", action="store_true",
                     help="rewrite FILE from this replay (keeps FILE's options if it exists)")
    _add_replay_options(chk)  # used with --update on a new FILE; FILE's win otherwise
    chk.set_defaults(func=_check)

    cut = sub.add_parser("cut", help="write a smaller valid trace of a range of events")
    cut.add_argument("trace", type=Path)
    cut.add_argument("--out", type=Path, required=True, help="the trace to write")
    cut.add_argument("--from-marker", metavar="A",
                     help="from the first marker A (name or full text), included")
    cut.add_argument("--to-marker", metavar="B",
                     help="through the first marker B after A, included")
    cut.add_argument("--events", metavar="FROM:TO",
                     help="event indexes FROM (included) to TO (excluded; empty: the end)")
    cut.set_defaults(func=_cut)

    plot = sub.add_parser("plot", help="draw a PNG timeline of a replay")
    plot.add_argument("trace", type=Path)
    plot.add_argument("--out", type=Path, required=True, metavar="FILE.png")
    plot.add_argument("--config", type=Path, help="engine config (TOML or JSON)")
    plot.add_argument("--bins", type=int, default=400, help="bins over event index (400)")
    plot.add_argument("--size", default="12x8", metavar="WxH",
                      help="image size in inches at 100 dpi (default 12x8)")
    plot.set_defaults(func=_plot)
    return parser


def _add_replay_options(parser: argparse.ArgumentParser) -> None:
    """What the engine, the timeline and the checks replay with (replay, check)."""
    parser.add_argument("--config", type=Path, help="engine config (TOML or JSON)")
    parser.add_argument("--watch", action="append", default=[], metavar="VA",
                        help="follow the shadow path of this VA (hex; repeatable)")
    parser.add_argument("--watch-console", nargs="?", const=DEFAULT_CONSOLE_REGEX,
                        metavar="REGEX",
                        help="watch the hex VA in group 1 of REGEX on the console log beside "
                        f"the trace (default {DEFAULT_CONSOLE_REGEX!r})")
    parser.add_argument("--no-dedup", action="store_true",
                        help="feed every access to the engine (no canonical dedup)")
    parser.add_argument("--secure", action="append", default=[], metavar="SPEC",
                        help="register secure memory for the checks (repeatable)")
    parser.add_argument("--policy", action="store_true",
                        help="checks in policy mode (refuse secure mappings outside secure roots)")


#: --watch-console's default: the seed module's printk.
DEFAULT_CONSOLE_REGEX = r"The address allocated is ([0-9a-f]+)"


def _capture(args: argparse.Namespace) -> int:
    from qmp_tools.capture import CaptureOptions, capture
    from qmp_tools.errors import GuestError

    from .report import print_capture_summary, progress_printer

    out = args.out or Path("traces") / f"{args.scenario}.trace"
    opts = CaptureOptions(
        scenario=args.scenario, out=out, dedup=args.dedup == "on", smp=args.smp,
        window=args.window, deterministic=args.deterministic, timeout=args.timeout,
    )
    try:
        with progress_printer(f"capturing {args.scenario}") as progress:
            result = capture(opts, progress)
    except GuestError as err:
        if err.console_tail:
            sys.stderr.write(
                "--- guest console (last lines) ---\n" + err.console_tail + "\n---\n"
            )
        raise
    print_capture_summary(result)
    return 0


def _info(args: argparse.Namespace) -> int:
    from qmp_tools.capture import summarise

    from .reader import TraceReader
    from .report import print_json

    with TraceReader(args.trace, allow_truncated=args.allow_truncated) as reader:
        header = reader.header
        for _ in reader:
            pass
        footer = reader.footer
        truncated = reader.truncated
    summary = summarise(args.trace) if not truncated else {}
    print_json({"header": header, "footer": footer, "truncated": truncated, "summary": summary})
    return 0


def _parse_va(text: str) -> int:
    from .errors import UsageError

    try:
        va = int(text, 16)
    except ValueError:
        raise UsageError(f"--watch {text!r}: not a hex address") from None
    if not 0 <= va < 1 << 64:
        raise UsageError(f"--watch {text!r}: not a 64-bit address")
    return va


def _console_vas(trace: Path, regex: str) -> list[int]:
    """Group 1 of every match of ``regex`` in the trace's console log."""
    import re

    from .errors import UsageError

    try:
        pattern = re.compile(regex)
    except re.error as err:
        raise UsageError(f"--watch-console {regex!r}: {err}") from None
    if pattern.groups < 1:
        raise UsageError(f"--watch-console {regex!r}: the regex has no group")
    text = _console_text(trace)
    log = trace
    vas: list[int] = []
    for m in pattern.finditer(text):
        try:
            va = int(m.group(1), 16)
        except (TypeError, ValueError):
            raise UsageError(f"{log}: {m.group(0)!r}: group 1 is not a hex VA") from None
        if va not in vas:
            vas.append(va)
    if not vas:
        raise UsageError(f"{log}: no line matches {regex!r}")
    return vas


def _engine_config(path: Path | None, header: dict[str, Any]) -> Any:
    """The config file's options over the trace header's vCPUs and RAM."""
    from .config import EngineConfig

    cfg = EngineConfig.for_trace(header, path)
    # the fact log would grow with the trace: consumers take facts as they come
    cfg.record_facts = False
    return cfg


def _console_text(trace: Path) -> str:
    """The guest console log kept beside a trace (capture's NAME.console.log)."""
    from qmp_tools.capture import side_paths

    from .errors import UsageError

    log = side_paths(trace)[0]
    try:
        return log.read_text(errors="replace")
    except OSError as err:
        raise UsageError(f"{log}: cannot read the console log: {err.strerror}") from None


def _make_checker(args: argparse.Namespace, engine: Any) -> Any:
    """The secure-page checks C1-C8 over this replay (replay.checks)."""
    from .checks import Checker

    console = None
    if any(spec.startswith("console:") for spec in args.secure):
        console = _console_text(args.trace)
    return Checker(engine, secure=list(args.secure), console=console, policy=args.policy)


def _replay(args: argparse.Namespace) -> int:
    from .report import print_replay_summary

    print_replay_summary(_replay_doc(args))
    return 0


def _replay_doc(args: argparse.Namespace) -> dict[str, Any]:
    """Replay as the options say; write --json/--parquet; return the results."""
    import time

    from . import results
    from .engine import ShadowEngine
    from .reader import TraceReader
    from .replayer import Replayer
    from .report import replay_progress
    from .timeline import FactHub, ShadowLifetimes, Timeline, drive

    watch = [_parse_va(v) for v in args.watch]
    if args.watch_console is not None:
        watch += [va for va in _console_vas(args.trace, args.watch_console) if va not in watch]
    start = time.monotonic()
    with TraceReader(args.trace, allow_truncated=args.allow_truncated) as reader:
        header = reader.header
        cfg = _engine_config(args.config, header)
        hub = FactHub()
        engine = ShadowEngine(cfg, on_fact=hub)
        timeline = Timeline(engine, watch)
        lifetimes = ShadowLifetimes()
        hub.add(lifetimes)
        observers: list[Any] = []
        if watch:
            hub.add(timeline)
            observers.append(timeline)
        events = None
        if args.parquet is not None:
            events = results.EventTable(watched=timeline.watched_pages)
            hub.add(events)
            observers.append(events)
        checker = _make_checker(args, engine)
        hub.add(checker)
        replayer = Replayer(engine, dedup=not args.no_dedup)
        with replay_progress(args.trace) as progress:
            stats = drive(replayer, reader, observers,
                          on_chunk=lambda c: progress(reader, c))
        footer, truncated = reader.footer, reader.truncated
    # ---- findings: the secure-page checks (replay.checks) report here ----
    checker.finish(stats)  # C7 comes from the replayer's cross-check
    findings = list(checker.findings)
    duration = time.monotonic() - start
    namer = _namer(header, stats.markers) if watch or events or findings else None
    doc = results.build(
        trace=args.trace, header=header, footer=footer, truncated=truncated, config=cfg,
        engine=engine, stats=stats, dedup=not args.no_dedup, duration=duration,
        timeline=timeline if watch else None, findings=findings, namer=namer,
    )
    if args.json is not None:
        results.write_json(args.json, doc)
    if args.parquet is not None:
        results.write_parquet(args.parquet, events, lifetimes, namer)
    return doc


#: Replay options an expectation file keeps, with their defaults.
CHECK_OPTIONS: dict[str, Any] = {
    "config": None, "watch": [], "watch_console": None, "secure": [], "policy": False,
    "no_dedup": False,
}


def _check(args: argparse.Namespace) -> int:
    """Replay TRACE with the options stored in FILE and compare the results."""
    import json
    import os

    from .errors import UsageError
    from .golden import compare, expectation

    stored: dict[str, Any] = {}
    if args.expect.exists():
        try:
            stored = json.loads(args.expect.read_text())
            options = stored["options"]
            expected = stored["expected"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise UsageError(f"{args.expect}: not an expectation file ({err})") from None
    elif not args.update:
        raise UsageError(f"{args.expect}: no such file (use --update to write it)")
    else:
        options = {k: getattr(args, k) for k in CHECK_OPTIONS}
        # kept relative to the expectation file, so the pair can move together
        options["config"] = (
            os.path.relpath(args.config.resolve(), args.expect.resolve().parent)
            if args.config else None
        )
        expected = None
    replay_args = argparse.Namespace(
        trace=args.trace, json=None, parquet=None, allow_truncated=False,
        **{k: options.get(k, default) for k, default in CHECK_OPTIONS.items()},
    )
    if replay_args.config is not None:
        replay_args.config = args.expect.parent / replay_args.config
    got = json.loads(json.dumps(expectation(_replay_doc(replay_args)), default=str))
    if args.update:
        args.expect.write_text(
            json.dumps({"options": options, "expected": got}, indent=1, sort_keys=True) + "\n"
        )
        print(f"{args.expect}: expectations written")
        return 0
    diff = compare(expected, got)
    if diff:
        print(f"{args.trace}: {len(diff)} difference(s) from {args.expect}:")
        for line in diff:
            print(f"  {line}")
        return 1
    print(f"{args.trace}: as expected ({args.expect})")
    return 0


def _cut(args: argparse.Namespace) -> int:
    """``shadowtrace cut``: see replay.cut."""
    from .cut import cut_trace, parse_events

    events = parse_events(args.events) if args.events is not None else None
    res = cut_trace(args.trace, args.out, events=events, from_marker=args.from_marker,
                    to_marker=args.to_marker)
    print(f"{res.out}: events {res.first}:{res.end} of {args.trace} as {res.events} events "
          f"(state prefix: {res.snapshots} frames, {len(res.cr3)} CR3; "
          f"event {res.first} is now {res.base})")
    return 0


def _plot(args: argparse.Namespace) -> int:
    """``shadowtrace plot``: see replay.plot."""
    from .errors import UsageError
    from .plot import draw, series_for

    try:
        width, height = (float(x) for x in args.size.lower().split("x"))
    except ValueError:
        raise UsageError(f"--size {args.size!r}: expected WxH in inches, e.g. 12x8") from None
    if args.bins < 1:
        raise UsageError(f"--bins {args.bins}: must be at least 1")
    series = series_for(args.trace, args.config, bins=args.bins)
    draw(series, args.out, size=(width, height))
    print(f"{args.out}: {series.events} events, {series.bins} bins")
    return 0


def _namer(header: dict[str, Any], markers: list[tuple[int, int, list[str]]]) -> Any:
    """PC -> ``symbol+0xoff [module]`` from the guest build's symbols."""
    from qmp_tools.paths import BuildPaths

    from .symbols import from_markers

    paths = BuildPaths.default()
    scenario = str(header.get("scenario") or "")
    dirs = [paths.module_dir(scenario)] if scenario else []
    syms = from_markers([m for _, _, m in markers], system_map=paths.kallsyms,
                        module_dirs=dirs)
    cache: dict[int, str] = {}

    def name(pc: int) -> str:
        got = cache.get(pc)
        if got is None:
            got = cache[pc] = syms.name(pc)
        return got

    return name


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ShadowtraceError as err:
        sys.stderr.write(f"shadowtrace: {err}\n")
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("shadowtrace: interrupted\n")
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
