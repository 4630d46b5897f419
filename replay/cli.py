"""The ``shadowtrace`` command: wiring only.

Every expected failure (bad option, bad trace, missing set-up, guest trouble)
ends as one line on stderr and exit status 1 (2 for bad usage).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

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
    return parser


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
            sys.stderr.write("--- guest console (last lines) ---\n" + err.console_tail + "\n")
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
