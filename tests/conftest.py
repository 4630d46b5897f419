"""Shared fixtures: real captures of the seed scenario (QEMU, plugin, guest).

The captures are made once per test session and shared. ``make test`` builds
everything they need first; nothing here skips when a part is missing: a
missing part is a failing test.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from qmp_tools.xen import XenResult, run_xen


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        help="rewrite traces/*.expected.json from this replay (on purpose, never silently)",
    )


@dataclass
class Captured:
    trace: Path
    console: Path
    truth: Path
    stdout: str


def run_cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run the shadowtrace command as a user would; never raises on failure."""
    return subprocess.run(
        [sys.executable, "-m", "replay.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
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
def xen_seed_run(tmp_path_factory: pytest.TempPathFactory) -> XenResult:
    """One run of the seed scenario under the real Xen (shadow paging, xentrace),
    shared by every test that needs it: a boot takes about a minute."""
    return run_xen("seed", tmp_path_factory.mktemp("xen-seed"))
