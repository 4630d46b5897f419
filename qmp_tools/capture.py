"""Capture a scenario: boot the test guest with the plugin, keep the trace.

The trace is written to ``OUT.partial`` and renamed to ``OUT`` only when the
guest ran its scenario to the end and the plugin wrote its footer; on any
failure the partial file stays, named ``.partial`` (and it has no footer, so
readers call it truncated). Before the rename, the symbols that name the
trace's PCs go into it (:func:`embed_symbols`), so that it replays with
names anywhere. Beside the trace: ``NAME.console.log`` (the guest's serial
console) and ``NAME.truth.json.gz`` (ground truth taken with the VM paused at
the stop marker).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from replay.errors import TraceError
from replay.paths import side_paths
from replay.trace import format as fmt
from replay.trace.reader import TraceReader

from .errors import GuestError, SetupError
from .machine import GuestRun, MachineConfig, Progress, qemu_version
from .paths import BuildPaths, scenario_append, scenario_vcpus

WINDOWS = ("markers", "all")
#: The kernel function whose calls carry the console text (the 8250 serial
#: console: serial8250_console_write(up, s, count)). Not the generic
#: uart_console_write: with a FIFO, as QEMU's 16550A has, Linux 6.1's 8250
#: driver fills the FIFO itself and never calls it.
CONSOLE_WRITE = "serial8250_console_write"


@dataclass
class CaptureOptions:
    scenario: str = "seed"
    out: Path = Path("traces/seed.trace")
    dedup: bool = True
    #: untrack table frames nothing reaches (the plugin's untrack=, on by default)
    untrack: bool = True
    #: vCPUs; None: the scenario's ``vcpus`` file (1 without one, and for
    #: scenarios from outside the repository)
    smp: int | None = None
    window: str = "markers"
    deterministic: bool = False
    timeout: float = 600.0
    ram_mib: int = 512
    #: Kernel command-line words for a scenario built from outside the
    #: repository (qmp_tools.custom); None: the repository scenario's
    #: ``append`` file, and the scenario must be one of the repository's.
    append: str | None = None


@dataclass
class CaptureResult:
    trace: Path
    console_log: Path
    truth: Path | None
    duration: float
    summary: dict[str, Any]


def capture(opts: CaptureOptions, progress: Progress | None = None) -> CaptureResult:
    """Run one capture; raise CaptureError (SetupError, GuestError) on failure."""
    if opts.window not in WINDOWS:
        raise SetupError(f"bad window {opts.window!r}: use one of {', '.join(WINDOWS)}")
    smp = opts.smp
    if smp is None:
        smp = scenario_vcpus(opts.scenario) if opts.append is None else 1
    if not 1 <= smp <= 8:
        raise SetupError(f"bad --smp {smp}: use 1 to 8 vCPUs")
    if not 64 <= opts.ram_mib <= 2048:
        raise SetupError(f"bad RAM size {opts.ram_mib} MiB: use 64 to 2048")
    paths = BuildPaths.default()
    paths.require(opts.scenario, known=opts.append is None)
    out = opts.out
    partial = out.with_name(out.name + ".partial")
    console_log, truth_path = side_paths(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with open(partial, "wb"):
            pass
    except OSError as err:
        raise SetupError(f"cannot write {out}: {err.strerror}") from err
    plugin_options = {
        "out": str(partial.resolve()),
        "window": opts.window,
        "dedup": "on" if opts.dedup else "off",
        "scenario": opts.scenario,
        "kernel": paths.kernel_version() or "unknown",
        "qemu": qemu_version(),
        "vcpus": str(smp),
        **kernel_hooks(paths),
        **({} if opts.untrack else {"untrack": "off"}),
    }
    config = MachineConfig(
        kernel=paths.kernel,
        initrd=paths.initrd(opts.scenario),
        ram_mib=opts.ram_mib,
        smp=smp,
        deterministic=opts.deterministic,
        plugin=paths.plugin,
        plugin_options=plugin_options,
        timeout=opts.timeout,
        console_log=console_log,
        append=scenario_append(opts.scenario) if opts.append is None else opts.append,
    )
    plugin_options["tcg"] = config.tcg_thread  # in the header: how the vCPUs ran
    start = time.monotonic()
    result = GuestRun(config, progress).run()
    duration = time.monotonic() - start
    try:
        scanned = scan(partial)  # one read for the symbols and the counts
        embed_symbols(partial, paths, opts.scenario, scanned)
        summary = summarise(partial, scanned)
    except TraceError as err:
        raise GuestError(f"the plugin's trace is unusable: {err}", result.console_tail) from err
    os.replace(partial, out)
    if result.truth is not None:
        # `info tlb` text is megabytes; no time or name in the gzip header, so
        # that deterministic captures give the same bytes
        with open(truth_path, "wb") as raw, gzip.GzipFile(
            filename="", mode="wb", fileobj=raw, mtime=0
        ) as gz, io.TextIOWrapper(gz, encoding="utf-8") as f:
            json.dump(result.truth, f)
    summary["duration_s"] = round(duration, 2)
    return CaptureResult(
        trace=out,
        console_log=console_log,
        truth=truth_path if result.truth is not None else None,
        duration=duration,
        summary=summary,
    )


def kernel_hooks(paths: BuildPaths) -> dict[str, str]:
    """Plugin options for the kernel functions the plugin hooks, at their
    link-time addresses (build/guest/kallsyms; the plugin moves them by the
    KASLR slide of the ``kernel _text`` marker): exit_mmap, where it records
    "pagetable-dying PA" (what a Xen-aware kernel tells Xen there; with
    mm_struct.pgd's offset from build/guest/kernel-offsets), and
    the serial console's write (:data:`CONSOLE_WRITE`), where it records the
    kernel's console text as "console" markers."""
    from replay.guest.symbols import system_map_address

    try:
        offsets = dict(line.split() for line in paths.kernel_offsets.read_text().splitlines())
        mm_pgd = int(offsets["mm_pgd"])
    except (OSError, ValueError, KeyError) as err:
        raise SetupError(
            f"missing set-up: kernel offsets ({paths.kernel_offsets}) not built ({err}); "
            "run 'make setup'"
        ) from None
    names = ("exit_mmap", "_text", CONSOLE_WRITE)
    addr = {s: system_map_address(paths.kallsyms, s) for s in names}
    missing = [s for s in names if addr[s] is None]
    if missing:
        raise SetupError(f"{paths.kallsyms}: no {' or '.join(missing)} symbol; run 'make setup'")
    return {"dying": f"{addr['exit_mmap']:#x}", "text": f"{addr['_text']:#x}",
            "mm_pgd": str(mm_pgd), fmt.OPTION_CONSOLE: f"{addr[CONSOLE_WRITE]:#x}"}


@dataclass
class TraceScan:
    """What one read of a finished trace gives the capture: the distinct
    PCs (for the symbols map), the markers, the events by kind, the footer."""

    pcs: Any  # numpy uint64 array, sorted
    markers: list[list[str]]
    by_kind: dict[int, int]
    footer: dict[str, Any]


#: scan(): the per-chunk distinct PCs are merged when this many pile up (a
#: whole boot without dedup has ~50,000 chunks: merging at every chunk
#: would sort the growing set 50,000 times).
_PC_MERGE = 1 << 20


def scan(path: Path) -> TraceScan:
    """Read the finished trace ``path`` once."""
    import numpy as np

    parts: list[Any] = []
    pending = 0
    kinds = np.zeros(256, dtype=np.int64)
    markers: list[list[str]] = []
    with TraceReader(path) as reader:
        for chunk in reader:
            distinct = np.unique(chunk.pc)
            parts.append(distinct)
            pending += len(distinct)
            if pending > _PC_MERGE:
                parts = [np.unique(np.concatenate(parts))]
                pending = len(parts[0])
            kinds += np.bincount(chunk.kind, minlength=256)
            markers += chunk.markers
        footer = reader.footer or {}
    pcs = np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.uint64)
    by_kind = {int(k): int(c) for k, c in enumerate(kinds) if c}
    return TraceScan(pcs, markers, by_kind, footer)


