"""Bad input to capture: one clear line, exit 1, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qmp_tools.paths import BuildPaths

from .conftest import run_cli


def _qemu_processes() -> int:
    out = subprocess.run(["pgrep", "-c", "-f", "qemu-system-x86_64"], capture_output=True,
                         text=True)
    return int(out.stdout.strip() or 0)


def _shadowtrace_tmp() -> set[str]:
    return {p for p in os.listdir("/dev/shm") if p.startswith("shadowtrace-")}


def _one_line(stderr: str) -> str:
    """The error line: after the guest console's tail (which ends with ---), one line."""
    own = stderr.split("\n---\n")[-1]
    lines = [ln for ln in own.splitlines() if ln.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_unknown_scenario(tmp_path: Path) -> None:
    proc = run_cli("capture", "--scenario", "nope", "--out", str(tmp_path / "x.trace"))
    assert proc.returncode == 1
    assert "unknown scenario 'nope'" in _one_line(proc.stderr)


def test_bad_option_is_usage_error() -> None:
    proc = run_cli("capture", "--dedup", "maybe")
    assert proc.returncode == 2
    assert "invalid choice" in _one_line(proc.stderr)


def test_unwritable_output(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    proc = run_cli("capture", "--out", str(tmp_path / "file" / "x.trace"))
    assert proc.returncode == 1
    assert "cannot write" in _one_line(proc.stderr)


def test_missing_setup(tmp_path: Path) -> None:
    env = dict(os.environ, SHADOWTRACE_BUILD=str(tmp_path / "nothing-built"))
    proc = subprocess.run(
        [sys.executable, "-m", "replay.cli", "capture",
         "--out", str(tmp_path / "x.trace")],
        capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent,
    )
    assert proc.returncode == 1
    assert "missing set-up" in _one_line(proc.stderr)
    assert "make setup" in proc.stderr


def test_bad_plugin_option_stops_qemu_with_one_line(tmp_path: Path) -> None:
    paths = BuildPaths.default()
    ram = tmp_path / "ram"
    ram.write_bytes(b"")
    os.truncate(ram, 64 << 20)
    proc = subprocess.run(
        ["qemu-system-x86_64", "-display", "none", "-nodefaults", "-m", "64M",
         "-plugin", f"{paths.plugin},out={tmp_path / 't'},ram={ram},ramsize={64 << 20},"
         "window=sometimes"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert proc.returncode != 0
    ours = [ln for ln in proc.stderr.splitlines() if ln.startswith("shadowtrace plugin:")]
    assert len(ours) == 1 and "window" in ours[0], proc.stderr


def test_guest_panic_keeps_partial_trace(tmp_path: Path) -> None:
    before = _shadowtrace_tmp()
    out = tmp_path / "panic.trace"
    proc = run_cli("capture", "--scenario", "panic", "--out", str(out), "--timeout", "300")
    assert proc.returncode == 1
    # sysrq-c panics on purpose with this reason (6.1: sysrq_handle_crash)
    assert "guest kernel panicked: sysrq triggered crash" in _one_line(proc.stderr)
    assert "Kernel panic - not syncing" in proc.stderr  # the console tail is shown
    assert not out.exists()
    assert (tmp_path / "panic.trace.partial").stat().st_size > 0
    assert _qemu_processes() == 0
    assert _shadowtrace_tmp() == before


def test_guest_hang_times_out(tmp_path: Path) -> None:
    before = _shadowtrace_tmp()
    out = tmp_path / "hang.trace"
    proc = run_cli("capture", "--scenario", "hang", "--out", str(out), "--timeout", "25")
    assert proc.returncode == 1
    assert "guest hang" in _one_line(proc.stderr)
    assert (tmp_path / "hang.trace.partial").exists()
    assert _qemu_processes() == 0
    assert _shadowtrace_tmp() == before
