"""Capture benchmark (``make bench-capture``): one run of each configuration.

Runs the seed scenario side by side, on the same machine, in one go:
plain TCG; the plugin loaded with the window never opening; the seed window
with dedup; the seed window with dedup off; the whole boot with every access
(``window=all dedup=off``). Prints wall-time ratios to plain TCG and the
bytes per recorded access of each trace. Nothing here asserts: the machine
is shared and noisy, so these are measurements to read, not tests.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from replay.errors import ShadowtraceError

from .capture import summarise
from .machine import GuestRun, MachineConfig, qemu_version
from .paths import BuildPaths

CONFIGS: list[tuple[str, dict[str, str] | None]] = [
    ("plain TCG (no plugin)", None),
    ("plugin, window closed", {"window": "none", "dedup": "on"}),
    ("seed window, dedup on", {"window": "markers", "dedup": "on"}),
    ("seed window, dedup off", {"window": "markers", "dedup": "off"}),
    ("whole boot, window=all dedup=off", {"window": "all", "dedup": "off"}),
]


def run_one(paths: BuildPaths, options: dict[str, str] | None, out: Path) -> float:
    plugin_options = None
    if options is not None:
        plugin_options = {
            "out": str(out), **options, "scenario": "seed",
            "kernel": paths.kernel_version(), "qemu": qemu_version(), "vcpus": "1",
        }
    config = MachineConfig(
        kernel=paths.kernel,
        initrd=paths.initrd("seed"),
        plugin=paths.plugin if options is not None else None,
        plugin_options=plugin_options or {},
        ground_truth=False,
    )
    start = time.monotonic()
    GuestRun(config).run()
    return time.monotonic() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench-capture", description=__doc__)
    parser.add_argument("--keep", type=Path, help="keep the traces in this folder")
    args = parser.parse_args(argv)
    paths = BuildPaths.default()
    try:
        paths.require("seed")
        with tempfile.TemporaryDirectory(prefix="st-bench-") as tmp:
            folder = args.keep or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            rows = []
            base = None
            for i, (name, options) in enumerate(CONFIGS):
                out = folder / f"bench{i}.trace"
                seconds = run_one(paths, options, out)
                base = base or seconds
                summary = summarise(out) if options is not None else None
                rows.append((name, seconds, seconds / base, summary))
                print(f"  ran: {name}: {seconds:.2f} s", file=sys.stderr)
    except ShadowtraceError as err:
        print(f"bench-capture: {err}", file=sys.stderr)
        return 1
    print(
        f"{'configuration':36} {'wall s':>8} {'ratio':>6} {'accesses':>13}"
        f" {'bytes':>13} {'B/access':>8}"
    )
    for name, seconds, ratio, s in rows:
        acc = f"{s['accesses']:,}" if s else "-"
        size = f"{s['bytes']:,}" if s else "-"
        bpa = f"{s['bytes_per_access']:.2f}" if s and s["bytes_per_access"] else "-"
        print(f"{name:36} {seconds:8.2f} {ratio:6.2f} {acc:>13} {size:>13} {bpa:>8}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
