"""Bad input to capture: one clear line, exit 1, nothing left behind.

"Nothing left behind" is checked on what this test started, never by name
across the host (other QEMUs and captures may run beside the suite): the
capture runs with a token in its environment, which the QEMU it starts
inherits; while it runs, every process holding the token is noted with the
``/dev/shm/shadowtrace-*`` work folders its command line names; after it,
none of those processes may be alive and none of those folders left.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from qmp_tools.paths import BuildPaths

from .conftest import run_cli

_WORKDIR = re.compile(r"/dev/shm/shadowtrace-[^/,\s\x00]+")


@dataclass
class Watched:
    """A capture run with what it started (see the module docstring)."""

    proc: subprocess.CompletedProcess[str]
    token: str
    #: PIDs seen holding the token (the capture's own and its QEMU's), and
    #: the work folders their command lines name.
    pids: set[int] = field(default_factory=set)
    workdirs: set[str] = field(default_factory=set)

    def alive(self) -> list[int]:
        """The PIDs seen that still run (not zombies) as processes of ours."""
        return [pid for pid in sorted(self.pids) if _holds(pid, self.token)]

    def left(self) -> list[str]:
        return [d for d in sorted(self.workdirs) if os.path.exists(d)]


def _holds(pid: int, token: str) -> bool:
    """Whether process ``pid`` runs (not a zombie) with ``token`` in its environment."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                return False
        with open(f"/proc/{pid}/environ", "rb") as f:
            return token.encode() in f.read().split(b"\0")
    except OSError:
        return False


def _scan(w: Watched) -> None:
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or not _holds(int(entry), w.token):
            continue
        w.pids.add(int(entry))
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except OSError:
            continue
        w.workdirs.update(_WORKDIR.findall(cmdline))


def run_watched(*args: str, timeout: float = 900) -> Watched:
    """``shadowtrace ARGS`` as run_cli, noting what it starts as it runs."""
    token = f"SHADOWTRACE_TEST_RUN={uuid.uuid4().hex}"
    env = dict(os.environ, SHADOWTRACE_TEST_RUN=token.split("=", 1)[1])
    child = subprocess.Popen(
        [sys.executable, "-m", "replay.cli", *args], stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    w = Watched(subprocess.CompletedProcess(child.args, 0), token)
    deadline = time.monotonic() + timeout
    # the output is small (a console tail): reading it after the exit is safe
    while child.poll() is None:
        _scan(w)
        if time.monotonic() > deadline:
            child.kill()
        time.sleep(0.1)
    out, err = child.communicate()
    w.proc = subprocess.CompletedProcess(child.args, child.returncode, out, err)
    return w


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


@pytest.mark.e2e
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


@pytest.mark.e2e
def test_guest_panic_keeps_partial_trace(tmp_path: Path) -> None:
    out = tmp_path / "panic.trace"
    w = run_watched("capture", "--scenario", "panic", "--out", str(out), "--timeout", "300")
    proc = w.proc
    assert proc.returncode == 1
    # sysrq-c panics on purpose with this reason (6.1: sysrq_handle_crash)
    assert "guest kernel panicked: sysrq triggered crash" in _one_line(proc.stderr)
    assert "Kernel panic - not syncing" in proc.stderr  # the console tail is shown
    assert not out.exists()
    assert (tmp_path / "panic.trace.partial").stat().st_size > 0
    assert w.workdirs, "the watcher saw the QEMU it started"  # else it checks nothing
    assert w.alive() == []
    assert w.left() == []


@pytest.mark.e2e
def test_guest_hang_times_out(tmp_path: Path) -> None:
    out = tmp_path / "hang.trace"
    # The timeout counts from QEMU's start: the guest need not have reached
    # its endless loop for the timeout to be what ends it (a short one keeps
    # the test from waiting out a long one).
    w = run_watched("capture", "--scenario", "hang", "--out", str(out), "--timeout", "3")
    proc = w.proc
    assert proc.returncode == 1
    assert "guest hang" in _one_line(proc.stderr)
    assert (tmp_path / "hang.trace.partial").exists()
    assert w.workdirs, "the watcher saw the QEMU it started"  # else it checks nothing
    assert w.alive() == []
    assert w.left() == []
