"""End to end: a researcher's own module (``shadowtrace capture --module``),
its console lines as events, and a secure registration with an interval.

``tests/modules/st_alias.c`` gives one page frame three lives inside one
``insmod``: each allocates the page, maps it a second time with vmap (the
alias), writes through the alias, unmaps it and frees the page; only the
second life prints its addresses (``ALLOCATED``, ``ALIAS``, ``RELEASING``).
Registered with ``console:ALLOCATED ...@until:RELEASING ...`` the frame is
secure for the second life only, so the report has that life's alias and
nothing of the frame's other lives (the first life's alias, insmod's buffer
before it, the page table it becomes after). The same frame registered for
the whole window (what a trace without console events gives) reports those
too: that is what the interval removes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from qmp_tools.paths import TOP, BuildPaths
from replay.analysis.checks.findings import Finding
from replay.analysis.console import ConsoleLines
from replay.session import Replay, ReplayOptions, replay
from replay.trace import format as fmt
from replay.trace.reader import TraceReader

from .conftest import run_cli

pytestmark = pytest.mark.e2e

MODULE = TOP / "tests" / "modules" / "st_alias.c"
INTERVAL = "console:ALLOCATED ([0-9a-f]+)@until:RELEASING ([0-9a-f]+)"


@dataclass
class ModuleCapture:
    trace: Path
    console: str
    stdout: str
    va: int      # the page's direct-map address, as printed
    alias: int   # the second life's vmap address, as printed


def printed(console: str, word: str) -> int:
    found = re.findall(rf"st_alias: {word} ([0-9a-f]+)", console)
    assert len(found) == 1, f"st_alias printed {word} {len(found)} times"  # once: life 2
    return int(found[0], 16)


@pytest.fixture(scope="module")
def module_capture(tmp_path_factory: pytest.TempPathFactory) -> ModuleCapture:
    """st_alias captured as a user would: ``capture --module PATH.c``."""
    out = tmp_path_factory.mktemp("module") / "st_alias.trace"
    proc = run_cli("capture", "--module", str(MODULE), "--deterministic", "--out", str(out))
    assert proc.returncode == 0, f"capture failed: {proc.stderr[-3000:]}"
    console = out.with_name("st_alias.console.log").read_text()
    return ModuleCapture(out, console, proc.stdout, printed(console, "ALLOCATED"),
                         printed(console, "ALIAS"))


def console_lines(trace: Path) -> list[tuple[int, str]]:
    """(event, line) of every console line the trace's console events hold."""
    lines = ConsoleLines()
    out = []
    with TraceReader(trace) as reader:
        for chunk in reader:
            for j in np.nonzero(chunk.kind == fmt.Kind.MARKER)[0]:
                for line in lines.feed(chunk.markers[int(chunk.val[j])]):
                    out.append((chunk.first + int(j), line))
    return out


def roots_before(trace: Path, event: int) -> set[int]:
    """The CR3 values loaded (CR3_WRITE, CR3_CURRENT) before ``event``."""
    roots = set()
    with TraceReader(trace) as reader:
        for chunk in reader:
            cr3 = (chunk.kind == fmt.Kind.CR3_WRITE) | (chunk.kind == fmt.Kind.CR3_CURRENT)
            for j in np.nonzero(cr3)[0]:
                if chunk.first + int(j) < event:
                    roots.add(int(chunk.val[j]))
    return roots


def test_module_is_built_and_loaded_in_the_window(module_capture: ModuleCapture) -> None:
    with TraceReader(module_capture.trace) as reader:
        assert reader.header["scenario"] == "user-st_alias"  # user- + the module's name
    # the module ran its three lives on one frame: the test means something
    assert "st_alias: same frame: 3 lives" in module_capture.console
    # its .ko is where the replay looks for module symbols
    assert (BuildPaths.default().module_dir("user-st_alias") / "st_alias.ko").is_file()


def test_console_events_are_the_kernels_console_lines(module_capture: ModuleCapture) -> None:
    lines = [line for _, line in console_lines(module_capture.trace)]
    # the kernel's lines of the serial log (printk's timestamp), in order;
    # the shell's own lines (init's echo, stmark) are not printk: not events
    kernel = [ln.rstrip("\r") for ln in module_capture.console.splitlines()
              if ln.startswith("[")]
    assert lines == kernel
    assert any("st_alias: ALLOCATED" in ln for ln in lines)


