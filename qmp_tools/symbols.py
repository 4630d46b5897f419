"""Build step: take the guest kernel's text symbols from /proc/kallsyms.

Debian's System.map is a stub, so ``make guest`` boots the guest once with
``nokaslr`` and the ``_symbols`` step, which copies the text symbols of
/proc/kallsyms to the host over the second serial port. The result (at link
addresses) is what reports use to name kernel PCs.

Usage: python -m qmp_tools.symbols OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from replay.errors import ShadowtraceError

from .machine import GuestRun, MachineConfig
from .paths import BuildPaths


def take_kallsyms(out: Path) -> int:
    paths = BuildPaths.default()
    tmp = out.with_name(out.name + ".tmp")
    config = MachineConfig(
        kernel=paths.kernel,
        initrd=paths.initrd("_symbols"),
        ground_truth=False,
        second_serial=tmp,
        append="nokaslr",
        timeout=300,
    )
    GuestRun(config).run()
    lines = [ln for ln in tmp.read_text(errors="replace").splitlines() if ln.strip()]
    if len(lines) < 1000 or not any(ln.endswith(" _text") for ln in lines):
        raise ShadowtraceError(f"kallsyms from the guest look wrong ({len(lines)} lines)")
    # the tty turned each newline into CR LF: write clean lines
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, out)
    return len(lines)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m qmp_tools.symbols OUT", file=sys.stderr)
        return 2
    try:
        n = take_kallsyms(Path(argv[0]))
    except ShadowtraceError as err:
        print(f"symbols: {err}", file=sys.stderr)
        return 1
    print(f"symbols: {n} kernel text symbols")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
