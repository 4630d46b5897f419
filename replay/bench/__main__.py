"""``python -m replay.bench``: the replay benchmark (see the package)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from ..paths import TOP
from . import commands, synthetic


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m replay.bench",
                                 description="replay benchmark (make bench-replay)")
    ap.add_argument("--accesses", type=int, default=10_000_000,
                    help="accesses of the synthetic trace")
    ap.add_argument("--keep", type=Path, help="write the synthetic trace here and keep it")
    ap.add_argument("--no-dedup", action="store_true", help="bare replay without dedup")
    ap.add_argument("--traces", type=Path, default=TOP / "traces",
                    help="the recorded traces (NAME.trace + NAME.expected.json)")
    ap.add_argument("--no-boot", action="store_true",
                    help="leave out the whole-boot capture and its replay")
    ap.add_argument("--timeout", type=float, default=3600.0,
                    help="seconds any one command may take")
    args = ap.parse_args(argv)

    def show(title: str, lines: list[str]) -> None:
        print(f"\n## {title}", *lines, sep="\n", flush=True)

    show("synthetic trace, bare engine", synthetic.run(args.accesses, dedup=not args.no_dedup,
                                                       keep=args.keep))
    show("recorded traces", commands.recorded(args.traces, args.timeout))
    if not args.no_boot:
        with tempfile.TemporaryDirectory() as tmp:
            show("whole boot", commands.whole_boot(Path(tmp), args.timeout))
    return 0


if __name__ == "__main__":
    sys.exit(main())
