"""``shadowtrace cut``: the cut is a valid, smaller trace that replays like
the range it was cut from.

What "the same findings for that window" means here. A finding is
de-duplicated by the checker on (check, severity, kind, frames, root) and
keeps the event of its first occurrence and a count. Its identity for this
comparison is (check, severity, kind, frames, root of its CR3, VA, first
event), with the cut's events shifted back to the original indexes
(``i_cut - cut_base + FROM``, both numbers from the cut's header options).
Two findings are the same when these identities are equal; for a cut that
begins where the full replay's model is empty as well, the counts must also
be equal.

Why that holds, and when: a cut restarts the engine with WINDOW_OPEN, so its
shadow pool, vTLBs, out-of-sync state and the checker's de-duplication start
empty at FROM. Cut at the ``start`` marker of a window=markers capture, FROM
lies before the capture's own WINDOW_OPEN, the full replay's model is also
empty there, and both replays feed the engine the very same events from
then on: every finding (check, root, VA, event, count) and every shadow
counter must be equal. Cut in the middle of a window, the guest tables are
carried exactly (the state prefix) but the shadows are not: the cut finds
again, at their first occurrence inside the window, findings the full
replay had already recorded before FROM (and only counted in the window).
For such a cut we check what must still hold: the state prefix is complete
(the C7 cross-check walks every access of the cut, none unknown, none
mismatched), and every finding the full replay first made inside the
window is made by the cut at the same event.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from replay.analysis.checks.checker import Checker, check_file
from replay.analysis.checks.findings import Finding
from replay.analysis.secure import parse_specs
from replay.driver.replayer import replay_file
from replay.guest.memory import cr3_root
from replay.session import has_console_events
from replay.trace import format as fmt
from replay.trace.cut import cut_trace
from replay.trace.reader import TraceReader, read_all

from .conftest import run_cli
from .replays import Goldens

TRACES = Path(__file__).resolve().parent.parent / "traces"
SEED = TRACES / "seed.trace"
PRIVATE_ROOT = TRACES / "private-root.trace"
#: seed.expected.json's registration.
SEED_SECURE = ["console:The address allocated is ([0-9a-f]+)"]

Identity = tuple[Any, ...]


def identity(f: Finding, shift: int) -> Identity:
    root = cr3_root(f.cr3) if f.cr3 is not None else None
    return (f.check, f.severity, f.kind, tuple(f.frames), root, f.va, f.event + shift)


def checked(path: Path, secure: list[str], console: Path) -> Checker:
    """A replay with the checks, its console: specs resolved as replay.session
    does (from the trace's console events; the log beside an older trace)."""
    with TraceReader(path) as reader:
        events = has_console_events(reader.header)
    text = None if events else console.read_text()
    checker, _, _ = check_file(path, parse_specs(secure, text, console_events=events))
    return checker


def seed_checker(goldens: Goldens) -> Checker:
    """The checker of seed.expected.json's replay of the whole seed trace
    (its options register SEED_SECURE)."""
    run = goldens("seed")
    assert run.options["secure"] == SEED_SECURE
    checker = run.replay.checker
    assert checker is not None
    return checker


def cut_window(path: Path) -> tuple[int, int, int]:
    """(FROM, TO, base) from a cut's header."""
    opts = read_all(path)[0]["options"]
    first, end = (int(x) for x in opts["cut"].split(":"))
    return first, end, int(opts["cut_base"])


def kinds(path: Path) -> np.ndarray[Any, np.dtype[np.uint8]]:
    return np.concatenate([c.kind for c in read_all(path)[1]])


def test_cut_start_stop_same_findings(tmp_path: Path, goldens: Goldens) -> None:
    out = tmp_path / "seed.cut.trace"
    proc = run_cli("cut", str(SEED), "--out", str(out),
                   "--from-marker", "start", "--to-marker", "stop")
    assert proc.returncode == 0, proc.stderr
    header, chunks, footer = read_all(out)  # the reader accepts it: footer, counts
    assert footer is not None and footer["events"] == sum(c.n for c in chunks)
    assert out.stat().st_size < SEED.stat().st_size
    full_kinds, cut_kinds = kinds(SEED), kinds(out)
    assert len(cut_kinds) < len(full_kinds)
    first, end, base = cut_window(out)
    src_markers = [m for _, _, m in goldens("seed").replay.stats.markers]
    assert src_markers[first] == ["start"]
    # after stop only the module's 14 section markers (and console lines)
    tail = [m[0] for m in src_markers[src_markers.index(["stop"]):] if m[0] != "console"]
    assert tail == ["stop"] + ["module"] * 14
    # FROM is before the capture's WINDOW_OPEN: no state prefix, only the
    # carried kernel marker before it; module markers (after stop) follow
    assert base == 1 and int(cut_kinds[0]) == fmt.Kind.MARKER
    assert header["options"]["cut"] == f"{first}:{end}"
    cut_markers = [m for _, _, m in replay_file(out)[1].markers]
    assert cut_markers[0][0] == "kernel" and cut_markers[1] == ["start"]
    assert [m[0] for m in cut_markers if m[0] == "module"] == ["module"] * 14
    # the trace's symbols map goes with the cut, unchanged: it replays with names anywhere
    with TraceReader(SEED) as src, TraceReader(out) as cut_reader:
        assert src.symbols and cut_reader.symbols == src.symbols

    # the full trace as ``shadowtrace check`` replays it (seed.expected.json
    # registers SEED_SECURE): the session's shared replay
    full = seed_checker(goldens)
    cut = checked(out, SEED_SECURE, TRACES / "seed.console.log")
    assert full.findings, "the seed trace has findings to compare"
    # every finding of the full replay lies in the window [start, stop] ...
    assert all(first <= f.event < end for f in full.findings)
    want = {identity(f, 0): f.count for f in full.findings}
    got = {identity(f, first - base): f.count for f in cut.findings}
    # ... and the cut makes the same ones, as often
    assert got == want
    # the engine saw the same events: same shadow work
    e_full, e_cut = full.engine, cut.engine
    assert e_full is not None and e_cut is not None
    for name, value in e_full.counters.items():
        # the cut lacks the WINDOW_CLOSE after stop, and the console lines
        # printed after it (only symbol and live secure markers are carried)
        if name not in ("events", "markers"):
            assert e_cut.counters[name] == value, name


def test_cut_mid_window(tmp_path: Path, goldens: Goldens) -> None:
    # about the middle of seed's 67,192 events: the C5 (event 48,019),
    # the C1 critical (48,026) and the C2 (55,036) of the seed page's frame
    # fall inside, the page's allocation (25,225) before it
    first, end = 39000, 63000
    out = tmp_path / "seed.mid.trace"
    res = cut_trace(SEED, out, events=(first, end))
    header, chunks, footer = read_all(out)
    assert footer is not None and footer["events"] == res.events
    # the range, whole, then the module markers that follow stop
    assert res.events - res.base == end - first + 14
    assert out.stat().st_size < SEED.stat().st_size
    # the state prefix: WINDOW_OPEN, the CR3 vCPU 0 holds (its last write
    # before FROM), one snapshot per frame known at FROM, the kernel marker
    full_kinds = kinds(SEED)
    full_cols = {name: np.concatenate([getattr(c, name) for c in read_all(SEED)[1]])
                 for name in ("val",)}
    writes = np.flatnonzero(full_kinds[:first] == fmt.Kind.CR3_WRITE)
    first_chunk = chunks[0]
    assert int(first_chunk.kind[0]) == fmt.Kind.WINDOW_OPEN
    assert int(first_chunk.kind[1]) == fmt.Kind.CR3_CURRENT
    assert int(first_chunk.val[1]) == int(full_cols["val"][writes[-1]])
    assert res.snapshots > 0
    assert int((first_chunk.kind == fmt.Kind.SNAPSHOT).sum()) == res.snapshots
    assert first_chunk.n == res.base  # the prefix is a chunk of its own
    np.testing.assert_array_equal(kinds(out)[res.base:res.base + end - first],
                                  full_kinds[first:end])

    # the state prefix is complete: every access of the cut is walked in
    # the rebuilt tables and reaches the frame the trace recorded
    _, stats = replay_file(out)
    assert stats.translations_unknown == 0
    assert stats.translation_mismatches == 0
    # (the range holds about 22,000 accesses: most of them reach the check)
    assert stats.translations_checked > 10_000

    # a registration that does not depend on history before FROM (the
    # frame the console VA resolves to in the full replay)
    full = seed_checker(goldens)
    frame = full.findings[0].frames[0]
    spec = [f"frame:{frame:#x}"]
    full = checked(SEED, spec, TRACES / "seed.console.log")
    cut = checked(out, spec, TRACES / "seed.console.log")
    want = {identity(f, 0) for f in full.findings if first <= f.event < end}
    got = {identity(f, first - res.base) for f in cut.findings}
    assert want, "the window has findings to compare"
    assert want <= got


def test_cut_carries_live_secure_markers(tmp_path: Path, goldens: Goldens) -> None:
    # private-root registers a secure root and frame, then ends them: a cut
    # between registration and secure-end keeps the registration markers
    src_markers = goldens("private-root").replay.stats.markers
    at = {m[0]: i for i, _, m in src_markers}
    lo, hi = at["secure-frame"] + 1, at["secure-end"]
    out = tmp_path / "pr.cut.trace"
    res = cut_trace(PRIVATE_ROOT, out, events=(lo, hi))
    markers = [(i, m) for i, _, m in replay_file(out)[1].markers]
    head = [m[0] for i, m in markers if i < res.base]
    assert head == ["kernel", "secure-root", "secure-frame"]
    assert [m[0] for i, m in markers if i >= res.base][-1] == "module"
    # after secure-end nothing is carried but the symbols
    res2 = cut_trace(PRIVATE_ROOT, tmp_path / "pr2.trace", events=(hi + 1, hi + 100))
    markers2 = [m[0] for i, _, m in replay_file(tmp_path / "pr2.trace")[1].markers
                if i < res2.base]
    assert markers2 == ["kernel"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--from-marker", "nosuch", "--to-marker", "stop"], "no marker 'nosuch'"),
        (["--from-marker", "stop", "--to-marker", "start"], "no marker 'start' after"),
        (["--events", "10"], "expected FROM:TO"),
        (["--events", "5:3"], "expected FROM:TO"),
        (["--events", "100:999999999"], "past the trace's end"),
        (["--from-marker", "start"], "go together"),
        ([], "give either"),
    ],
)
def test_cut_bad_options(tmp_path: Path, args: list[str], message: str) -> None:
    out = tmp_path / "x.trace"
    proc = run_cli("cut", str(SEED), "--out", str(out), *args)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("shadowtrace: "), proc.stderr
    assert message in lines[0]
    assert not out.exists() and not list(tmp_path.iterdir())
