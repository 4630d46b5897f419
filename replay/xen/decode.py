"""Decode a raw xentrace file into one row per record.

The reader only turns bytes into rows (see :mod:`replay.xen.records` for the
layouts); what a row means for the comparison is decided in
:mod:`replay.xen.annotate`. Each row keeps the file offset of its record.

Shadow records carry no TSC (``__trace_var(..., 0 /*!tsc*/, ...)``), so every
row also carries the state of its physical CPU at that point: the last TSC
seen there and the VM exit being handled (exit reason and guest rIP, from the
``VMEXIT64`` record that opened it; cleared at ``VMENTRY``). With the guest's
vCPUs pinned, that exit is the guest instruction behind the record.

Bad input never escapes as a traceback: a record that overruns its buffer
window or the file, or a file that does not start with a CPU-change record,
raises :class:`~replay.errors.TraceFormatError` naming the byte offset;
records of an unknown event number are kept as kind ``unknown`` and counted.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ..errors import TraceFormatError
from . import records as rec

_HEADER = struct.Struct("<I")
_TSC = struct.Struct("<Q")

#: Columns of a decoded table, with their types (None: no value).
SCHEMA: dict[str, Any] = {
    "record": pl.UInt32,        # index of the record in the file
    "offset": pl.UInt64,        # byte offset of the record
    "pcpu": pl.Int32,           # physical CPU whose buffer held it
    "tsc": pl.UInt64,           # last TSC seen on that CPU (records without one inherit it)
    "event": pl.UInt32,         # Xen's event number
    "kind": pl.Utf8,            # records.SHADOW_KINDS / HVM_LAYOUTS kind, "hvm_0x..", "unknown"
    "levels": pl.UInt8,         # shadow records: the guest's paging levels (2, 3, 4)
    "va": pl.UInt64,            # shadow records, pf_xen/pf_inject, invlpg
    "gl1e": pl.UInt64,          # fixup / not_shadow / emulate: the guest L1 entry
    "write_val": pl.UInt64,     # emulate: the value written
    "gfn": pl.UInt64,           # emulate_unshadow_*, wrmap_bf, prealloc_unpin, resync_*
    "flags": pl.UInt32,         # fixup / not_shadow / emulate: TRCE_SFLAG_* bits
    "flag_names": pl.Utf8,      # the same as names joined by "|"
    "exit_reason": pl.UInt32,   # the VM exit being handled (vmexit rows: their own)
    "exit_name": pl.Utf8,
    "rip": pl.UInt64,           # the guest instruction of that exit
    "cr": pl.UInt32,            # cr_write: which CR
    "value": pl.UInt64,         # cr_write / cr_read / msr_*: the value; vmmcall: hypercall
    "msr": pl.UInt32,           # msr_read / msr_write
    "leaf": pl.UInt32,          # cpuid: the leaf
    "error_code": pl.UInt32,    # pf_xen / pf_inject / inj_exc
}


@dataclass
class Decoded:
    """A decoded xentrace file."""

    path: Path
    table: pl.DataFrame
    #: records Xen reported lost (the sum of TRC_LOST_RECORDS counts)
    lost: int = 0
    #: records of an event number this decoder does not know
    unknown: int = 0
    #: physical CPUs that held records
    pcpus: list[int] = field(default_factory=list)


class _Columns:
    """Column lists filled record by record (None where a field is absent)."""

    def __init__(self) -> None:
        self.cols: dict[str, list[Any]] = {name: [] for name in SCHEMA}

    def add(self, row: dict[str, Any]) -> None:
        for name, col in self.cols.items():
            col.append(row.get(name))

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.cols, schema=SCHEMA)


@dataclass
class _Cpu:
    tsc: int | None = None
    exit_reason: int | None = None
    rip: int | None = None


def decode(
    path: Path,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> Decoded:
    """Every record of the xentrace file at ``path``.

    :param progress: called now and then with (bytes done, bytes in all).
    :raise TraceFormatError: unreadable file or a record that does not fit.
    """
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TraceFormatError(str(path), f"cannot read: {err.strerror}") from None
    return decode_bytes(data, path=path, progress=progress)


def decode_bytes(
    data: bytes,
    *,
    path: Path = Path("<bytes>"),
    progress: Callable[[int, int], None] | None = None,
) -> Decoded:
    """:func:`decode` of bytes already read."""
    name = str(path)
    out = _Columns()
    cpus: dict[int, _Cpu] = {}
    cpu = -1
    window_end = 0
    pos = 0
    index = 0
    lost = unknown = 0
    total = len(data)
    next_report = 1 << 22
    if total == 0:
        raise TraceFormatError(name, "empty xentrace file (xentrace wrote nothing)", offset=0)
    while pos < total:
        if pos + 4 > total:
            raise TraceFormatError(name, "truncated record header", offset=pos)
        (header,) = _HEADER.unpack_from(data, pos)
        event = header & 0x0FFFFFFF
        words = (header >> 28) & 7
        has_tsc = header >> 31
        size = 4 + (8 if has_tsc else 0) + 4 * words
        if pos + size > total:
            raise TraceFormatError(
                name, f"truncated record (event {event:#x}, {size} bytes)", offset=pos
            )
        if event == rec.TRC_TRACE_CPU_CHANGE:
            if words != 2 or has_tsc:
                raise TraceFormatError(name, "malformed CPU-change record", offset=pos)
            cpu, window = struct.unpack_from("<iI", data, pos + 4)
            window_end = pos + size + window
            if window_end > total:
                raise TraceFormatError(
                    name, f"buffer window of CPU {cpu} ({window} bytes) runs past the end",
                    offset=pos,
                )
            pos += size
            continue
        if cpu < 0:
            raise TraceFormatError(
                name, "not a xentrace file: no CPU-change record first", offset=pos
            )
        if pos + size > window_end:
            raise TraceFormatError(
                name, f"record (event {event:#x}) crosses the end of CPU {cpu}'s window",
                offset=pos,
            )
        state = cpus.setdefault(cpu, _Cpu())
        body = pos + 4
        if has_tsc:
            (state.tsc,) = _TSC.unpack_from(data, body)
            body += 8
        payload = data[body:body + 4 * words]
        row = _row(event, payload, state)
        if row["kind"] == "unknown":
            unknown += 1
        elif row["kind"] == "lost_records":
            lost += row.pop("lost", 0)
        if row["kind"] != "wrap_buffer":
            row.update(record=index, offset=pos, pcpu=cpu, tsc=state.tsc)
            out.add(row)
            index += 1
        pos += size
        if progress is not None and pos >= next_report:
            progress(pos, total)
            next_report = pos + (1 << 22)
    if progress is not None:
        progress(total, total)
    return Decoded(Path(name), out.frame(), lost=lost, unknown=unknown, pcpus=sorted(cpus))


def _row(event: int, payload: bytes, cpu: _Cpu) -> dict[str, Any]:
    """One record's fields; updates the CPU's exit state for HVM entry/exit."""
    got = rec.shadow_number(event)
    if got is not None:
        number, levels = got
        fmt, names = rec.shadow_layout(number, levels)
        fields = rec.unpack(fmt, names, payload)
        if fields is None:
            return {"event": event, "kind": "unknown"}
        row: dict[str, Any] = {"event": event, "kind": rec.SHADOW_KINDS[number],
                               "levels": levels, **fields}
        if number == 8:
            row["flags"] &= rec.EMULATE_FLAGS_MASK
        if "flags" in row:
            row["flag_names"] = "|".join(rec.flag_names(row["flags"]))
        return _with_exit(row, cpu)
    if event & 0x0FFFF000 == rec.TRC_GEN:
        if event == rec.TRC_LOST_RECORDS:
            lost = rec.unpack("<IHHQ", ("lost", "did", "vid", "first"), payload)
            return {"event": event, "kind": "lost_records", "lost": lost["lost"] if lost else 0}
        if event == rec.TRC_TRACE_WRAP_BUFFER:
            return {"event": event, "kind": "wrap_buffer"}
        return {"event": event, "kind": "unknown"}
    if event & 0x0FFF0000 == rec.TRC_HVM & 0x0FFF0000:
        layout = rec.HVM_LAYOUTS.get(event & ~rec.HVM_NESTED_FLAG)
        if layout is None:
            return _with_exit({"event": event, "kind": f"hvm_{event:#x}"}, cpu)
        fields = rec.unpack(layout.fmt, layout.fields, payload)
        if fields is None:
            return {"event": event, "kind": "unknown"}
        row = {"event": event, "kind": layout.kind}
        if layout.kind == "vmexit":
            cpu.exit_reason, cpu.rip = fields["exit_reason"], fields["rip"]
        elif layout.kind == "vmentry":
            cpu.exit_reason = cpu.rip = None
            return row
        else:
            row.update((k, v) for k, v in fields.items() if k in SCHEMA)
        return _with_exit(row, cpu)
    return {"event": event, "kind": "unknown"}


def _with_exit(row: dict[str, Any], cpu: _Cpu) -> dict[str, Any]:
    if cpu.exit_reason is not None:
        row["exit_reason"] = cpu.exit_reason
        row["exit_name"] = rec.SVM_EXITS.get(cpu.exit_reason, f"exit_{cpu.exit_reason:#x}")
        row["rip"] = cpu.rip
    return row
