"""Where files are: the checkout, ``build/`` and the files beside a trace.

The capture side (``qmp_tools``) and the replay side both need these, and
``qmp_tools`` already depends on ``replay`` (for the trace format), so the
one definition lives here: the replay side never imports ``qmp_tools`` to
find a file.

* :data:`TOP`: the checkout this package runs from.
* :class:`BuildPaths`: everything ``make setup`` builds (``build/`` of the
  checkout, or ``$SHADOWTRACE_BUILD``); ``qmp_tools.paths`` adds what a
  capture checks before it boots.
* :func:`side_paths`: the console log and ground truth a capture keeps
  beside its trace.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Self

#: The checkout this package runs from.
TOP = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BuildPaths:
    """Paths of everything ``make setup`` builds."""

    root: Path

    @classmethod
    def default(cls) -> Self:
        env = os.environ.get("SHADOWTRACE_BUILD")
        return cls(Path(env) if env else TOP / "build")

    @property
    def guest(self) -> Path:
        return self.root / "guest"

    @property
    def kernel(self) -> Path:
        return self.guest / "vmlinuz"

    @property
    def kallsyms(self) -> Path:
        """Kernel text symbols at link addresses (``make guest`` takes them)."""
        return self.guest / "kallsyms"

    @property
    def kernel_offsets(self) -> Path:
        """Structure offsets of the guest kernel (scripts/kernel-offsets.sh)."""
        return self.guest / "kernel-offsets"

    @property
    def plugin(self) -> Path:
        return self.root / "plugin" / "libshadowtrace.so"

    def initrd(self, scenario: str) -> Path:
        return self.guest / f"{scenario}.cpio.gz"

    def module_dir(self, scenario: str) -> Path:
        """Where the scenario's built kernel modules (with symbols) are."""
        return self.root / "scenarios" / scenario / "src"

    def kernel_version(self) -> str:
        try:
            return (self.guest / "kernel-version").read_text().strip()
        except OSError:
            return ""


def side_paths(out: Path) -> tuple[Path, Path]:
    """The console log and ground-truth files kept beside trace ``out``."""
    stem = out.name[: -len(".trace")] if out.name.endswith(".trace") else out.name
    return out.with_name(stem + ".console.log"), out.with_name(stem + ".truth.json.gz")
