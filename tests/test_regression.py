"""Regression: every recorded trace in traces/ replays to its expectations.

Each golden file is replayed once per session, in-process and exactly as
``shadowtrace check`` does (the ``goldens`` fixture, tests/replays.py);
``pytest --update-golden`` rewrites the expectation files on purpose; a
normal run only compares and fails with the differences. What the results
must show (the seed answer, C3 on private-root ...) is in
tests/test_golden_invariants.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from replay.analysis.golden import compare

from .replays import EXPECTED, TRACES, VARIANTS, Goldens, golden_name, trace_of


def test_every_trace_has_expectations() -> None:
    traces = {p.name.removesuffix(".trace") for p in TRACES.glob("*.trace")}
    golden = {p.name.removesuffix(".expected.json") for p in EXPECTED}
    assert traces == golden
    # seed, private-root and shared-l1 at least are recorded
    assert {"seed", "private-root", "shared-l1", "secretmem", "vmalloc", "fork",
            "reserved-root", "reserved-root-lazy"} <= traces


def test_every_variant_names_a_trace_and_its_config() -> None:
    assert VARIANTS  # the configuration replays below need them
    for golden in VARIANTS:
        assert trace_of(golden).exists(), golden.name
        config = json.loads(golden.read_text())["options"]["config"]
        variant = golden.name.removesuffix(".expected.json").split("+")[1]
        assert (golden.parent / config).resolve() == TRACES / "configs" / f"{variant}.toml"


@pytest.mark.parametrize("golden", EXPECTED + VARIANTS, ids=golden_name)
def test_trace_replays_as_expected(golden: Path, goldens: Goldens) -> None:
    run = goldens(golden)
    diff = compare(run.expected, run.got)
    assert diff == [], f"{run.trace}: {len(diff)} difference(s) from {golden}:\n" + "\n".join(
        f"  {line}" for line in diff)
