"""Run a scenario's guest under the real Xen, in shadow paging mode, and bring
back Xen's own trace of it (xentrace).

QEMU (TCG) boots Xen (``build/xen/xen``, ``make xen``) with a dom0 (the
guest kernel ``build/guest/vmlinuz`` again, with ``build/xen/dom0.cpio.gz``,
whose init is ``guest/xen-dom0-init``). Two raw disks connect the run to
dom0:

* ``/dev/vda``, a tar this module writes: ``params`` (shell variables),
  ``guest.cfg`` (the xl config: PVH, ``hap=0``, pinned vCPUs), the guest's
  kernel and the scenario's initramfs;
* ``/dev/vdb``, where dom0 writes a tar of ``xentrace.raw``, ``console.log``
  (the guest's console as xenconsoled logged it), ``xl.log`` and ``status``.

dom0 runs ``xentrace`` from before ``xl create`` until the guest is gone,
then powers off. The serial console (Xen's, with dom0's console on it) is
streamed to ``NAME.xen.host.log``; dom0 prints ``stxen: ...`` lines for its
stages and ``stguest| LINE`` for each guest console line while it runs.

Whatever happens, QEMU is killed by the PID we started (its whole session)
and the private folder removed before :func:`run_xen` returns or raises.

Longer than 500 lines because one run is one state machine (``_XenRun``,
about 350 lines: QEMU, the serial console's dom0 stages and the results disk
share its state); the helpers around it are small.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import re
import shutil
import signal
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from .errors import GuestError, SetupError
from .machine import connect_qmp, read_all
from .paths import BuildPaths, available_scenarios, scenario_append

QEMU = "qemu-system-x86_64"
#: Xen's command line. dom0 gets one vCPU pinned to pCPU 0, so every guest
#: vCPU has a pCPU (and a trace buffer) of its own; noreboot keeps a Xen
#: panic on the console instead of a reset that would hide it; bootscrub=0:
#: QEMU's RAM starts zeroed, and scrubbing 3 GiB under TCG costs seconds of
#: the guest's pCPU while dom0 boots.
XEN_CMDLINE = (
    "console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1 "
    "dom0_vcpus_pin loglvl=all guest_loglvl=all noreboot bootscrub=0"
)
DOM0_CMDLINE = "console=hvc0 earlyprintk=xen panic=-1"
#: The guest's command line before the scenario's own words; the same
#: choices as a deterministic bare-QEMU capture (no KASLR, no CPU entropy).
GUEST_CMDLINE = "console=hvc0 panic=-1 nokaslr random.trust_cpu=off"
#: xentrace event mask: the shadow class (TRC_SHADOW, 0x0040f000) plus the
#: HVM class (TRC_HVM, 0x0008f000: VM exits with rIP, CPUID = the stmark
#: markers, CR writes, injected page faults).
TRACE_MASK = 0x0048F000
#: Trace buffer pages per CPU (16 MiB): the seed guest's whole life is
#: ~12 MiB of records, and a full buffer loses records.
TRACE_PAGES = 4096
#: Guest vCPUs a run can have: each gets a pCPU of its own (QEMU runs with
#: 1 + vcpus CPUs, dom0 on pCPU 0), so the guest's vCPUs never share a pCPU's
#: trace buffer and each record's pCPU names its vCPU.
MAX_XEN_VCPUS = 8
#: QEMU's RAM: dom0's 1 GiB, the guest, Xen's own and its shadow pool.
HOST_RAM_MIB = 4096
#: The results disk (sparse): room for a large trace.
RESULTS_DISK_MIB = 4096
#: Time kept for Xen + dom0 boot and writing results out of ``timeout``
#: (about 25 s on an idle 2-core machine); dom0 ends a guest that runs longer.
BOOT_ALLOWANCE = 90.0
#: How long QEMU may run on after dom0 wrote its results (power-off).
POWEROFF_GRACE = 30.0

_GUEST = "stguest| "
_STXEN = "stxen: "
_PANIC = "Kernel panic - not syncing"
_XEN_PANIC = re.compile(r"Panic on CPU \d+")
_MARKER = re.compile(r"^stmark: (\S+)")
_DONE = re.compile(r"^shadowtrace: scenario \S+ done")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

Progress = Callable[[str], None]

#: The last run's QEMU PID and private folder (tests check both are gone).
last_qemu_pid: int | None = None
last_workdir: Path | None = None


@dataclass
class XenResult:
    console_log: Path  # the guest's console, OUT/NAME.xen.console.log
    xentrace: Path  # the raw xentrace file, OUT/NAME.xen.trace.raw (unchanged bytes)
    host_log: Path  # Xen + dom0 serial output, OUT/NAME.xen.host.log
    duration: float  # wall seconds of the QEMU run
    pcpus: list[int]  # the physical CPUs the guest's vCPUs were pinned to, in vCPU order


def xen_image(paths: BuildPaths) -> Path:
    """The gunzipped hypervisor ``make xen`` unpacks."""
    return paths.root / "xen" / "xen"


def dom0_initrd(paths: BuildPaths) -> Path:
    return paths.root / "xen" / "dom0.cpio.gz"


def guest_pcpus(vcpus: int) -> list[int]:
    """Guest vCPU i runs on pCPU 1+i: pCPU 0 is dom0's."""
    return [1 + i for i in range(vcpus)]


