"""Run the test guest under QEMU TCG, driven over QMP.

QEMU is started without a shell, with its QMP socket and the guest's RAM file
in a private (0700) folder under /dev/shm. The serial console is streamed to
a log file line by line; the lines the guest prints tell us where it is:

* ``stmark: stop`` (printed by the guest's stmark program just after the
  stop marker): pause the VM over QMP, save ground truth (CR3 of each vCPU,
  ``info tlb`` of each vCPU), resume;
* ``Kernel panic - not syncing``: the guest panicked;
* ``shadowtrace: scenario NAME done``: the scenario ran to the end.

Whatever happens (panic, timeout, QEMU dying, Ctrl-C), QEMU is killed and the
private folder removed before :meth:`GuestRun.run` returns or raises.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from .errors import GuestError, SetupError

QEMU = "qemu-system-x86_64"
#: Kernel command line of every run; panic=-1 with -no-reboot makes a
#: panicking guest end QEMU at once instead of hanging.
BASE_APPEND = "console=ttyS0 panic=-1 quiet"
#: What --deterministic adds: instruction counting as the clock, a fixed
#: RTC, no host randomness, fixed kernel addresses.
DETERMINISTIC_ARGS = [
    "-icount", "shift=0,sleep=off,align=off",
    "-rtc", "base=2020-01-01T00:00:00,clock=vm",
]
DETERMINISTIC_CPU = ",rdrand=off,rdseed=off"
DETERMINISTIC_APPEND = " nokaslr random.trust_cpu=off"

_PANIC = "Kernel panic - not syncing"
_MARKER_LINE = re.compile(r"^stmark: (\S+)")
_DONE_LINE = re.compile(r"^shadowtrace: scenario \S+ done")
_CR3 = re.compile(r"CR3=([0-9a-fA-F]+)")


@dataclass
class MachineConfig:
    """One guest run."""

    kernel: Path
    initrd: Path
    ram_mib: int = 512
    smp: int = 1
    deterministic: bool = False
    plugin: Path | None = None
    #: Plugin options without ``ram``/``ramsize``, which the run adds.
    plugin_options: dict[str, str] = field(default_factory=dict)
    timeout: float = 600.0
    console_log: Path | None = None
    #: Take ground truth when the guest prints ``stmark: stop``.
    ground_truth: bool = True
    #: A file that receives the guest's second serial port (/dev/ttyS1).
    second_serial: Path | None = None
    #: Extra kernel command-line words.
    append: str = ""

    @property
    def tcg_thread(self) -> str:
        """QEMU's TCG threading: one host thread per vCPU (``multi``) when
        there are several vCPUs and the run need not be repeatable; a
        deterministic run (icount) needs the one round-robin thread. On a
        2-vCPU whole boot of seed MTTCG took 37-40 s against 47-48 s."""
        return "multi" if self.smp > 1 and not self.deterministic else "single"


@dataclass
class RunResult:
    duration: float
    markers: list[str]
    truth: dict[str, Any] | None
    console_tail: str


Progress = Callable[[str], None]


def qemu_version() -> str:
    """The installed QEMU's version ("10.0.2"), or raise SetupError."""
    try:
        out = subprocess.run(
            [QEMU, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError) as err:
        raise SetupError(f"missing set-up: {QEMU} does not run ({err}); run 'make setup'") from err
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else out.strip()


class GuestRun:
    """Start QEMU, watch the console, handle the guest's fate, clean up."""

    def __init__(self, config: MachineConfig, progress: Progress | None = None) -> None:
        self.config = config
        self.progress = progress or (lambda _msg: None)
        self._tail: deque[str] = deque(maxlen=25)
        self._markers: list[str] = []
        self._truth: dict[str, Any] | None = None
        #: The reason a panic line gave ("" while the guest has not panicked).
        self._panicked = ""
        self._panic_line = ""
        self._done = False

    # -- the command line ------------------------------------------------
    def argv(self, workdir: Path) -> list[str]:
        c = self.config
        ram = f"{c.ram_mib}M"
        cpu = "max,la57=off" + (DETERMINISTIC_CPU if c.deterministic else "")
        append = BASE_APPEND + (DETERMINISTIC_APPEND if c.deterministic else "")
        if c.append:
            append += " " + c.append
        argv = [
            QEMU,
            "-accel", f"tcg,thread={c.tcg_thread}",
            "-cpu", cpu,
            "-smp", str(c.smp),
            "-m", ram,
            "-object",
            f"memory-backend-file,id=ram0,size={ram},mem-path={workdir / 'ram'},share=on",
            "-machine", "pc,memory-backend=ram0",
            "-kernel", str(c.kernel),
            "-initrd", str(c.initrd),
            "-append", append,
            "-display", "none",
            "-nodefaults",
            "-serial", "stdio",
            "-no-reboot",
            "-chardev", f"socket,id=qmp,path={workdir / 'qmp.sock'},server=on,wait=off",
            "-mon", "chardev=qmp,mode=control",
        ]
        if c.second_serial is not None:
            argv += ["-serial", f"file:{c.second_serial}"]
        if c.deterministic:
            argv += DETERMINISTIC_ARGS
        if c.plugin is not None:
            opts = dict(c.plugin_options)
            opts["ram"] = str(workdir / "ram")
            opts["ramsize"] = str(c.ram_mib << 20)
            for key, value in opts.items():
                if "," in value:
                    raise SetupError(f"plugin option {key}={value!r} contains a comma")
            argv += ["-plugin", ",".join([str(c.plugin)] + [f"{k}={v}" for k, v in opts.items()])]
        return argv

    # -- running -----------------------------------------------------------
    def run(self) -> RunResult:
        """Run the guest to its end; raise GuestError on panic, hang or QEMU death."""
        try:
            return asyncio.run(self._run())
        except KeyboardInterrupt:
            raise GuestError("interrupted", self.console_tail()) from None

    def console_tail(self) -> str:
        """The console's last lines, with the panic line first if it scrolled out."""
        lines = list(self._tail)
        if self._panic_line and self._panic_line not in lines:
            lines = [self._panic_line, "..."] + lines
        return "\n".join(lines)

    async def _run(self) -> RunResult:
        workdir = Path(tempfile.mkdtemp(prefix="shadowtrace-", dir=_tmp_root()))
        proc: asyncio.subprocess.Process | None = None
        log = open(self.config.console_log, "w") if self.config.console_log else None  # noqa: SIM115
        start = time.monotonic()
        try:
            os.chmod(workdir, 0o700)
            with open(workdir / "ram", "wb") as ram:
                ram.truncate(self.config.ram_mib << 20)
            argv = self.argv(workdir)
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    start_new_session=True,
                )
            except OSError as err:
                raise SetupError(
                    f"missing set-up: cannot start {QEMU} ({err.strerror}); run 'make setup'"
                ) from err
            qmp = await self._connect(proc, workdir / "qmp.sock")
            stderr_task = asyncio.create_task(read_all(proc.stderr))
            try:
                await asyncio.wait_for(
                    self._watch_console(proc, qmp, log), timeout=self.config.timeout
                )
            except TimeoutError:
                raise GuestError(
                    f"guest hang: no end after {self.config.timeout:.0f} s", self.console_tail()
                ) from None
            finally:
                if qmp is not None:
                    with contextlib.suppress(Exception):
                        await qmp.disconnect()
            rc = await proc.wait()
            stderr = (await stderr_task).decode(errors="replace").strip()
            if self._panicked:
                raise GuestError(
                    f"guest kernel panicked: {self._panicked}", self.console_tail()
                )
            if rc != 0:
                last = stderr.splitlines()[-1] if stderr else f"exit status {rc}"
                raise GuestError(f"QEMU failed: {last}", self.console_tail())
            if not self._done:
                raise GuestError(
                    "guest stopped before its scenario finished", self.console_tail()
                )
            return RunResult(
                duration=time.monotonic() - start,
                markers=self._markers,
                truth=self._truth,
                console_tail=self.console_tail(),
            )
        finally:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            if log is not None:
                log.close()
            shutil.rmtree(workdir, ignore_errors=True)

    async def _connect(
        self, proc: asyncio.subprocess.Process, sock: Path
    ) -> QMPClient | None:
        """Connect QMP once QEMU has made its socket; None if ground truth is off."""
        if not self.config.ground_truth:
            return None
        return await connect_qmp(proc, sock, "shadowtrace")

    async def _watch_console(
        self, proc: asyncio.subprocess.Process, qmp: QMPClient | None, log: Any
    ) -> None:
        assert proc.stdout is not None
        while True:
            raw = await proc.stdout.readline()
            if not raw:
                return
            line = raw.decode(errors="replace").rstrip("\r\n")
            if log is not None:
                log.write(line + "\n")
                log.flush()
            self._tail.append(line)
            if _PANIC in line:
                self._panicked = line.split(_PANIC, 1)[1].lstrip(": ") or "no reason given"
                self._panic_line = line
                self.progress("guest panicked")
            elif _DONE_LINE.match(line):
                self._done = True
                self.progress("scenario done")
            elif match := _MARKER_LINE.match(line):
                name = match.group(1)
                self._markers.append(name)
                self.progress(f"marker {name}")
                if name == "stop" and qmp is not None and self._truth is None:
                    self._truth = await self._ground_truth(qmp)

    async def _ground_truth(self, qmp: QMPClient) -> dict[str, Any]:
        """Pause, read each vCPU's CR3 and `info tlb`, resume."""
        await qmp.execute("stop")
        try:
            cpus = await qmp.execute("query-cpus-fast")
            truth: dict[str, Any] = {"cr3": [], "tlb": []}
            assert isinstance(cpus, list)
            for cpu in cpus:
                index = cpu["cpu-index"]
                regs = await qmp.execute(
                    "human-monitor-command",
                    {"command-line": "info registers", "cpu-index": index},
                )
                match = _CR3.search(str(regs))
                truth["cr3"].append(int(match.group(1), 16) if match else None)
                tlb = await qmp.execute(
                    "human-monitor-command",
                    {"command-line": "info tlb", "cpu-index": index},
                )
                truth["tlb"].append(str(tlb))
            return truth
        finally:
            await qmp.execute("cont")


async def connect_qmp(
    proc: asyncio.subprocess.Process, sock: Path, name: str
) -> QMPClient | None:
    """Connect QMP once QEMU has made its socket (None if QEMU ends first:
    its exit status and stderr tell why)."""
    for _ in range(500):
        if proc.returncode is not None:
            return None
        if sock.exists():
            qmp = QMPClient(name)
            try:
                await qmp.connect(str(sock))
            except (QMPError, OSError):
                await asyncio.sleep(0.02)
                continue
            return qmp
        await asyncio.sleep(0.02)
    return None


async def read_all(stream: asyncio.StreamReader | None) -> bytes:
    return await stream.read() if stream is not None else b""


def _tmp_root() -> str | None:
    """/dev/shm when there (the RAM file wants tmpfs), else the default."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
