"""The plugin's C unit tests (plugin/tests/), built and run by ``make plugin-test``.

Each test program prints one line per failure and ends with ``N passed, M
failed``; ``make plugin-test`` fails on the first program that fails.
"""

from __future__ import annotations

import re
import subprocess

from qmp_tools.paths import TOP

COUNT_LINE = re.compile(r"^(\d+) passed, (\d+) failed$", re.MULTILINE)


def test_plugin_c_unit_tests_pass() -> None:
    proc = subprocess.run(
        ["make", "-s", "-C", str(TOP), "plugin-test"],
        capture_output=True,
        text=True,
        timeout=600,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = COUNT_LINE.findall(proc.stdout)
    # one count line per test program: the decoder's, the console encoder's
    # and the table-frame rule's (plugin/tests/test_decode.c, test_console.c,
    # test_tablerefs.c)
    assert len(counts) == 3, proc.stdout
    for passed, failed in counts:
        assert int(passed) > 0, proc.stdout
        assert failed == "0", proc.stdout
