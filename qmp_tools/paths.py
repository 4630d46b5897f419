"""Where the built parts live (``build/`` of the checkout, or $SHADOWTRACE_BUILD)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SetupError

#: The checkout this package runs from.
TOP = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class BuildPaths:
    """Paths of everything ``make setup`` builds."""

    root: Path

    @classmethod
    def default(cls) -> BuildPaths:
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

    def require(self, scenario: str) -> None:
        """Raise SetupError naming the first missing part, if any."""
        scenarios = available_scenarios()
        if scenario not in scenarios:
            raise SetupError(
                f"unknown scenario {scenario!r}; known: {', '.join(scenarios) or 'none'}"
            )
        for what, path in (
            ("guest kernel", self.kernel),
            ("plugin", self.plugin),
            (f"initramfs of scenario {scenario!r}", self.initrd(scenario)),
        ):
            if not path.is_file():
                raise SetupError(f"missing set-up: {what} ({path}) not built; run 'make setup'")


def scenario_append(scenario: str) -> str:
    """Extra kernel command-line words a scenario asks for (its ``append`` file)."""
    path = TOP / "scenarios" / scenario / "append"
    return " ".join(path.read_text().split()) if path.is_file() else ""


def available_scenarios() -> list[str]:
    """Names of the scenario folders (those with a steps.sh; "_" ones are build steps)."""
    return sorted(
        p.parent.name
        for p in (TOP / "scenarios").glob("*/steps.sh")
        if not p.parent.name.startswith("_")
    )
