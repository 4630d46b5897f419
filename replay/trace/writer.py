"""Trace writer in Python: the same format the plugin writes.

Tests and tools (synthetic traces, ``shadowtrace cut``) build traces with
it. Events are appended one by one or as arrays; chunks are flushed at
``CHUNK_EVENTS`` events.
"""

from __future__ import annotations

from pathlib import Path
from typing import IO, Any

import msgpack
import numpy as np

from . import columns, symtab
from . import format as fmt


class TraceWriter:
    """Write a trace: header (and the symbols map, if given) on open, chunks
    as events come, footer on close."""

    def __init__(
        self,
        path: str | Path,
        *,
        scenario: str = "synthetic",
        vcpus: int = 1,
        ram_bytes: int = 512 << 20,
        kernel: str = "",
        qemu: str = "",
        options: dict[str, str] | None = None,
        level: int = 1,
        symbols: symtab.TraceSymbols | None = None,
    ) -> None:
        self.path = Path(path)
        self.level = level
        self._file: IO[bytes] = open(self.path, "wb")  # noqa: SIM115
        self._rows: dict[str, list[int]] = {c: [] for c in fmt.COLUMNS}
        self._pages: list[bytes] = []
        self._markers: list[list[str]] = []
        self.chunks = 0
        self.events = 0
        self.by_kind: dict[int, int] = {}
        self.counts = {"seen": 0, "recorded": 0, "deduplicated": 0, "dropped": 0, "tables": 0}
        self._pack(
            {
                fmt.KEY_TYPE: fmt.TYPE_HEADER,
                "magic": fmt.MAGIC,
                "version": fmt.VERSION,
                "qemu": qemu,
                "options": dict(options or {}),
                "kernel": kernel,
                "ram_bytes": ram_bytes,
                "vcpus": vcpus,
                "scenario": scenario,
            }
        )
        if symbols is not None:
            self._pack(symtab.encode(symbols))

    def _pack(self, obj: dict[str, Any]) -> None:
        self._file.write(msgpack.packb(obj, use_bin_type=True))

    # -- events ----------------------------------------------------------
    def event(
        self,
        kind: fmt.Kind | int,
        *,
        vcpu: int = 0,
        info: int = 0,
        va: int = 0,
        pa: int = 0,
        pc: int = 0,
        val: int = 0,
    ) -> None:
        """Append one event (``val`` of SNAPSHOT/MARKER is set by their helpers)."""
        row = self._rows
        for name, value in (
            ("kind", int(kind)), ("vcpu", vcpu), ("info", info),
            ("va", va), ("pa", pa), ("pc", pc), ("val", val),
        ):
            row[name].append(value)
        self.by_kind[int(kind)] = self.by_kind.get(int(kind), 0) + 1
        if int(kind) in fmt.ACCESS_KINDS:
            self.counts["seen"] += 1
            self.counts["recorded"] += 1
        if len(row["kind"]) >= fmt.CHUNK_EVENTS:
            self.flush()

    def access(
        self, kind: fmt.Kind, va: int, pa: int, *, size: int = 8, user: bool = False,
        vcpu: int = 0, pc: int = 0,
    ) -> None:
        info = (size & fmt.INFO_SIZE_MASK) | (fmt.INFO_USER if user else 0)
        self.event(kind, vcpu=vcpu, info=info, va=va, pa=pa, pc=pc)

    def snapshot(self, frame_pa: int, page: bytes, *, vcpu: int = 0) -> None:
        if len(page) != fmt.PAGE_SIZE:
            raise ValueError(f"snapshot of {len(page)} bytes, not {fmt.PAGE_SIZE}")
        self._pages.append(bytes(page))
        self.counts["tables"] += 1
        self.event(fmt.Kind.SNAPSHOT, vcpu=vcpu, pa=frame_pa, val=len(self._pages) - 1)

    def marker(self, name: str, *args: str, vcpu: int = 0, pc: int = 0) -> None:
        self._markers.append([name, *args])
        self.event(fmt.Kind.MARKER, vcpu=vcpu, pc=pc, val=len(self._markers) - 1)

    # -- chunks ----------------------------------------------------------
    def flush(self) -> None:
        """Write the pending events as one chunk (nothing if none)."""
        n = len(self._rows["kind"])
        if n == 0:
            return
        cols = {c: columns.encode_u8(self._rows[c], self.level) for c in fmt.U8_COLUMNS}
        cols |= {
            c: columns.encode_u64(np.array(self._rows[c], dtype=np.uint64), self.level)
            for c in fmt.U64_COLUMNS
        }
        self._pack(
            {
                fmt.KEY_TYPE: fmt.TYPE_CHUNK,
                "seq": self.chunks,
                "n": n,
                "cols": cols,
                "pages": columns.compress(b"".join(self._pages), self.level),
                "markers": self._markers,
            }
        )
        self.chunks += 1
        self.events += n
        self._rows = {c: [] for c in fmt.COLUMNS}
        self._pages = []
        self._markers = []

    def close(self, *, footer: bool = True) -> None:
        """Flush and write the footer (``footer=False`` leaves it truncated)."""
        self.flush()
        if footer:
            self._pack(
                {
                    fmt.KEY_TYPE: fmt.TYPE_FOOTER,
                    "chunks": self.chunks,
                    "events": self.events,
                    "by_kind": dict(self.by_kind),
                    **self.counts,
                }
            )
        self._file.close()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._file.closed:
            self.close()
