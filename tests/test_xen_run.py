"""The real Xen runner (qmp_tools.xen): real QEMU, real Xen 4.17 with shadow
paging, the real seed guest; and its failures: one clear line, QEMU gone."""

from __future__ import annotations

import os
import struct
import time
from collections import Counter
from pathlib import Path

import pytest

from qmp_tools import xen
from qmp_tools.errors import CaptureError, GuestError, SetupError
from qmp_tools.paths import BuildPaths
from qmp_tools.xen import XenResult, run_xen

pytestmark = pytest.mark.e2e

#: xen/include/public/trace.h: TRC_GEN + 3, the record xentrace writes before
#: each run of one CPU's records (data: the CPU, the run's size in bytes).
TRC_TRACE_CPU_CHANGE = 0x0001F003
TRACE_EXTRA_SHIFT = 28  # bits 28-30 of a header: how many data words follow
TRC_SHADOW = 0x0040F000  # the shadow class (multi.c's sh_trace_* records)
CLASS_MASK = 0x0FFFF000  # class + subclass bits of an event number


def _gone(pid: int | None) -> bool:
    """True if no process has this PID (QEMU was killed and reaped)."""
    assert pid is not None, "run_xen started no QEMU"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _assert_cleaned_up() -> None:
    assert _gone(xen.last_qemu_pid), f"QEMU {xen.last_qemu_pid} still runs"
    assert xen.last_workdir is not None and not xen.last_workdir.exists()


def _one_line(err: CaptureError) -> str:
    text = str(err)
    assert text and "\n" not in text, repr(text)
    return text


def _fake_build(
    tmp: Path, *, xen_image: bytes | None = None, kernel: bytes | None = None
) -> BuildPaths:
    """A build folder of symlinks to the real one, with one part replaced."""
    real = BuildPaths.default()
    (tmp / "guest").mkdir(parents=True)
    for f in real.guest.iterdir():
        (tmp / "guest" / f.name).symlink_to(f)
    (tmp / "xen").mkdir()
    (tmp / "xen" / "dom0.cpio.gz").symlink_to(xen.dom0_initrd(real))
    (tmp / "xen" / "xen").symlink_to(xen.xen_image(real))
    for path, data in ((tmp / "xen" / "xen", xen_image), (tmp / "guest" / "vmlinuz", kernel)):
        if data is not None:
            path.unlink()
            path.write_bytes(data)
    return BuildPaths(tmp)


def cpu_runs(raw: bytes) -> list[tuple[int, list[int]]]:
    """xentrace's file: runs of (CPU, event numbers of its records)."""
    runs: list[tuple[int, list[int]]] = []
    pos = 0
    while pos < len(raw):
        hdr, cpu, size = struct.unpack_from("<3I", raw, pos)
        assert hdr == TRC_TRACE_CPU_CHANGE | (2 << TRACE_EXTRA_SHIFT), hex(hdr)
        pos += 12
        end = pos + size
        events = []
        while pos < end:
            (rec,) = struct.unpack_from("<I", raw, pos)
            events.append(rec & 0x0FFFFFFF)
            # one header word, the TSC (2 words) if bit 31, then the data words
            pos += 4 * (1 + (2 if rec >> 31 else 0) + ((rec >> TRACE_EXTRA_SHIFT) & 7))
        assert pos == end, "a record runs past its CPU's window"
        runs.append((cpu, events))
    return runs


