"""The shadowtrace trace format: the one definition.

Everything that reads or writes a trace takes its constants from here: the
Python reader and writer import them, and the C plugin includes a header
generated from this module (``python -m replay.trace.format --emit-c``), so the two
sides cannot drift apart. ``docs/trace-format.md`` explains the format for
people; this module is what programs use.

A trace file is a stream of msgpack maps, each with a key ``"t"``:

* one ``header`` map (magic, version, who recorded what),
* at most one ``symbols`` map right after it (the names of the trace's PCs;
  written by the capture once QEMU has exited, not by the plugin),
* any number of ``chunk`` maps, each holding up to ``CHUNK_EVENTS`` events
  in one total order, stored **by column** (one compressed array per field),
* one ``footer`` map with counts. No footer means the trace is truncated.

Column encoding (all little-endian):

* u8 columns (``kind``, ``vcpu``, ``info``): the raw bytes, zstd-compressed.
* u64 columns (``va``, ``pa``, ``pc``, ``val``): each value minus the
  previous one in the same column and chunk (mod 2**64, the first minus 0),
  zigzag-mapped as a signed 64-bit number, split into 8 byte planes (all
  lowest bytes first, then all second bytes, ...), then zstd-compressed.

Version history:

* 1: first version. Later, within version 1 (no reader of an older trace
  misreads it): the header's ``options`` no longer hold the host paths
  ``out`` and ``ram``; an optional ``symbols`` map follows the header (a
  reader from before it refuses such a trace: "unknown object type").
* 2: UNTRACK events (the plugin stops tracking a table frame nothing can
  reach). Version 1 traces are read as they are (they have none).
"""

from __future__ import annotations

import enum
import sys
from typing import Final

MAGIC: Final = "SHADOWTRACE"
VERSION: Final = 2
#: Versions this reader reads (the writer writes VERSION).
READS_VERSIONS: Final = (1, 2)

#: Most events one chunk may hold; writers flush at this many.
CHUNK_EVENTS: Final = 1 << 16
#: Bytes of one page-table frame snapshot.
PAGE_SIZE: Final = 4096


class Kind(enum.IntEnum):
    """Event kinds (the ``kind`` column). Meaning of the other columns per kind.

    ``va``/``pa``/``pc``/``val`` not listed for a kind are 0.
    """

    #: Data load. va, pa: addresses; pc: instruction; info: size and mode.
    READ = 1
    #: Data store. As READ. val: for a store to a tracked table frame, see
    #: TABLE_WRITE (which follows it); 0 otherwise.
    WRITE = 2
    #: Instruction fetch from one page, once per executed block (and once
    #: more for a block that crosses into a second page). va: the page
    #: address fetched; pa: its guest-physical address; pc: block start.
    FETCH = 3
    #: ``mov cr3``. val: the full value written (PCID, bit 63 no-flush);
    #: pc: the instruction.
    CR3_WRITE = 4
    #: ``invlpg``. va: the address invalidated; pc: the instruction.
    INVLPG = 5
    #: ``mov cr4``. val: the new CR4; pa: the CR4 before (0 if unknown).
    CR4_WRITE = 6
    #: ``invpcid``. val: the type (0..3); va: the descriptor's linear
    #: address; pa: the descriptor's PCID; pc: the instruction.
    INVPCID = 7
    #: First snapshot of a page-table frame, taken when it became reachable.
    #: pa: frame address; val: index of its 4 KiB page in the chunk's
    #: ``pages`` blob. Replaces whatever the replayer knew of that frame.
    SNAPSHOT = 8
    #: A store into a tracked table frame, as 8-byte aligned entries read
    #: back from guest RAM after the store. pa: the entry's address; val: its
    #: new value; va, pc: as the store. One per 8-byte entry touched.
    TABLE_WRITE = 9
    #: Guest marker (magic CPUID). val: index into the chunk's ``markers``
    #: list ([name, arg, ...]); pc: the CPUID instruction.
    MARKER = 10
    #: The capture window opened: what the replayer knew of guest tables is
    #: stale; snapshots follow. val: the window number (0, 1, ...).
    WINDOW_OPEN = 11
    #: The capture window closed. val: the window number.
    WINDOW_CLOSE = 12
    #: The CR3 a vCPU holds when the window opens (not a write). val: CR3.
    CR3_CURRENT = 13
    #: The plugin stopped tracking a table frame: no root or reachable table
    #: links to it and every vCPU has flushed since, so no TABLE_WRITE for it
    #: follows until a SNAPSHOT makes it a table again. pa: frame address;
    #: val: the level it had (1..4); pc: the store that led to it (0 if none).
    UNTRACK = 14


