"""Where the built parts live, as a capture needs them.

The layout itself (:class:`replay.paths.BuildPaths`, :data:`~replay.paths.TOP`)
is defined once on the replay side, which the capture side already depends
on; this module adds what a capture checks before it boots (:meth:`BuildPaths.require`)
and the scenario folders.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from replay.paths import TOP
from replay.paths import BuildPaths as _Layout

from .errors import SetupError

__all__ = ["TOP", "BuildPaths", "available_scenarios", "folder_vcpus", "scenario_append",
           "scenario_vcpus"]


@dataclass(frozen=True)
class BuildPaths(_Layout):
    """Paths of everything ``make setup`` builds (:class:`replay.paths.BuildPaths`),
    and the check that they are there."""

    def require(self, scenario: str, *, known: bool = True) -> None:
        """Raise SetupError naming the first missing part, if any; ``known``:
        the scenario must be one of the repository's."""
        scenarios = available_scenarios()
        if known and scenario not in scenarios:
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


def scenario_vcpus(scenario: str) -> int:
    """vCPUs a scenario runs on (its ``vcpus`` file: one number; 1 without it),
    for the capture and the Xen run alike."""
    return folder_vcpus(TOP / "scenarios" / scenario)


def folder_vcpus(folder: Path) -> int:
    """vCPUs of the scenario in ``folder`` (its ``vcpus`` file; 1 without
    one): a repository scenario's or a user's own (``--scenario DIR``)."""
    path = folder / "vcpus"
    if not path.is_file():
        return 1
    text = path.read_text().strip()
    if not text.isdigit() or not 1 <= int(text) <= 8:
        raise SetupError(f"{path}: want one number of vCPUs, 1 to 8, not {text!r}")
    return int(text)


def available_scenarios() -> list[str]:
    """Names of the scenario folders (those with a steps.sh; "_" ones are build steps)."""
    return sorted(
        p.parent.name
        for p in (TOP / "scenarios").glob("*/steps.sh")
        if not p.parent.name.startswith("_")
    )
