"""The kernel console as events (``console`` markers) and secure
registrations with intervals (``console:REGEX@until:END``).

Synthetic traces as in test_checks (real writer, reader, replayer and
checker): a non-secure root B maps a page F at U (its home VA, the one the
"kernel" prints) and at an alias U2, and reads U2 once before the page's
line, once between its line and its end, once after (each after a CR3
reload, so that the replayer's dedup keeps it). Each expected number says
why.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from replay.analysis.console import ConsoleLines
from replay.analysis.secure import ConsoleSpec, parse_spec
from replay.errors import UsageError
from replay.trace import format as fmt

from .test_checks import KDATA, Trace, U, brief
from .test_guest import GuestTables

F = 0x5000
U2 = U + 0x10_0000
LINE = f"[    2.9] st: ALLOCATED {U:x}\n"
FREED = f"[    3.1] st: FREED {U:x}\n"
SPEC = "console:ALLOCATED ([0-9a-f]+)"


def test_console_payload_is_the_plugins_escape() -> None:
    # the same strings plugin/tests/test_console.c expects from the C encoder
    assert fmt.console_payload(b"a b\n") == "a%20b%0a"
    assert fmt.console_payload(b"100%") == "100%25"
    assert fmt.console_payload(b"\xc3\xa9") == "%c3%a9"
    every = bytes(range(256))
    assert fmt.console_bytes([fmt.MARKER_CONSOLE, fmt.console_payload(every)]) == every
    # a cut escape, an upper-case or signed one, another marker: not console text
    for bad in (["console", "ab%2"], ["console", "%2B"], ["console", "%+1"], ["start"]):
        assert fmt.console_bytes(bad) is None


def test_console_lines_assembled_across_markers() -> None:
    lines = ConsoleLines()
    parts = ["one%20li", "ne%0d%0atwo", "%0a", "thr", "ee"]
    got = [lines.feed([fmt.MARKER_CONSOLE, p]) for p in parts]
    # a line belongs to the marker holding its "\n"; "\r" is dropped; the rest waits
    assert got == [[], ["one line"], ["two"], [], []]
    assert lines.partial == "three"
    assert lines.feed(["module", "x", ".text", "0"]) == []  # other markers: nothing


def lives(tmp_path: Path) -> tuple[Trace, dict[str, int]]:
    """The page's three lives around its console lines (see the module)."""
    t = GuestTables()
    b = t.new()
    t.map(b, U, F, KDATA)
    t.map(b, U2, F, KDATA)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(b)
    at = {"before": tr.read(U2)}
    at["line"] = tr.console(LINE, parts=3)  # one line over three markers
    tr.cr3(b)
    at["during"] = tr.read(U2)
    at["freed"] = tr.console(FREED)
    tr.cr3(b)
    at["after"] = tr.read(U2)
    return tr, at


def test_console_registration_starts_at_its_line_and_ends_at_until(tmp_path: Path) -> None:
    tr, at = lives(tmp_path)
    ck = tr.run([f"{SPEC}@until:FREED"], console_events=True)
    [iv] = ck.registry.history[F]  # one line, one registration
    assert (iv.start, iv.end, iv.va) == (at["line"], at["freed"], U)
    # at the line: B (not secure) maps F in its guest tables (C1 high), its
    # shadow has mapped U2 since the read before (C1 critical), and U2 is
    # not F's home U (C4 high); C2 for the one read inside the interval only
    assert brief(ck.findings) == [
        ("C1", "high", at["line"], [F]),
        ("C1", "critical", at["line"], [F]),
        ("C4", "high", at["line"], [F]),
        ("C2", "critical", at["during"], [F]),
    ]
    assert ck.by_check("C2")[0].count == 1  # not the read before, not the one after
    assert ck.summary()["unresolved"] == []


def test_without_until_the_registration_runs_on(tmp_path: Path) -> None:
    tr, at = lives(tmp_path)
    ck = tr.run([SPEC], console_events=True)
    [iv] = ck.registry.history[F]
    assert (iv.start, iv.end) == (at["line"], None)  # no end: to the end of the trace
    # the reads during and after: two C2 occurrences, the first at "during"
    assert [(f.event, f.count) for f in ck.by_check("C2")] == [(at["during"], 2)]