def run_xen(
    scenario: str,
    out_dir: Path,
    *,
    timeout: float = 300.0,
    vcpus: int = 1,
    ram_mib: int = 512,
    progress: Progress | None = None,
    paths: BuildPaths | None = None,
    append: str | None = None,
) -> XenResult:
    """Run ``scenario``'s guest under Xen with shadow paging; raise SetupError
    (something to build or a bad option) or GuestError (the run failed).
    ``append``: the guest's extra kernel words of a researcher's own scenario
    (:mod:`qmp_tools.custom`, built into ``build/``); None: a repository
    scenario, with its ``append`` file."""
    paths = paths or BuildPaths.default()
    _check_setup(scenario, paths, known=append is None)
    if not 1 <= vcpus <= MAX_XEN_VCPUS:
        raise SetupError(f"vcpus must be 1..{MAX_XEN_VCPUS}, not {vcpus}")
    if ram_mib < 64 or ram_mib > HOST_RAM_MIB - 1536:
        raise SetupError(f"ram_mib must be 64..{HOST_RAM_MIB - 1536}, not {ram_mib}")
    out_dir.mkdir(parents=True, exist_ok=True)
    run = _XenRun(
        _RunConfig(
            scenario=scenario,
            out_dir=out_dir,
            timeout=timeout,
            vcpus=vcpus,
            ram_mib=ram_mib,
            paths=paths,
            append=scenario_append(scenario) if append is None else append,
        ),
        progress or (lambda _msg: None),
    )
    try:
        return asyncio.run(run.run())
    except KeyboardInterrupt:
        raise GuestError("interrupted", run.host_tail()) from None


def _check_setup(scenario: str, paths: BuildPaths, *, known: bool = True) -> None:
    """One SetupError line for an unknown scenario (``known``: it must be one
    of the repository's) or the first missing part."""
    scenarios = available_scenarios()
    if known and scenario not in scenarios:
        raise SetupError(
            f"unknown scenario {scenario!r}; known: {', '.join(scenarios) or 'none'}"
        )
    for what, path, target in (
        ("Xen hypervisor", xen_image(paths), "xen"),
        ("Xen dom0 initramfs", dom0_initrd(paths), "xen"),
        ("guest kernel", paths.kernel, "setup"),
        (f"initramfs of scenario {scenario!r}", paths.initrd(scenario), "setup"),
    ):
        if not path.is_file():
            raise SetupError(f"missing set-up: {what} ({path}) not built; run 'make {target}'")
        # QEMU splits -initrd at commas and a module's path ends at a space.
        if "," in str(path) or " " in str(path):
            raise SetupError(f"path of the {what} has a comma or space: {path}")


