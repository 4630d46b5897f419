"""A researcher's own scenario: kernel modules or a scenario folder from
outside the repository, built the way ``scripts/build-scenario.sh`` builds
the repository's scenarios, for ``shadowtrace capture --module`` and
``--scenario DIR``.

* ``--module PATH.c`` (repeatable): each file is one kernel module, built
  against the guest kernel's headers (``scenarios/common/stmark.h`` is
  beside it, for ``stmark("...")`` markers) at the script's fixed build
  path, so the same source gives the same ``.ko``. The generated steps
  load the modules, in order, between the ``start`` and ``stop`` markers,
  then write their ``module NAME SECTION ADDR`` markers (for symbols);
  ``--steps FILE`` runs FILE instead (the modules are at
  ``/scenario/NAME.ko``). ``--append WORDS``: more kernel command-line words.
* ``--scenario DIR``: a folder laid out like ``scenarios/NAME/``
  (``steps.sh``, optional ``Kbuild`` and module sources, ``user/*.c``,
  ``append``).

Either becomes the scenario ``user-NAME`` in ``build/`` (initramfs
``build/guest/user-NAME.cpio.gz``, modules in ``build/scenarios/user-NAME/src``,
where the replay looks for them); the name never clashes with a
repository scenario. Problems (a missing file, a module that does not
compile: the compiler's first error line) raise :class:`SetupError`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError
from .paths import TOP, BuildPaths, folder_vcpus

#: Scenario names of outside scenarios start with this.
PREFIX = "user-"
_MODULE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
#: Lines of a kbuild log that report the first problem (gcc's, modpost's, make's).
_ERROR = re.compile(r"(\berror\b|\bERROR\b|undefined!|No rule to make target)")


@dataclass(frozen=True)
class Custom:
    """A built outside scenario: its name in ``build/`` and its command-line words."""

    scenario: str
    append: str
    #: vCPUs it runs on (a folder's ``vcpus`` file; 1 for modules).
    vcpus: int = 1


def from_modules(modules: list[Path], steps: Path | None = None, append: str = "",
                 paths: BuildPaths | None = None) -> Custom:
    """Build the modules (and steps) into the scenario ``user-MOD[-MOD...]``."""
    paths = paths or BuildPaths.default()
    names: list[str] = []
    for m in modules:
        if m.suffix != ".c":
            raise SetupError(f"--module {m}: not a C file (NAME.c)")
        if not m.is_file():
            raise SetupError(f"--module {m}: no such file")
        if not _MODULE_NAME.fullmatch(m.stem):
            raise SetupError(f"--module {m}: {m.stem!r} is no module name (letters, digits, _)")
        if m.stem in names:
            raise SetupError(f"--module {m}: a second module named {m.stem!r}")
        names.append(m.stem)
    if not names:
        raise SetupError("--module: no module given")
    if steps is not None and not steps.is_file():
        raise SetupError(f"--steps {steps}: no such file")
    name = PREFIX + "-".join(names)
    stage = paths.root / "user" / name
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for m in modules:
        shutil.copyfile(m, stage / m.name)
    (stage / "Kbuild").write_text("obj-m := " + " ".join(f"{n}.o" for n in names) + "\n")
    if steps is not None:
        shutil.copyfile(steps, stage / "steps.sh")
    else:
        (stage / "steps.sh").write_text(module_steps(names))
    _build(name, stage, paths, {f"{n}.c": m for n, m in zip(names, modules, strict=True)})
    return Custom(name, " ".join(append.split()))


def module_steps(names: list[str]) -> str:
    """The steps a ``--module`` capture runs: load in the window, then name sections."""
    lines = ["# shadowtrace capture --module: load the modules between the markers",
             "stmark start"]
    lines += [f"insmod /scenario/{n}.ko" for n in names]
    lines.append("stmark stop")
    lines += [f"module_marker {n}" for n in names]
    return "\n".join(lines) + "\n"


def from_folder(folder: Path, append: str = "", paths: BuildPaths | None = None) -> Custom:
    """Build a scenario folder from outside the repository as ``user-BASENAME``."""
    paths = paths or BuildPaths.default()
    if not folder.is_dir():
        raise SetupError(f"--scenario {folder}: no such folder")
    if not (folder / "steps.sh").is_file():
        raise SetupError(f"--scenario {folder}: no steps.sh in it (see docs/scenarios.md)")
    base = folder.resolve().name
    if not _NAME.fullmatch(base):
        raise SetupError(f"--scenario {folder}: the folder's name {base!r} is no scenario name")
    name = PREFIX + base
    vcpus = folder_vcpus(folder)  # a bad file is an error before the build
    sources = {p.name: p for p in folder.glob("*.c")}
    _build(name, folder.resolve(), paths, sources)
    words = (folder / "append").read_text() if (folder / "append").is_file() else ""
    return Custom(name, " ".join((words + " " + append).split()), vcpus)


def _build(name: str, source: Path, paths: BuildPaths, sources: dict[str, Path]) -> None:
    """scripts/build-scenario.sh NAME KVER BUILD SOURCE; its failure as one line."""
    kver = paths.kernel_version()
    if not kver:
        raise SetupError("missing set-up: the guest kernel (build/guest/kernel-version); "
                         "run 'make setup'")
    try:
        proc = subprocess.run(
            ["bash", str(TOP / "scripts" / "build-scenario.sh"), name, kver, str(paths.root),
             str(source)],
            capture_output=True, text=True, timeout=900, stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise SetupError(f"building {name}: {err}") from None
    if proc.returncode == 0:
        return
    log = paths.root / "scenarios" / name / "kbuild.log"
    first = first_error(log.read_text(errors="replace") if log.is_file() else "",
                        name, sources)
    if first:
        raise SetupError(f"the module does not compile: {first}")
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    raise SetupError(f"building {name} failed: {lines[-1] if lines else 'no output'}")


def first_error(log: str, name: str, sources: dict[str, Path]) -> str:
    """The first error line of a kbuild log, with the fixed build path
    (``/var/tmp/shadowtrace-kbuild/NAME/``) replaced by the user's files."""
    build_dir = f"/var/tmp/shadowtrace-kbuild/{name}/"
    for line in log.splitlines():
        if _ERROR.search(line):
            line = line.strip()
            for base, path in sources.items():
                line = line.replace(build_dir + base, str(path))
            return line.replace(build_dir, "")
    return ""