#: Kinds that are memory accesses.
ACCESS_KINDS: Final = (Kind.READ, Kind.WRITE, Kind.FETCH)

# The ``info`` column.
#: Bits 0-4: access size in bytes (1..16; 0 for non-access events).
INFO_SIZE_MASK: Final = 0x1F
#: Bit 5: the access was made at CPL 3 (user mode).
INFO_USER: Final = 0x20
#: Bit 6: the access went to MMIO, not RAM (pa is the bus address).
INFO_IO: Final = 0x40

#: Columns of a chunk, in order, with their element type.
U8_COLUMNS: Final = ("kind", "vcpu", "info")
U64_COLUMNS: Final = ("va", "pa", "pc", "val")
COLUMNS: Final = U8_COLUMNS + U64_COLUMNS

# Marker protocol: the guest executes CPUID with EAX = MARKER_LEAF, RBX = the
# guest-virtual address of a NUL-terminated ASCII string "NAME ARG ...", RCX
# = its length (at most MARKER_MAX_LEN). Names "start" and "stop" open and
# close the capture window (window=markers).
MARKER_LEAF: Final = 0x53544D4B  # "STMK"
MARKER_MAX_LEN: Final = 255
MARKER_START: Final = "start"
MARKER_STOP: Final = "stop"
#: Marker naming one loaded module section: "module NAME SECTION ADDR".
MARKER_MODULE: Final = "module"
#: Marker giving the kernel's text base: "kernel _text ADDR" (KASLR slide).
MARKER_KERNEL: Final = "kernel"
#: Marker the plugin itself writes when the guest enters exit_mmap(mm):
#: "pagetable-dying PA", PA = mm's root, what a Xen-aware Linux passes to
#: HVMOP_pagetable_dying (arch/x86/xen/mmu_hvm.c xen_hvm_exit_mmap).
MARKER_DYING: Final = "pagetable-dying"
# Secure registration by the guest's own code (hex numbers, 0x optional):
#: "secure-frame PA [NPAGES]": frames from here on are secure.
MARKER_SECURE_FRAME: Final = "secure-frame"
#: "secure-root CR3": this root (PCID bits ignored) is a secure address space.
MARKER_SECURE_ROOT: Final = "secure-root"
#: "secure-va VA [NPAGES]": the frames behind VA (walked at this marker) are secure.
MARKER_SECURE_VA: Final = "secure-va"
#: "secure-end": registrations made so far end here (the pages are freed).
MARKER_SECURE_END: Final = "secure-end"
#: Marker the plugin itself writes when the kernel writes to its console
#: (it hooks the serial console write, see OPTION_CONSOLE): "console PAYLOAD", the
#: bytes written, escaped so that the marker is one word of printable ASCII:
#: a byte from 0x21 to 0x7e other than "%" stands for itself, any other byte
#: is "%xx" (two lowercase hex digits). A write longer than one marker holds
#: is split over consecutive markers; a line ends at "\n" (the reader
#: assembles lines: :func:`console_bytes`). Only the kernel's own console
#: output (printk) is recorded, not what programs write to the tty.
MARKER_CONSOLE: Final = "console"
#: Plugin option (kept in the header's ``options``) giving the link-time
#: address of the hooked console write: present means the trace records
#: "console" markers; traces without it predate them.
OPTION_CONSOLE: Final = "console"



def console_payload(data: bytes) -> str:
    """``data`` escaped as a "console" marker's argument (what the plugin
    writes, without its split into markers of MARKER_MAX_LEN)."""
    return "".join(chr(b) if 0x20 < b < 0x7F and b != 0x25 else f"%{b:02x}" for b in data)


def console_bytes(marker: list[str]) -> bytes | None:
    """The bytes a "console" marker carries (None for other markers or a
    bad escape)."""
    if len(marker) != 2 or marker[0] != MARKER_CONSOLE:
        return None
    text = marker[1]
    if "%" not in text:
        return text.encode("ascii", "replace")
    out = bytearray()
    i = 0
    while i < len(text):
        c = text[i]
        if c == "%":
            pair = text[i + 1 : i + 3]
            if len(pair) != 2 or not all(h in "0123456789abcdef" for h in pair):
                return None
            out.append(int(pair, 16))
            i += 3
        else:
            out += c.encode("ascii", "replace")
            i += 1
    return bytes(out)