@dataclass
class _RunConfig:
    scenario: str
    out_dir: Path
    timeout: float
    vcpus: int
    ram_mib: int
    paths: BuildPaths
    #: The guest's kernel words after GUEST_CMDLINE.
    append: str = ""

    @property
    def guest_timeout(self) -> int:
        """What dom0 gives the guest before it ends it (whole seconds)."""
        return int(max(self.timeout - BOOT_ALLOWANCE, self.timeout / 2))

    def out(self, suffix: str) -> Path:
        return self.out_dir / f"{self.scenario}.xen.{suffix}"


@dataclass
class _Watch:
    """What the serial console said so far."""

    stage: str = "starting QEMU"
    xen_started: bool = False
    dom0_error: str = ""
    dom0_panic: str = ""
    dom0_crashed: bool = False
    xen_panic: str | None = None  # "" once "Panic on CPU" seen, then its reason
    results_written: bool = False
    #: Xen halted the machine at dom0's power-off instead of turning it off.
    halted: bool = False
    guest_lines: list[str] = field(default_factory=list)


class _XenRun:
    def __init__(self, config: _RunConfig, progress: Progress) -> None:
        self.c = config
        self.progress = progress
        self.watch = _Watch()
        self._host_tail: deque[str] = deque(maxlen=25)
        self._panic_line = ""

    def host_tail(self) -> str:
        lines = list(self._host_tail)
        if self._panic_line and self._panic_line not in lines:
            lines = [self._panic_line, "..."] + lines
        return "\n".join(lines)

    # -- the disks and the command line ------------------------------------
    def _xl_config(self) -> str:
        c = self.c
        cmdline = " ".join(filter(None, [GUEST_CMDLINE, c.append]))
        if '"' in cmdline or "\\" in cmdline:
            raise SetupError(f"scenario {c.scenario!r}: append has a quote or backslash")
        cpus = ", ".join(f'"{p}"' for p in guest_pcpus(c.vcpus))
        return "\n".join(
            [
                f'name = "{c.scenario}"',
                'type = "pvh"',
                "hap = 0",  # shadow paging: the point of the whole run
                'kernel = "/in/vmlinuz"',
                'ramdisk = "/in/initrd.cpio.gz"',
                f'cmdline = "{cmdline}"',
                f"memory = {c.ram_mib}",
                f"maxmem = {c.ram_mib}",
                f"vcpus = {c.vcpus}",
                # One list entry per vCPU: vCPU i pinned to pCPU 1+i.
                f"cpus = [{cpus}]",
                # TCG's SVM has no NRIPS: under Xen's default TSC mode the
                # guest dies at its first RDTSCP ("Insn mismatch").
                'tsc_mode = "native"',
                # Keep the domain (and its console ring) after it stops, so
                # dom0 logs all of its console before destroying it.
                'on_poweroff = "preserve"',
                'on_reboot = "preserve"',
                'on_crash = "preserve"',
                "",
            ]
        )

    def _params(self) -> str:
        c = self.c
        return (
            f"NAME={c.scenario}\n"
            f"GUEST_TIMEOUT={c.guest_timeout}\n"
            f"TRACE_MASK=0x{TRACE_MASK:08x}\n"
            f"TRACE_PAGES={TRACE_PAGES}\n"
        )

    def _clear_old_results(self) -> None:
        """A failed run must not leave an earlier run's trace looking like its own."""
        for suffix in ("trace.raw", "dom0.log"):
            self.c.out(suffix).unlink(missing_ok=True)

    def _write_input(self, image: Path) -> None:
        c = self.c
        with tarfile.open(image, "w", format=tarfile.USTAR_FORMAT) as tar:
            for name, text in (("params", self._params()), ("guest.cfg", self._xl_config())):
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size = len(data)
                info.mode = 0o644
                tar.addfile(info, io.BytesIO(data))
            tar.add(c.paths.kernel.resolve(), arcname="vmlinuz")
            tar.add(c.paths.initrd(c.scenario).resolve(), arcname="initrd.cpio.gz")

    def argv(self, workdir: Path) -> list[str]:
        c = self.c
        dom0 = f"{c.paths.kernel} {DOM0_CMDLINE},{dom0_initrd(c.paths)}"
        return [
            QEMU,
            "-accel", "tcg,thread=multi",
            "-machine", "pc",
            "-cpu", "max,la57=off",
            "-smp", str(1 + c.vcpus),
            "-m", str(HOST_RAM_MIB),
            "-display", "none",
            "-nodefaults",
            "-serial", "stdio",
            "-no-reboot",
            "-kernel", str(xen_image(c.paths)),
            "-append", XEN_CMDLINE,
            "-initrd", dom0,
            "-drive", f"file={workdir / 'in.img'},format=raw,if=virtio,readonly=on",
            "-drive", f"file={workdir / 'out.img'},format=raw,if=virtio",
            "-chardev", f"socket,id=qmp,path={workdir / 'qmp.sock'},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]  # fmt: skip

    # -- running -------------------------------------------------------------
    async def run(self) -> XenResult:
        global last_qemu_pid, last_workdir
        workdir = Path(tempfile.mkdtemp(prefix="shadowtrace-xen-", dir=_tmp_root()))
        last_workdir, last_qemu_pid = workdir, None
        proc: asyncio.subprocess.Process | None = None
        qmp: QMPClient | None = None
        try:
            os.chmod(workdir, 0o700)
            self._clear_old_results()
            self._write_input(workdir / "in.img")
            with open(workdir / "out.img", "wb") as out:
                out.truncate(RESULTS_DISK_MIB << 20)
            start = time.monotonic()
            proc = await self._start(self.argv(workdir))
            last_qemu_pid = proc.pid
            qmp = await connect_qmp(proc, workdir / "qmp.sock", "shadowtrace-xen")
            stderr_task = asyncio.create_task(read_all(proc.stderr))
            with open(self.c.out("host.log"), "w") as host, open(
                self.c.out("console.log"), "w"
            ) as guest:
                timed_out = not await self._watch_until_end(proc, qmp, host, guest)
            duration = time.monotonic() - start
            if proc.returncode is None:
                _kill(proc)
            rc = await proc.wait()
            stderr = (await stderr_task).decode(errors="replace").strip()
            self._judge_host()  # a panic explains a timeout too
            if timed_out:
                raise GuestError(
                    f"hang: no end after {self.c.timeout:.0f} s ({self.watch.stage})",
                    self.host_tail(),
                )
            return self._judge(workdir / "out.img", rc, stderr, duration)
        finally:
            if qmp is not None:
                with contextlib.suppress(Exception):
                    await qmp.disconnect()
            if proc is not None and proc.returncode is None:
                _kill(proc)
                await proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)

    async def _start(self, argv: list[str]) -> asyncio.subprocess.Process:
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                limit=1 << 20,  # a long console line must not end the run
            )
        except OSError as err:
            raise SetupError(
                f"missing set-up: cannot start {QEMU} ({err.strerror}); run 'make setup'"
            ) from err

    async def _watch_until_end(
        self,
        proc: asyncio.subprocess.Process,
        qmp: QMPClient | None,
        host: TextIO,
        guest: TextIO,
    ) -> bool:
        """Follow the serial console until QEMU ends or must be ended; False on timeout."""
        try:
            await asyncio.wait_for(self._follow(proc, host, guest), timeout=self.c.timeout)
        except TimeoutError:
            return False
        if proc.returncode is None and self.watch.results_written:
            await self._power_off(proc, qmp)
        return True

    async def _power_off(self, proc: asyncio.subprocess.Process, qmp: QMPClient | None) -> None:
        """dom0 is done: let QEMU end by itself, else ask it to quit."""
        if not self.watch.halted:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), timeout=POWEROFF_GRACE)
                return
        if qmp is not None:
            with contextlib.suppress(QMPError, OSError, TimeoutError):
                await asyncio.wait_for(qmp.execute("quit"), timeout=5)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), timeout=5)

    async def _follow(
        self, proc: asyncio.subprocess.Process, host: TextIO, guest: TextIO
    ) -> None:
        """Read serial lines until EOF, a Xen panic, dom0's crash or its halt."""
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            host.write(line + "\n")
            host.flush()
            self._host_tail.append(line)
            if self._on_line(line, guest):
                return

    def _on_line(self, line: str, guest: TextIO) -> bool:
        """Note what a serial line says; True when the run is over."""
        w = self.watch
        if _GUEST in line:
            self._on_guest_line(line.split(_GUEST, 1)[1], guest)
            return False
        if _STXEN in line:
            self._on_dom0_line(line.split(_STXEN, 1)[1])
            return False
        if w.xen_panic is not None:
            # The panic's reason is the line after "Panic on CPU N:".
            text = line.split("(XEN) ", 1)[-1].strip()
            if not w.xen_panic and text and not text.startswith("*"):
                w.xen_panic = text
            return bool(w.xen_panic) and ("****" in line or "reset" in line.lower())
        if _XEN_PANIC.search(line):
            w.xen_panic = ""
            self._panic_line = line
            self.progress("Xen panicked")
            return False
        if not w.xen_started and "Xen version" in line:
            w.xen_started = True
            self._stage("Xen started")
        elif "Freed" in line and "init memory" in line and line.startswith("(XEN)"):
            # Xen's last boot line before dom0 runs.
            self._stage("Xen booted")
        elif _PANIC in line:
            w.dom0_panic = line.split(_PANIC, 1)[1].lstrip(": ") or "no reason given"
            self._panic_line = line
        elif "Hardware Dom0 crashed" in line or "Hardware Dom0 shutdown" in line:
            w.dom0_crashed = True
            return True
        elif "Hardware Dom0 halted" in line:
            # dom0 powered off but Xen halts instead of turning the machine
            # off, so QEMU would run on: end it (the results are on disk).
            w.halted = True
            return True
        return False

    def _on_guest_line(self, text: str, guest: TextIO) -> None:
        text = text.rstrip("\r")
        self.watch.guest_lines.append(text)
        # The live copy; replaced by xenconsoled's log once the results are in.
        guest.write(text + "\n")
        guest.flush()
        if match := _MARKER.match(text):
            self.progress(f"guest marker {match.group(1)}")

    def _on_dom0_line(self, text: str) -> None:
        w = self.watch
        if text.startswith("error "):
            w.dom0_error = text[len("error ") :]
            self.progress(f"dom0 error: {w.dom0_error}")
        elif text == "results written":
            w.results_written = True
            self._stage("results written")
        else:
            self._stage(text)

    def _stage(self, stage: str) -> None:
        self.watch.stage = stage
        self.progress(stage)

    # -- the outcome -----------------------------------------------------------
    def _judge(self, out_image: Path, rc: int, stderr: str, duration: float) -> XenResult:
        """Results of a finished QEMU run, or the one-line reason it failed."""
        w = self.watch
        results = _read_results(out_image)
        if results is not None:
            self._save_logs(results)
        if w.dom0_error:
            raise GuestError(f"dom0 failed: {w.dom0_error}", self.host_tail())
        if w.dom0_crashed:
            raise GuestError("dom0 crashed", self.host_tail())
        if results is None:
            tail = "\n".join(filter(None, [self.host_tail(), stderr]))
            raise GuestError(self._no_results_reason(rc, stderr), tail)
        console = self._save_results(results)
        self._judge_guest(results.get("status", b"").decode(errors="replace"), console)
        self._check_pinning(results.get("vcpu-list.log", b"").decode(errors="replace"))
        self.progress("results read")
        return XenResult(
            console_log=self.c.out("console.log"),
            xentrace=self.c.out("trace.raw"),
            host_log=self.c.out("host.log"),
            duration=duration,
            pcpus=guest_pcpus(self.c.vcpus),
        )

    def _judge_host(self) -> None:
        """Raise if Xen or dom0's kernel panicked: nothing after that counts."""
        w = self.watch
        if w.xen_panic is not None:
            raise GuestError(f"Xen panicked: {w.xen_panic or 'no reason given'}", self.host_tail())
        if w.dom0_panic:
            raise GuestError(f"dom0 kernel panicked: {w.dom0_panic}", self.host_tail())

    def _no_results_reason(self, rc: int, stderr: str) -> str:
        if rc != 0:
            last = stderr.splitlines()[-1] if stderr else f"exit status {rc}"
            return f"QEMU failed: {last}"
        if not self.watch.xen_started:
            return f"QEMU ended before Xen started (is {xen_image(self.c.paths)} a Xen image?)"
        return f"QEMU ended before dom0 wrote its results (last stage: {self.watch.stage})"

    def _save_logs(self, results: dict[str, bytes]) -> None:
        """dom0's own logs (xl, xentrace, the daemons) in NAME.xen.dom0.log, and
        the guest console as far as it got: worth reading when a run fails."""
        with open(self.c.out("dom0.log"), "wb") as log:
            for name in sorted(n for n in results if n.endswith(".log") and n != "console.log"):
                log.write(f"== {name}\n".encode() + results[name])
            log.write(b"== status\n" + results.get("status", b""))
        if "console.log" in results:
            self.c.out("console.log").write_text(
                "".join(ln + "\n" for ln in _console_lines(results["console.log"]))
            )

    def _save_results(self, results: dict[str, bytes]) -> list[str]:
        """Write the trace file; the guest console's lines."""
        trace = results.get("xentrace.raw")
        if not trace:
            raise GuestError("dom0 brought back no xentrace data", self.host_tail())
        self.c.out("trace.raw").write_bytes(trace)
        if "console.log" not in results:
            raise GuestError("dom0 brought back no guest console log", self.host_tail())
        return _console_lines(results["console.log"])

    def _check_pinning(self, vcpu_list: str) -> None:
        """The pCPUs we report must be the ones Xen ran the vCPUs on."""
        want = {i: str(p) for i, p in enumerate(guest_pcpus(self.c.vcpus))}
        got = _hard_affinity(vcpu_list, self.c.scenario)
        if got != want:
            raise GuestError(
                f"guest vCPUs not pinned as asked: {got or 'no xl vcpu-list'}, wanted {want}",
                vcpu_list,
            )

    def _judge_guest(self, status: str, console: list[str]) -> None:
        fields = dict(ln.split("=", 1) for ln in status.splitlines() if "=" in ln)
        end = fields.get("guest", "")
        tail = "\n".join(console[-25:])
        panic = next((ln for ln in console if _PANIC in ln), "")
        if panic:
            reason = panic.split(_PANIC, 1)[1].lstrip(": ") or "no reason given"
            raise GuestError(f"guest kernel panicked: {reason}", _with_line(panic, tail))
        if end == "timeout":
            raise GuestError(
                f"guest hang: no end after {self.c.guest_timeout} s under Xen", tail
            )
        if end != "poweroff":
            raise GuestError(
                f"guest ended by {end or 'an unknown event'} before its scenario finished",
                tail,
            )
        if not any(_DONE.match(ln) for ln in console):
            raise GuestError("guest stopped before its scenario finished", tail)


