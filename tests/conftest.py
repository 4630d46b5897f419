"""Shared fixtures: real captures of the seed scenario (QEMU, plugin, guest),
and the replays of the recorded traces (tests/replays.py).

Both are made once per test session and shared. ``make test`` builds
everything they need first; nothing here skips when a part is missing: a
missing part is a failing test. Tests that boot QEMU are marked ``e2e``
(``pytest -m 'not e2e'`` is the quick loop).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmp_tools.xen import XenResult

from .replays import Goldens


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite traces/*.expected.json from this replay (on purpose, never silently)",
    )


#: Fixtures that boot QEMU: a test using one must be marked e2e.
QEMU_FIXTURES = ("captures", "seed_again", "xen_seed_run", "xen_smp_run", "module_capture",
                 "warm_seed")


#: Session fixtures that share a worker under ``pytest -n`` (``make test``):
#: a test of one of them runs where the others do, so each boot (and each
#: replay of a recorded trace, ``goldens``) happens once. warm_seed and
#: xen_seed_run go together: the warm-start comparison needs both.
SHARED_WORKER = {"captures": "seed-captures", "seed_again": "seed-captures",
                 "xen_seed_run": "xen-seed", "warm_seed": "xen-seed",
                 "xen_smp_run": "xen-smp", "goldens": "goldens"}


#: The groups that take longest (measured with ``--durations``: the Xen seed
#: run and the warm-start capture about 100 s together, the two seed captures
#: and the seed recapture about 45 s, the replays of the recorded traces and
#: the tests that read them about 40 s, the 2-vCPU Xen run about 55 s), in
#: the order handed out: the two Xen groups not at once (each Xen run is a
#: multi-threaded QEMU; two at once on two CPUs slow both).
FIRST = ("xen-seed", "seed-captures", "goldens", "xen-smp")


def _worker_group(item: pytest.Item) -> str | None:
    """The pytest-xdist group of ``item`` (``--dist loadgroup``): the group of
    the costly session fixture it uses, else its file's when it uses a
    module-scoped fixture (made once per worker, so once per file this way),
    else none (any worker)."""
    names = getattr(item, "fixturenames", ())
    for fixture in names:
        if fixture in SHARED_WORKER:
            return SHARED_WORKER[fixture]
    info = getattr(item, "_fixtureinfo", None)
    defs = getattr(info, "name2fixturedefs", {}) if info is not None else {}
    if any(d[-1].scope == "module" for d in defs.values() if d):
        return item.nodeid.split("::", 1)[0]
    return None


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups: dict[str, str | None] = {}
    for item in items:
        boots = [f for f in QEMU_FIXTURES if f in getattr(item, "fixturenames", ())]
        if boots and item.get_closest_marker("e2e") is None:
            raise pytest.UsageError(
                f"{item.nodeid} boots QEMU (fixture {boots[0]}) but is not marked e2e"
            )
        group = groups[item.nodeid] = _worker_group(item)
        if group is not None:
            item.add_marker(pytest.mark.xdist_group(group))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # Longest work first (make test passes --no-loadscope-reorder, so the
        # scheduler hands groups out in this order): the FIRST groups, then
        # the other tests that boot QEMU, then the rest; otherwise as
        # collected. Every worker sorts alike, as pytest-xdist requires.
        def rank(item: pytest.Item) -> int:
            group = groups[item.nodeid]
            if group in FIRST:
                return FIRST.index(group)
            return len(FIRST) + (item.get_closest_marker("e2e") is None)
        items.sort(key=rank)


@pytest.hookimpl(trylast=True)  # after pytest-xdist has named the groups
def pytest_collection_finish(session: pytest.Session) -> None:
    """Under ``--dist loadgroup`` a grouped test's id ends in ``@GROUP`` (what
    the scheduler reads); if it does not, the groups are ignored and every
    worker would boot each shared fixture again: say so and stop."""
    if not getattr(session.config.option, "loadgroup", False):
        return
    for item in session.items:
        if item.get_closest_marker("xdist_group") is not None and "@" not in item.nodeid:
            raise pytest.UsageError(
                f"pytest-xdist did not group {item.nodeid} (pytest and pytest-xdist "
                "versions do not fit: see the pytest pin in pyproject.toml)")


@dataclass
class Captured:
    trace: Path
    console: Path
    truth: Path
    stdout: str


def run_cli(
    *args: str, timeout: float = 900, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the shadowtrace command as a user would; never raises on failure.
    ``env``: variables set on top of this process's environment."""
    return subprocess.run(
        [sys.executable, "-m", "replay.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
        env=None if env is None else {**os.environ, **env},
    )


def capture(folder: Path, name: str, *extra: str) -> Captured:
    out = folder / f"{name}.trace"
    proc = run_cli("capture", "--out", str(out), *extra)
    assert proc.returncode == 0, f"capture failed: {proc.stderr[-3000:]}"
    return Captured(
        trace=out,
        console=folder / f"{name}.console.log",
        truth=folder / f"{name}.truth.json.gz",
        stdout=proc.stdout,
    )


@pytest.fixture(scope="session")
def captures(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Captured]:
    """The seed scenario captured deterministically with dedup on and off."""
    folder = tmp_path_factory.mktemp("captures")
    return {
        "dedup": capture(folder, "seed-dedup", "--scenario", "seed", "--deterministic"),
        "full": capture(
            folder, "seed-full", "--scenario", "seed", "--deterministic", "--dedup", "off"
        ),
    }


@pytest.fixture(scope="session")
def seed_again(tmp_path_factory: pytest.TempPathFactory) -> Captured:
    """The seed scenario captured deterministically once more, as
    ``captures["dedup"]`` is, but into another folder (whose name holds rich
    markup: the capture summary must print it as it is) under another name."""
    folder = tmp_path_factory.mktemp("again[bold]")
    return capture(folder, "seed-again", "--scenario", "seed", "--deterministic")


@pytest.fixture(scope="session")
def warm_seed(tmp_path_factory: pytest.TempPathFactory) -> Captured:
    """The seed scenario captured from boot as ``make xen-fidelity`` captures
    it (``--window all --no-untrack --deterministic``): the model side of a
    warm-start comparison with Xen (about a minute and a half)."""
    folder = tmp_path_factory.mktemp("warm")
    return capture(folder, "seed", "--scenario", "seed", "--window", "all", "--no-untrack",
                   "--deterministic")


@pytest.fixture(scope="session")
def xen_seed_run(tmp_path_factory: pytest.TempPathFactory) -> XenCliRun:
    """One run of the seed scenario under the real Xen (shadow paging, xentrace),
    as a user makes it (``shadowtrace xen --scenario seed --out DIR``), shared
    by every test that needs it: a boot takes about a minute."""
    out = tmp_path_factory.mktemp("xen-seed")
    proc = run_cli("xen", "--scenario", "seed", "--out", str(out), timeout=900)
    assert proc.returncode == 0, f"shadowtrace xen failed: {proc.stderr[-4000:]}"
    info = json.loads((out / "seed.xen.json").read_text())
    return XenCliRun(
        console_log=Path(info["console_log"]), xentrace=Path(info["xentrace"]),
        host_log=Path(info["host_log"]), duration=info["duration_s"], pcpus=info["pcpus"],
        out=out, stdout=proc.stdout,
    )


@pytest.fixture(scope="session")
def xen_smp_run(tmp_path_factory: pytest.TempPathFactory) -> XenCliRun:
    """One run of smp-fork under the real Xen with no --vcpus: the scenario's
    ``vcpus`` file gives it 2, each pinned to a pCPU of its own."""
    out = tmp_path_factory.mktemp("xen-smp")
    proc = run_cli("xen", "--scenario", "smp-fork", "--out", str(out), timeout=900)
    assert proc.returncode == 0, f"shadowtrace xen failed: {proc.stderr[-4000:]}"
    info = json.loads((out / "smp-fork.xen.json").read_text())
    return XenCliRun(
        console_log=Path(info["console_log"]), xentrace=Path(info["xentrace"]),
        host_log=Path(info["host_log"]), duration=info["duration_s"], pcpus=info["pcpus"],
        out=out, stdout=proc.stdout,
    )


@dataclass
class XenCliRun(XenResult):
    """A :class:`XenResult` of the command, with its folder and what it printed."""

    out: Path = Path()
    stdout: str = ""


@pytest.fixture(scope="session")
def goldens(request: pytest.FixtureRequest) -> Goldens:
    """Every golden file's replay, made the first time a test asks (see
    tests/replays.py); ``--update-golden`` rewrites each file from it."""
    return Goldens(update=bool(request.config.getoption("--update-golden")))