def run(cap: ModuleCapture, spec: str, tmp: Path) -> Replay:
    """A replay as ``shadowtrace replay TRACE --secure SPEC --watch-console
    'ALIAS (...)' --json FILE`` makes it (the CLI calls the same function)."""
    return replay(ReplayOptions(trace=cap.trace, secure=[spec], json=tmp / "r.json",
                                watch_console=r"st_alias: ALIAS ([0-9a-f]+)"))


def of_frame(findings: list[Finding], frame: int) -> list[Finding]:
    return [f for f in findings if frame in f.frames]


def test_interval_reports_only_the_announced_life(module_capture: ModuleCapture,
                                                  tmp_path: Path) -> None:
    cap = module_capture
    lines = console_lines(cap.trace)
    start = next(e for e, ln in lines if "st_alias: ALLOCATED" in ln)
    end = next(e for e, ln in lines if "st_alias: RELEASING" in ln)
    r = run(cap, INTERVAL, tmp_path)
    assert r.checker is not None
    history = r.checker.registry.history
    assert len(history) == 1  # one ALLOCATED line: one frame
    [(frame, [iv])] = history.items()  # ... registered once
    # from the ALLOCATED line's event to the RELEASING line's
    assert (iv.start, iv.end, iv.va) == (start, end, cap.va)
    found = of_frame(r.checker.findings, frame)
    assert found and all(start <= f.event < end for f in found)  # nothing outside
    c4 = [f for f in found if f.check == "C4"]
    # C4 (a second mapping of a secure frame) only for the printed alias,
    # one finding per root (C4 is per frame and root): every root loaded in
    # the window before the alias appeared maps the kernel half, shared by
    # all, so each has it (3 here: `stmark start`'s, the shell's, the one
    # insmod starts from; the model keeps their shadows)
    assert sorted({f.va for f in c4}) == [cap.alias]
    first = min(f.event for f in c4)
    assert len(c4) == len({f.cr3 for f in c4}) == 3
    assert {f.cr3 for f in c4} == roots_before(cap.trace, first)
    # the terminal report's symbols come from the JSON: the alias' first
    # write is the module's own code, named [st_alias] from its .ko
    doc = json.loads((tmp_path / "r.json").read_text())
    [tl] = doc["timelines"]
    assert tl["va"] == hex(cap.alias)
    symbol = tl["guest"]["first_write"]["symbol"]
    assert symbol.startswith("st_alias_life+") and symbol.endswith(" [st_alias]")


def test_terminal_report_names_the_module_functions(module_capture: ModuleCapture) -> None:
    # the command a user runs, its terminal report read back: the module's
    # function with its [module] suffix, printed as text (rich would eat a
    # "[st_alias]" read as markup)
    proc = run_cli("replay", str(module_capture.trace), "--secure", INTERVAL,
                   "--watch-console", r"st_alias: ALIAS ([0-9a-f]+)")
    assert proc.returncode == 0, proc.stderr
    named = re.findall(r"st_alias_life\+0x[0-9a-f]+ \[st_alias\]", proc.stdout)
    assert named, proc.stdout[-3000:]


def test_whole_window_mixes_in_the_other_lives(module_capture: ModuleCapture,
                                               tmp_path: Path) -> None:
    cap = module_capture
    lines = console_lines(cap.trace)
    start = next(e for e, ln in lines if "st_alias: ALLOCATED" in ln)
    end = next(e for e, ln in lines if "st_alias: RELEASING" in ln)
    r = run(cap, f"va:{cap.va:#x}", tmp_path)  # secure from start to the end
    assert r.checker is not None
    [frame] = r.checker.registry.history
    found = of_frame(r.checker.findings, frame)
    # before its line: the frame's earlier lives (insmod's buffer, the first alias)
    assert any(f.event < start for f in found)
    # after its end: freed, it becomes a page table (C5 as-table)
    assert any(f.event >= end and f.check == "C5" and f.kind == "as-table" for f in found)
    # and other aliases than the printed one
    assert {f.va for f in found if f.check == "C4"} - {cap.alias}