def _hard_affinity(vcpu_list: str, name: str) -> dict[int, str]:
    """vCPU -> hard affinity from ``xl vcpu-list NAME`` ("seed 1 0 1 -b- 0.3 1 / all")."""
    affinity: dict[int, str] = {}
    for line in vcpu_list.splitlines():
        words = line.split()
        if len(words) >= 9 and words[0] == name and words[2].isdigit() and words[7] == "/":
            affinity[int(words[2])] = words[6]
    return affinity


def _console_lines(data: bytes) -> list[str]:
    """xenconsoled logs the bytes the guest wrote: its lines end in "\\r\\n"."""
    lines = [ln.rstrip("\r") for ln in data.decode(errors="replace").split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _with_line(line: str, tail: str) -> str:
    return tail if line in tail.splitlines() else f"{line}\n...\n{tail}"


def _read_results(image: Path) -> dict[str, bytes] | None:
    """The files of dom0's results tar, by name; None if dom0 wrote none."""
    try:
        with tarfile.open(image, "r:") as tar:
            files: dict[str, bytes] = {}
            for member in tar:
                if not member.isfile():
                    continue
                data = tar.extractfile(member)
                if data is not None:
                    files[member.name.removeprefix("./")] = data.read()
            # A disk dom0 never wrote reads as an empty archive (zero blocks).
            return files or None
    except (tarfile.TarError, OSError):
        return None


def _kill(proc: asyncio.subprocess.Process) -> None:
    """Kill QEMU's whole session (it started one: start_new_session)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _tmp_root() -> str | None:
    """/dev/shm when there (the disks are sparse files on tmpfs), else the default."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