# Top-level map keys.
KEY_TYPE: Final = "t"
TYPE_HEADER: Final = "header"
TYPE_CHUNK: Final = "chunk"
TYPE_FOOTER: Final = "footer"
#: Optional, at most once, right after the header (replay.trace.symtab).
TYPE_SYMBOLS: Final = "symbols"

#: Header keys: every header has these.
HEADER_KEYS: Final = (
    "magic",  # MAGIC
    "version",  # VERSION
    "qemu",  # QEMU version string
    "options",  # plugin options, {name: value}, without host paths (out, ram)
    "kernel",  # guest kernel version
    "ram_bytes",  # guest RAM size
    "vcpus",  # number of vCPUs
    "scenario",  # scenario name
)
#: Symbols map keys: four lists of one length, entry i naming the PCs
#: addr[i] <= pc < addr[i] + size[i] as name[i]+0xOFF [module[i]].
SYMBOLS_KEYS: Final = (
    "addr",  # u64 load addresses, ascending
    "size",  # bytes each entry names (> 0)
    "name",  # symbol names
    "module",  # module names, "" for the kernel
)
#: Chunk keys.
CHUNK_KEYS: Final = ("seq", "n", "cols", "pages", "markers")
#: Footer keys.
FOOTER_KEYS: Final = (
    "chunks",  # chunks written
    "events",  # events written (sum of chunk n)
    "by_kind",  # {kind number: events written of that kind}
    "seen",  # accesses seen by the plugin inside the window
    "recorded",  # accesses written
    "deduplicated",  # accesses dropped by dedup
    "dropped",  # events lost (e.g. output error); a sound trace has 0
    "tables",  # table frames tracked
)


def emit_c_header() -> str:
    """Return the C header the plugin is built with (generated, not edited)."""
    lines = [
        "/* Generated by `python -m replay.trace.format --emit-c`: do not edit. */",
        "#ifndef SHADOWTRACE_FORMAT_H",
        "#define SHADOWTRACE_FORMAT_H",
        f'#define ST_MAGIC "{MAGIC}"',
        f"#define ST_VERSION {VERSION}",
        f"#define ST_CHUNK_EVENTS {CHUNK_EVENTS}",
        f"#define ST_PAGE_SIZE {PAGE_SIZE}",
    ]
    lines += [f"#define ST_KIND_{k.name} {k.value}" for k in Kind]
    lines += [
        f"#define ST_INFO_SIZE_MASK 0x{INFO_SIZE_MASK:x}",
        f"#define ST_INFO_USER 0x{INFO_USER:x}",
        f"#define ST_INFO_IO 0x{INFO_IO:x}",
        f"#define ST_MARKER_LEAF 0x{MARKER_LEAF:x}u",
        f"#define ST_MARKER_MAX_LEN {MARKER_MAX_LEN}",
        f'#define ST_MARKER_START "{MARKER_START}"',
        f'#define ST_MARKER_STOP "{MARKER_STOP}"',
        f'#define ST_MARKER_DYING "{MARKER_DYING}"',
        f'#define ST_MARKER_CONSOLE "{MARKER_CONSOLE}"',
        f'#define ST_OPTION_CONSOLE "{OPTION_CONSOLE}"',
        f"#define ST_N_U8_COLUMNS {len(U8_COLUMNS)}",
        f"#define ST_N_U64_COLUMNS {len(U64_COLUMNS)}",
        "static const char *const st_u8_columns[] = {"
        + ", ".join(f'"{c}"' for c in U8_COLUMNS)
        + "};",
        "static const char *const st_u64_columns[] = {"
        + ", ".join(f'"{c}"' for c in U64_COLUMNS)
        + "};",
    ]
    for key in ("KEY_TYPE", "TYPE_HEADER", "TYPE_CHUNK", "TYPE_FOOTER"):
        lines.append(f'#define ST_{key} "{globals()[key]}"')
    lines.append("#endif")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] == ["--emit-c"]:
        sys.stdout.write(emit_c_header())
    else:
        sys.stderr.write("usage: python -m replay.trace.format --emit-c\n")
        sys.exit(2)
