"""The ``shadowtrace`` command: wiring only.

Every expected failure (bad option, bad trace, missing set-up, guest trouble)
ends as one line on stderr and exit status 1 (2 for bad usage: what argparse
rejects, and :class:`~replay.errors.ArgumentError`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from .errors import ArgumentError, ShadowtraceError
from .session import DEFAULT_CONSOLE_REGEX


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"shadowtrace: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shadowtrace", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    cap = sub.add_parser("capture", help="boot the test guest and record a trace")
    cap.add_argument("--scenario", metavar="NAME|DIR",
                     help="a scenario of scenarios/ (default seed), or a scenario folder "
                          "elsewhere (a path: DIR/steps.sh ...)")
    cap.add_argument("--module", action="append", type=Path, default=[], metavar="PATH.c",
                     help="build this kernel module and load it in the window (repeatable)")
    cap.add_argument("--steps", type=Path, metavar="FILE",
                     help="with --module: the guest's steps instead of loading the modules")
    cap.add_argument("--append", default="", metavar="WORDS",
                     help="with --module or --scenario DIR: more kernel command-line words")
    cap.add_argument("--out", type=Path,
                     help="trace file (default traces/SCENARIO.trace; out/user-NAME.trace "
                          "for --module and --scenario DIR)")
    cap.add_argument("--dedup", choices=("on", "off"), default="on",
                     help="drop accesses that cannot change shadow state (default on)")
    cap.add_argument("--no-untrack", action="store_true",
                     help="keep recording stores into freed page tables (no UNTRACK): "
                          "traces that count every write Xen would still emulate")
    cap.add_argument("--window", choices=("markers", "all"), default="markers",
                     help="record between the start/stop markers, or the whole run")
    cap.add_argument("--smp", type=int,
                     help="vCPUs (default: the scenario's vcpus file, else 1)")
    cap.add_argument("--deterministic", action="store_true",
                     help="icount, fixed RTC, no KASLR: repeatable captures")
    cap.add_argument("--timeout", type=float, default=600.0,
                     help="seconds before the guest counts as hung (default 600)")
    cap.set_defaults(func=_capture)

    info = sub.add_parser("info", help="print a trace's header, symbols, footer and counts")
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
    rep.add_argument("--truth", action="store_true",
                     help="walk the rebuilt tables for every page of the ground truth beside "
                          "the trace (QEMU's info tlb at the pause after the stop marker)")
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

    xen = sub.add_parser("xen", help="run a scenario under the real Xen (shadow paging) "
                         "and decode Xen's own trace")
    xen.add_argument("--scenario", metavar="NAME|DIR",
                     help="a scenario of scenarios/ (default seed), or a scenario folder "
                          "elsewhere, as for capture")
    xen.add_argument("--module", action="append", type=Path, default=[], metavar="PATH.c",
                     help="build this kernel module and load it in the window (repeatable), "
                          "as for capture")
    xen.add_argument("--steps", type=Path, metavar="FILE",
                     help="with --module: the guest's steps instead of loading the modules")
    xen.add_argument("--append", default="", metavar="WORDS",
                     help="with --module or --scenario DIR: more kernel command-line words")
    xen.add_argument("--out", type=Path, default=Path("out/xen"), metavar="DIR",
                     help="where NAME.xen.* go (default out/xen)")
    xen.add_argument("--timeout", type=float, default=300.0,
                     help="seconds before the run counts as hung (default 300)")
    xen.add_argument("--vcpus", type=int,
                     help="guest vCPUs, each pinned to a pCPU of its own (default: the "
                          "scenario's vcpus file, else 1)")
    xen.set_defaults(func=_xen)

    cmp = sub.add_parser("compare", help="put the model's replay of a trace beside Xen's "
                         "run of the same scenario")
    cmp.add_argument("--trace", type=Path, required=True, help="a bare-QEMU capture")
    cmp.add_argument("--xen", type=Path, required=True, metavar="DIR",
                     help="the --out folder of 'shadowtrace xen' for the same scenario")
    cmp.add_argument("--watch-console", nargs="?", const=DEFAULT_CONSOLE_REGEX,
                     metavar="REGEX",
                     help="watch the hex VA in group 1 of REGEX, on each side's own console "
                     f"(default {DEFAULT_CONSOLE_REGEX!r})")
    cmp.add_argument("--config", type=Path, help="engine config (TOML or JSON)")
    cmp.add_argument("--json", type=Path, metavar="FILE", help="write the comparison as JSON")
    cmp.set_defaults(func=_compare)

    swp = sub.add_parser("sweep", help="replay traces under every combination of engine "
                         "options, on Dask; one Parquet row per replay")
    swp.add_argument("trace", type=Path, nargs="+")
    swp.add_argument("--set", action="append", default=[], metavar="KEY=V1,V2",
                     help="an engine option (a key of the config file) and its values; "
                     "repeatable, every combination is replayed")
    swp.add_argument("--out", type=Path, required=True, metavar="FILE.parquet",
                     help="the table to write (one row per trace and configuration)")
    swp.add_argument("--address", metavar="SCHEDULER",
                     help="a running Dask scheduler (tcp://HOST:PORT); default: a local "
                     "cluster of worker processes, closed at the end")
    swp.add_argument("--connect-timeout", type=float, default=5.0, metavar="SECONDS",
                     help="how long to wait for the --address scheduler (default 5)")
    swp.add_argument("--workers", type=int, metavar="N",
                     help="local worker processes (default: cores or replays, the fewer)")
    swp.add_argument("--plot", metavar="KEY1,KEY2:MEASURE",
                     help="a heatmap of MEASURE (a column, e.g. C6) over two swept keys")
    swp.add_argument("--plot-out", type=Path, metavar="FILE.png",
                     help="where the heatmap goes (default: --out with .png)")
    _add_replay_options(swp)
    swp.set_defaults(func=_sweep)

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


def _capture(args: argparse.Namespace) -> int:
    from qmp_tools.capture import CaptureOptions, capture
    from qmp_tools.errors import GuestError

    from .report.console import print_capture_summary, progress_printer

    scenario, append, default_dir, vcpus = _capture_scenario(args)
    out = args.out or Path(default_dir) / f"{scenario}.trace"
    opts = CaptureOptions(
        scenario=scenario, out=out, dedup=args.dedup == "on",
        smp=args.smp if args.smp is not None else vcpus,
        window=args.window, deterministic=args.deterministic, timeout=args.timeout,
        append=append, untrack=not args.no_untrack,
    )
    try:
        with progress_printer(f"capturing {scenario}") as progress:
            result = capture(opts, progress)
    except GuestError as err:
        if err.console_tail:
            sys.stderr.write(
                "--- guest console (last lines) ---\n" + err.console_tail + "\n---\n"
            )
        raise
    print_capture_summary(result)
    return 0


def _capture_scenario(args: argparse.Namespace) -> tuple[str, str | None, str, int | None]:
    """capture's (and xen's) scenario: (name, kernel words or None for a
    repository scenario, default folder of the trace, vCPUs or None for the
    repository scenario's own); builds outside ones (``--module``,
    ``--scenario DIR``) into ``build/`` as ``user-NAME``."""
    from qmp_tools import custom
    from qmp_tools.paths import available_scenarios

    from .errors import UsageError

    scenario = args.scenario
    outside = scenario is not None and (
        "/" in scenario or (scenario not in available_scenarios() and Path(scenario).is_dir()))
    if args.module:
        if scenario is not None:
            raise UsageError("--module and --scenario: give one of them")
        built = custom.from_modules(args.module, args.steps, args.append)
        return built.scenario, built.append, "out", built.vcpus
    if args.steps is not None:
        raise UsageError("--steps needs --module (a scenario folder has its own steps.sh)")
    if outside:
        built = custom.from_folder(Path(scenario), args.append)
        return built.scenario, built.append, "out", built.vcpus
    if args.append:
        raise UsageError("--append needs --module or --scenario DIR "
                         "(a repository scenario has its append file)")
    return scenario or "seed", None, "traces", None


def _info(args: argparse.Namespace) -> int:
    from qmp_tools.capture import summarise

    from .report.console import print_json
    from .trace.reader import TraceReader

    with TraceReader(args.trace, allow_truncated=args.allow_truncated) as reader:
        header = reader.header
        symbols = None if reader.symbols is None else len(reader.symbols)
        for _ in reader:
            pass
        footer = reader.footer
        truncated = reader.truncated
    summary = summarise(args.trace) if not truncated else {}
    print_json({"header": header, "symbols": symbols, "footer": footer, "truncated": truncated,
                "summary": summary})
    return 0


def _options(args: argparse.Namespace) -> Any:
    """The replay options of ``replay`` (and ``check --update``) from the command line."""
    from .session import ReplayOptions, parse_va

    return ReplayOptions(
        trace=args.trace, config=args.config, watch=[parse_va(v) for v in args.watch],
        watch_console=args.watch_console, no_dedup=args.no_dedup, secure=list(args.secure),
        policy=args.policy, json=getattr(args, "json", None),
        parquet=getattr(args, "parquet", None),
        allow_truncated=getattr(args, "allow_truncated", False),
        truth=getattr(args, "truth", False),
    )


def _replay(args: argparse.Namespace) -> int:
    from .report.console import print_replay_summary
    from .session import replay

    print_replay_summary(replay(_options(args)).doc)
    return 0


def _check(args: argparse.Namespace) -> int:
    """Replay TRACE with the options stored in FILE and compare the results."""
    import os

    from .analysis.golden import (
        CHECK_OPTIONS,
        compare,
        observed,
        read_expectation,
        write_expectation,
    )
    from .errors import UsageError
    from .session import check_options, replay

    if args.expect.exists():
        options, expected = read_expectation(args.expect)
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
    got = observed(replay(check_options(args.trace, args.expect, options)).doc)
    if args.update:
        write_expectation(args.expect, options, got)
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
    """``shadowtrace cut``: see replay.trace.cut."""
    from .trace.cut import cut_trace, parse_events

    events = parse_events(args.events) if args.events is not None else None
    res = cut_trace(args.trace, args.out, events=events, from_marker=args.from_marker,
                    to_marker=args.to_marker)
    print(f"{res.out}: events {res.first}:{res.end} of {args.trace} as {res.events} events "
          f"(state prefix: {res.snapshots} frames, {len(res.cr3)} CR3; "
          f"event {res.first} is now {res.base})")
    return 0


def _xen(args: argparse.Namespace) -> int:
    """``shadowtrace xen``: run Xen (qmp_tools.xen), decode (replay.xen), summarise."""
    from qmp_tools.errors import GuestError
    from qmp_tools.paths import BuildPaths, scenario_vcpus
    from qmp_tools.xen import MAX_XEN_VCPUS, run_xen

    from .errors import UsageError
    from .report import results
    from .report.console import print_xen_summary, progress_printer
    from .xen.summary import build_table, summary_doc, write_parquet

    if args.vcpus is not None and not 1 <= args.vcpus <= MAX_XEN_VCPUS:
        raise UsageError(f"--vcpus {args.vcpus}: use 1 to {MAX_XEN_VCPUS}")
    if args.timeout <= 0:
        raise UsageError(f"--timeout {args.timeout}: must be positive")
    scenario, append, _, vcpus = _capture_scenario(args)  # checks first: this builds
    if args.vcpus is None:
        args.vcpus = vcpus if vcpus is not None else scenario_vcpus(scenario)
    paths = BuildPaths.default()
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {args.out}: {err.strerror}") from None
    try:
        with progress_printer(f"Xen: {scenario}") as progress:
            run = run_xen(scenario, args.out, timeout=args.timeout, vcpus=args.vcpus,
                          progress=progress, paths=paths, append=append)
            progress("decoding Xen's trace")
            console = run.console_log.read_text(errors="replace")
            xt = build_table(
                run.xentrace, console=console, pcpus=run.pcpus, kallsyms=paths.kallsyms,
                module_dirs=[paths.module_dir(scenario)],
                progress=lambda done, total: progress(f"decoding {done * 100 // total}%"),
            )
    except GuestError as err:
        if err.console_tail:
            sys.stderr.write("--- console (last lines) ---\n" + err.console_tail + "\n---\n")
        raise
    parquet = write_parquet(xt.table, args.out / f"{scenario}.xen.parquet")
    doc = summary_doc(xt, {
        "scenario": scenario, "duration_s": round(run.duration, 2), "pcpus": run.pcpus,
        "console_log": str(run.console_log), "xentrace": str(run.xentrace),
        "host_log": str(run.host_log), "parquet": str(parquet),
    })
    results.write_json(args.out / f"{scenario}.xen.json", doc)
    print_xen_summary(doc)
    return 0


def _compare(args: argparse.Namespace) -> int:
    """``shadowtrace compare``: see replay.xen.compare."""
    from .report import results
    from .report.console import print_compare
    from .xen.compare import compare

    doc = compare(args.trace, args.xen, watch_console=args.watch_console, config=args.config)
    if args.json is not None:
        results.write_json(args.json, doc)
    print_compare(doc)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    """``shadowtrace sweep``: see replay.sweep."""
    import time

    from .errors import ArgumentError, UsageError
    from .report.heatmap import draw_heatmap, heatmap_data, parse_plot
    from .sweep.grid import parse_grid
    from .sweep.progress import print_summary, sweep_progress
    from .sweep.run import run, tasks
    from .sweep.table import frame, write

    grid = parse_grid(args.set)
    spec = parse_plot(args.plot, grid.keys) if args.plot else None
    if args.workers is not None and args.workers < 1:
        raise ArgumentError(f"--workers {args.workers}: must be at least 1")
    if args.address is not None and args.workers is not None:
        raise ArgumentError("--workers is for the local cluster, not with --address")
    if not args.connect_timeout > 0:
        raise ArgumentError(f"--connect-timeout {args.connect_timeout}: must be above 0")
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out {args.out}: {err.strerror}") from None
    args.trace, traces = args.trace[0], args.trace  # _options takes one trace
    todo = tasks(traces, grid, _options(args))
    start = time.monotonic()
    with sweep_progress(len(todo)) as done:
        rows = run(todo, address=args.address, workers=args.workers, on_done=done,
                   connect_timeout=args.connect_timeout)
    df = frame(rows)
    write(df, args.out)
    print_summary(df, grid.keys)
    print(f"{args.out}: {len(rows)} rows ({len(traces)} trace(s) x {len(grid)} "
          f"configuration(s)) in {time.monotonic() - start:.1f} s")
    if spec is not None:
        data = heatmap_data(df, spec, grid.keys)
        png = args.plot_out or args.out.with_suffix(".png")
        draw_heatmap(data, png)
        note = f"; each cell the {data.note()}" if data.max_over else ""
        print(f"{png}: {data.column} over {spec.x} x {spec.y}{note}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    """``shadowtrace plot``: see replay.report.plot."""
    from .errors import UsageError
    from .report.plot import draw, series_for

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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ArgumentError as err:
        sys.stderr.write(f"shadowtrace: {err}\n")
        return 2
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
