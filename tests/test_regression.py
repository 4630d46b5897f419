"""Regression: every recorded trace in traces/ replays to its expectations.

``pytest --update-golden`` rewrites the expectation files on purpose; a
normal run only compares and fails with the differences.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qmp_tools.paths import TOP

from .conftest import run_cli

TRACES = TOP / "traces"
EXPECTED = sorted(TRACES.glob("*.expected.json"))


def expected(name: str) -> dict:
    return json.loads((TRACES / f"{name}.expected.json").read_text())["expected"]


def test_every_trace_has_expectations() -> None:
    traces = {p.name.removesuffix(".trace") for p in TRACES.glob("*.trace")}
    golden = {p.name.removesuffix(".expected.json") for p in EXPECTED}
    assert traces == golden
    # seed, private-root and shared-l1 at least are recorded
    assert {"seed", "private-root", "shared-l1", "secretmem", "vmalloc", "fork"} <= traces


@pytest.mark.parametrize("golden", EXPECTED, ids=lambda p: p.name.split(".")[0])
def test_trace_replays_as_expected(golden: Path, request: pytest.FixtureRequest) -> None:
    trace = golden.with_name(golden.name.removesuffix(".expected.json") + ".trace")
    args = ["check", str(trace), "--expect", str(golden)]
    if request.config.getoption("--update-golden"):
        args.append("--update")
    proc = run_cli(*args)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_seed_answer() -> None:
    """The seed question: when was the shadow of the allocated page built?"""
    (timeline,) = expected("seed")["timelines"]
    answer = timeline["answer"]
    # Not at page_address (it only computes an address) and not by the
    # module's dereference: Debian's kernel zeroes pages on allocation
    # (init_on_alloc), so alloc_pages' own clear_page writes the page first,
    # and that write's shadow fault builds the leaf entry.
    assert answer["when"] == "first-access"
    assert answer["leaf_reason"] == "demand"
    assert answer["leaf_symbol"].startswith("clear_page")
    assert answer["leaf_event"] == answer["first_access_event"]


def test_seed_page_reachable_from_every_root() -> None:
    findings = expected("seed")["findings"]
    # the page is in the direct map, which every root shares: its leaf is in
    # the shadows of non-secure roots (C1 critical) and was accessed from them
    # (C2: the module's read and alloc's zeroing run on non-secure roots)
    assert findings.get("C1/critical", 0) >= 1
    assert findings.get("C2/critical", 0) >= 1
    assert expected("seed")["c7_mismatches"] == 0


def test_private_root_shares_kernel_half() -> None:
    findings = expected("private-root")["findings"]
    # the private root copies the kernel half: its kernel L3 frames are shared
    # with every other root (C3 info), and the one whose subtree reaches the
    # secure page through the direct map is critical
    assert findings.get("C3/info", 0) >= 1 and findings.get("C3/critical", 0) >= 1
    # the secure page keeps its direct-map alias (C4)
    assert findings.get("C4/high", 0) >= 1


def test_shared_l1_is_critical() -> None:
    findings = expected("shared-l1")["findings"]
    # the secure page's L1 frame is linked from a non-secure root too: C3
    # critical beyond what private-root shows, and the alias read is C2
    assert findings.get("C3/critical", 0) > expected("private-root")["findings"].get(
        "C3/critical", 0
    )
    assert findings.get("C2/critical", 0) >= 1


def test_secretmem_page_has_no_alias() -> None:
    findings = expected("secretmem")["findings"]
    # memfd_secret removes the page from the direct map: no second mapping
    # (C4) of it anywhere. The program cannot name its own root as secure, so
    # its own mapping still counts as non-secure (C1, C2): the positive
    # control is the absence of C4.
    assert "C4/high" not in findings
    assert findings.get("C1/critical", 0) >= 1


def test_vmalloc_builds_and_destroys_shadows() -> None:
    exp = expected("vmalloc")
    counters = exp["counters"]
    # vmalloc/vfree write kernel tables: emulated, re-validated table writes
    assert counters["shadow_emulate"] > 0
    # and shadows come and go within the window
    assert exp["shadows"]["total"]["destroyed"] > 0
    (timeline,) = exp["timelines"]
    # the module's first write to the area builds its leaf by demand
    assert timeline["answer"]["leaf_symbol"].startswith("st_vmalloc_init")


def test_fork_unsyncs_user_l1s() -> None:
    counters = expected("fork")["counters"]
    # children write their copy-on-write pages: user L1s go out of sync and
    # are resynced at later CR3 writes (SHOPT_OUT_OF_SYNC is on by default)
    assert counters["shadow_unsync"] > 0 and counters["shadow_resync"] > 0
    # four children, the parent and the shell: more CR3 writes than seed's
    assert counters["cr3_write_intercepted"] > expected("seed")["counters"][
        "cr3_write_intercepted"
    ]
