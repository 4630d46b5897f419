"""The format is defined once: the C side and the guest header follow it."""

from __future__ import annotations

import re

from qmp_tools.paths import TOP
from replay.trace import format as fmt


def test_c_header_names_every_kind_with_its_number() -> None:
    header = fmt.emit_c_header()
    for kind in fmt.Kind:
        assert f"#define ST_KIND_{kind.name} {kind.value}\n" in header


def test_built_plugin_uses_the_current_definition() -> None:
    # The Makefile generates build/gen/trace_format.h from format.py before
    # building the plugin; a stale copy would mean the plugin writes another
    # format than the reader reads.
    built = (TOP / "build" / "gen" / "trace_format.h").read_text()
    assert built == fmt.emit_c_header()


def test_guest_marker_header_uses_the_format_leaf() -> None:
    text = (TOP / "scenarios" / "common" / "stmark.h").read_text()
    leaf = re.search(r"#define STMARK_LEAF (0x[0-9a-fA-F]+)u", text)
    assert leaf is not None
    assert int(leaf.group(1), 16) == fmt.MARKER_LEAF
    limit = re.search(r"#define STMARK_MAX_LEN (\d+)", text)
    assert limit is not None and int(limit.group(1)) == fmt.MARKER_MAX_LEN


def test_plugin_source_takes_kinds_from_the_generated_header() -> None:
    # No event kind is spelled as a bare number in the plugin: every kind it
    # writes is an ST_KIND_* name from the generated header. The plugin is
    # several units (plugin/*.c, *.h); each that names a kind includes it.
    units = {p.name: p.read_text() for p in sorted((TOP / "plugin").glob("*.[ch]"))}
    assert '#include "trace_format.h"' in units["shadowtrace.c"]
    for name, text in units.items():
        if "ST_KIND_" in text:
            assert '#include "trace_format.h"' in text, name
    source = "\n".join(units.values())
    used = set(re.findall(r"ST_KIND_([A-Z0-9_]+)", source))
    assert used <= {k.name for k in fmt.Kind}
    # the plugin writes at least accesses, CR3 writes, snapshots, table writes
    assert {"READ", "WRITE", "CR3_WRITE", "SNAPSHOT", "TABLE_WRITE", "MARKER"} <= used