def test_old_traces_search_the_log_from_start(tmp_path: Path) -> None:
    # a trace without console events: the log beside it is searched and the
    # VA resolved as va:VA@start (no start marker: the first access), as before
    tr, at = lives(tmp_path)
    ck = tr.run([SPEC], console=LINE + FREED)
    [iv] = ck.registry.history[F]
    assert iv.start == at["before"]
    # all three reads of U2, from the first
    assert [(f.event, f.count) for f in ck.by_check("C2")] == [(at["before"], 3)]


def test_until_group_must_be_the_registered_va(tmp_path: Path) -> None:
    tr, at = lives(tmp_path)
    other = tr.console(f"st: FREED {U + 0x5000:x}\n")  # another page's end
    assert other > at["after"]
    ck = tr.run([f"{SPEC}@until:FREED ([0-9a-f]+)"], console_events=True)
    [iv] = ck.registry.history[F]
    assert iv.end == at["freed"]  # the line naming U, not the later one naming U+0x5000
    (tmp_path / "x").mkdir()
    tr2, _ = lives(tmp_path / "x")
    ck2 = tr2.run([f"{SPEC}@until:FREED (dead)"], console_events=True)
    assert ck2.registry.history[F][0].end is None  # its group is no VA of ours: no end


def test_until_marker_works_on_old_traces_too(tmp_path: Path) -> None:
    tr, at = lives(tmp_path)
    stop = tr.marker("st-free")
    tr.cr3(tr.cr3s[0] >> 12)
    tr.read(U2)
    ck = tr.run([f"{SPEC}@until:marker:st-free"], console=LINE)
    [iv] = ck.registry.history[F]
    assert (iv.start, iv.end) == (at["before"], stop)
    # reads before, during, after the line, not the one after the marker
    assert ck.by_check("C2")[0].count == 3


def test_secure_end_still_ends_an_interval(tmp_path: Path) -> None:
    tr, at = lives(tmp_path)
    ck = tr.run([f"{SPEC}@until:NEVER"], console_events=True)
    assert ck.registry.history[F][0].end is None
    tr.marker(fmt.MARKER_SECURE_END)
    end = len(tr.events) - 1
    ck = tr.run([f"{SPEC}@until:NEVER"], console_events=True)
    assert ck.registry.history[F][0].end == end


def test_a_line_that_never_comes_is_reported(tmp_path: Path) -> None:
    tr, _ = lives(tmp_path)
    ck = tr.run(["console:NOTHING ([0-9a-f]+)"], console_events=True)
    assert ck.registry.history == {}
    assert ck.summary()["unresolved"] == [
        "console:NOTHING ([0-9a-f]+): no console line matched"]


def test_console_spec_parses_to_a_line_pattern() -> None:
    [spec] = parse_spec(f"{SPEC}@until:console:marker: done", console_events=True)
    assert isinstance(spec, ConsoleSpec)
    assert spec.until is not None and spec.until.console is not None
    # "console:" before the regex lets a line start with "marker:"
    assert spec.until.console.pattern == "marker: done"
    [va] = parse_spec("va:0x400000@until:marker:stop")
    assert va.until is not None and va.until.marker == "stop"  # type: ignore[union-attr]


@pytest.mark.parametrize(("text", "needle"), [
    (f"{SPEC}@until:", "nothing after '@until:'"),
    (f"{SPEC}@until:marker:a b", "bad marker name"),
    (f"{SPEC}@until:(", "bad regular expression after '@until:'"),
    ("root:0x1000@until:marker:stop", "a root registration has no '@until:'"),
])
def test_bad_until(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle):
        parse_spec(text, LINE, console_events=True)


def test_console_until_needs_console_events() -> None:
    with pytest.raises(UsageError, match="needs a trace with console events"):
        parse_spec(f"{SPEC}@until:FREED", LINE)
