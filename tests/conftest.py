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


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        boots = [f for f in QEMU_FIXTURES if f in getattr(item, "fixturenames", ())]
        if boots and item.get_closest_marker("e2e") is None:
            raise pytest.UsageError(
                f"{item.nodeid} boots QEMU (fixture {boots[0]}) but is not marked e2e"
            )


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