def test_module_runs_under_xen_and_compares(module_capture: ModuleCapture,
                                            tmp_path: Path) -> None:
    """The same module under the real Xen (``shadowtrace xen --module``, as
    for capture) and put beside its capture (``shadowtrace compare``): the
    run is the user's scenario, the module ran in the window, its own
    instructions are named from the user's build, and each side's watched
    VA is its own console's."""
    import polars as pl

    out = tmp_path / "xen"
    proc = run_cli("xen", "--module", str(MODULE), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the scenario's name: user- + the module's (as the capture's header has it)
    with TraceReader(module_capture.trace) as reader:
        name = reader.header["scenario"]
    assert name == "user-st_alias"
    summary = json.loads((out / f"{name}.xen.json").read_text())
    assert summary["scenario"] == name and len(summary["pcpus"]) == 1  # a module: 1 vCPU
    console = (out / f"{name}.xen.console.log").read_text()
    xen_va = printed(console, "ALLOCATED")  # once: the module's second life, under Xen too
    df = pl.read_parquet(out / f"{name}.xen.parquet")
    inside = df.filter((pl.col("window") == "inside") & pl.col("vcpu").is_not_null())
    own = inside.filter(pl.col("symbol").is_not_null()
                        & pl.col("symbol").str.ends_with("[st_alias]"))
    # st_alias_life's first store into the alias (a new vmap page) is a
    # shadow fault Xen records: named from build/scenarios/user-st_alias
    assert own.filter(pl.col("kind") == "fixup").height > 0, inside["symbol"].unique()
    doc_path = tmp_path / "cmp.json"
    proc = run_cli("compare", "--trace", str(module_capture.trace), "--xen", str(out),
                   "--watch-console", r"st_alias: ALLOCATED ([0-9a-f]+)",
                   "--json", str(doc_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(doc_path.read_text())
    assert doc["start"] == "cold"  # the module capture is a marker-window one
    assert [(int(a["va_model"], 16), int(a["va_xen"], 16)) for a in doc["answers"]] == [
        (module_capture.va, xen_va)]
    by = {m["name"]: m for m in doc["metrics"]}
    assert by["faults_fixed"]["xen"] == inside.filter(pl.col("kind") == "fixup").height


def test_module_errors_are_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text('#include <linux/module.h>\n'
                      'static int __init b_init(void) { return no_such_name; }\n'
                      'module_init(b_init);\nMODULE_LICENSE("GPL");\n')
    badcpus = tmp_path / "badcpus"
    badcpus.mkdir()
    (badcpus / "steps.sh").write_text("stmark start\nstmark stop\n")
    (badcpus / "vcpus").write_text("two\n")
    cases = [
        (["--module", str(tmp_path / "missing.c")], "no such file"),
        (["--module", str(tmp_path / "notc.txt")], "not a C file"),
        (["--module", str(broken)], rf"does not compile: {re.escape(str(broken))}:2:\d+: error: "),
        (["--module", str(MODULE), "--scenario", "seed"], "give one of them"),
        (["--steps", str(broken)], "--steps needs --module"),
        (["--scenario", str(tmp_path)], "no steps.sh"),
        (["--scenario", str(badcpus)], r"vcpus: want one number of vCPUs, 1 to 8, not 'two'"),
    ]
    # capture and xen resolve a user's scenario alike: the same one line each
    for command, out in (("capture", tmp_path / "x.trace"), ("xen", tmp_path / "xen")):
        for args, needle in cases:
            proc = run_cli(command, *args, "--out", str(out))
            assert proc.returncode == 1, (command, args, proc.stderr)
            lines = proc.stderr.strip().splitlines()
            assert len(lines) == 1 and re.search(needle, lines[0]), (command, args, proc.stderr)
        assert not out.exists()


def test_scenario_folder_outside_the_repo(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "steps.sh").write_text("stmark start\necho mine ran\nstmark stop\n")
    out = tmp_path / "mine.trace"
    proc = run_cli("capture", "--scenario", str(folder), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with TraceReader(out) as reader:
        assert reader.header["scenario"] == "user-mine"  # user- + the folder's name
        assert reader.header["options"]["vcpus"] == "1"  # no vcpus file in the folder
        names = [m[0] for c in reader for m in c.markers]
    assert "start" in names and "stop" in names  # its steps opened and closed the window
    assert "mine ran" in out.with_name("mine.console.log").read_text()


def test_scenario_folder_has_its_own_vcpus(tmp_path: Path) -> None:
    """A folder's ``vcpus`` file counts as a repository scenario's: capture
    runs it on that many vCPUs unless --smp says otherwise (built, not
    booted: the boot of a 2-vCPU capture is tested on smp-fork)."""
    import argparse

    from replay.cli import _capture_scenario

    folder = tmp_path / "twocpu"
    folder.mkdir()
    (folder / "steps.sh").write_text("stmark start\nstmark stop\n")
    (folder / "vcpus").write_text("2\n")
    args = argparse.Namespace(scenario=str(folder), module=None, steps=None, append="")
    name, _append, default_dir, vcpus = _capture_scenario(args)
    assert (name, default_dir, vcpus) == ("user-twocpu", "out", 2)
    (folder / "vcpus").unlink()
    assert _capture_scenario(args)[3] == 1  # no file: one vCPU