def embed_symbols(path: Path, paths: BuildPaths, scenario: str,
                  scanned: TraceScan | None = None) -> int:
    """Put the symbols naming the PCs of the finished trace ``path`` into it
    (the symbols map, right after the header): kernel text symbols of
    build/guest/kallsyms moved by the ``kernel _text`` marker's slide, the
    scenario's module functions at their ``module`` markers' addresses. Only
    the entries that name a PC of the trace are kept (a few thousand of the
    kernel's ~50,000). ``scanned`` is the trace's :func:`scan` if already
    made. Returns how many."""
    from replay.guest.symbols import from_markers
    from replay.trace.symtab import TraceSymbols, insert

    got = scan(path) if scanned is None else scanned
    syms = from_markers(got.markers, system_map=paths.kallsyms,
                        module_dirs=[paths.module_dir(scenario)])
    table = TraceSymbols.of(syms.covering(got.pcs.tolist()))
    insert(path, table)
    return len(table)


def summarise(path: Path, scanned: TraceScan | None = None) -> dict[str, Any]:
    """Counts a user wants after a capture (the whole trace is read, unless
    its :func:`scan` is given)."""
    got = scan(path) if scanned is None else scanned
    by_kind = {k.name: got.by_kind.get(int(k), 0) for k in fmt.Kind}
    footer = got.footer
    accesses = sum(by_kind[k.name] for k in fmt.ACCESS_KINDS)
    size = path.stat().st_size
    return {
        "events": sum(by_kind.values()),
        "by_kind": {k: v for k, v in by_kind.items() if v},
        "accesses": accesses,
        "bytes": size,
        "bytes_per_access": round(size / accesses, 3) if accesses else None,
        "cr3_writes": by_kind["CR3_WRITE"],
        "tables_tracked": by_kind["SNAPSHOT"],
        "seen": footer.get("seen"),
        "deduplicated": footer.get("deduplicated"),
        "dropped": footer.get("dropped"),
    }