# -- failures -------------------------------------------------------------------
def test_unknown_scenario_is_a_setup_error(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(SetupError) as err:
        run_xen("nope", tmp_path)
    assert "unknown scenario 'nope'" in _one_line(err.value)
    assert time.monotonic() - start < 5  # no QEMU started: only a folder scan


def test_missing_xen_names_make_xen(tmp_path: Path) -> None:
    with pytest.raises(SetupError) as err:
        run_xen("seed", tmp_path / "out", paths=BuildPaths(tmp_path / "empty"))
    line = _one_line(err.value)
    assert line.startswith("missing set-up: Xen hypervisor") and "run 'make xen'" in line


def test_broken_xen_image_fails_cleanly(tmp_path: Path) -> None:
    # The first 64 KiB of the real image: an ELF header whose segments are cut off.
    image = xen.xen_image(BuildPaths.default()).read_bytes()[: 64 << 10]
    paths = _fake_build(tmp_path / "build", xen_image=image)
    with pytest.raises((GuestError, SetupError)) as err:
        run_xen("seed", tmp_path / "out", paths=paths, timeout=120)
    assert _one_line(err.value)
    _assert_cleaned_up()


def test_xen_panic_is_a_guest_error(tmp_path: Path) -> None:
    # Not a kernel: Xen cannot build dom0 from it and panics before dom0 runs.
    paths = _fake_build(tmp_path / "build", kernel=bytes(range(256)) * 12288)
    with pytest.raises(GuestError) as err:
        run_xen("seed", tmp_path / "out", paths=paths, timeout=120)
    assert _one_line(err.value).startswith("Xen panicked: ")
    assert "Panic on CPU" in err.value.console_tail
    _assert_cleaned_up()


def test_timeout_kills_qemu(tmp_path: Path) -> None:
    # 5 s: Xen + dom0 alone take over 15 s, so the run is always cut short
    # (and the host serial has Xen's first lines by then).
    start = time.monotonic()
    with pytest.raises(GuestError) as err:
        run_xen("seed", tmp_path, timeout=5)
    assert _one_line(err.value).startswith("hang: no end after 5 s")
    assert time.monotonic() - start < 60  # killed at once, not after the guest ended
    assert err.value.console_tail  # the host serial's last lines
    _assert_cleaned_up()


def test_guest_panic_is_a_guest_error(tmp_path: Path) -> None:
    with pytest.raises(GuestError) as err:
        run_xen("panic", tmp_path)
    # scenarios/panic: "echo c > /proc/sysrq-trigger"
    assert _one_line(err.value) == "guest kernel panicked: sysrq triggered crash"
    assert "Kernel panic - not syncing" in err.value.console_tail
    _assert_cleaned_up()


# -- the seed run ---------------------------------------------------------------
def test_seed_console_has_the_markers_and_the_address(xen_seed_run: XenResult) -> None:
    lines = xen_seed_run.console_log.read_text().splitlines()
    # guest/init and scenarios/seed/steps.sh: the window around insmod, then
    # one marker per module section (the seed module has only init code)
    assert "stmark: start" in lines and "stmark: stop" in lines
    assert lines.index("stmark: start") < lines.index("stmark: stop")
    assert any(ln.startswith("stmark: kernel _text ") for ln in lines)
    assert any(ln.startswith("stmark: module test .init.text ") for ln in lines)
    # scenarios/seed/test.c prints the page it allocated
    assert any("The address allocated is ffff" in ln for ln in lines)
    assert not any("\r" in ln for ln in lines)  # xenconsoled's CRs are gone


def test_seed_trace_is_xentrace_output(xen_seed_run: XenResult) -> None:
    raw = xen_seed_run.xentrace.read_bytes()
    assert raw, "empty xentrace file"
    hdr, cpu, _size = struct.unpack_from("<3I", raw, 0)
    # xentrace starts with a CPU change record: event TRC_GEN+3, 2 data words
    assert hdr == 0x0001F003 | (2 << 28)
    assert cpu < 2  # -smp 2 for a 1-vCPU guest: pCPUs 0 and 1
    runs = cpu_runs(raw)
    shadow = Counter(cpu for cpu, events in runs for e in events if e & CLASS_MASK == TRC_SHADOW)
    # Shadow paging ran, on the guest's pinned pCPU (1) only: dom0 (PV, on
    # pCPU 0) has no shadows.
    assert xen_seed_run.pcpus == [1]
    assert shadow[1] > 1000 and shadow[0] == 0, shadow


def test_seed_run_files_and_time(xen_seed_run: XenResult) -> None:
    host = xen_seed_run.host_log.read_text()
    assert "(XEN) Xen version 4.17" in host
    assert "stxen: guest finished: poweroff" in host
    assert xen_seed_run.console_log.name == "seed.xen.console.log"
    assert xen_seed_run.xentrace.name == "seed.xen.trace.raw"
    assert 10 < xen_seed_run.duration < 300  # the default timeout bounds it

