"""The ``symbols`` map of a trace: the names of the trace's PCs, carried with it.

A capture (``qmp_tools.capture``) writes it once QEMU has exited, right after
the header: the kernel text symbols (moved by the KASLR slide of the
``kernel _text ADDR`` marker) and the module function symbols (at the
addresses of the ``module NAME SECTION ADDR`` markers) that cover a PC of the
trace, each with its extent. A replay then names PCs without the capturing
checkout's ``build/``. See ``docs/trace-format.md``.

This module is format only: encode, decode and validate, and insert the map
into a finished trace. What a name looks like is :mod:`replay.guest.symbols`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from ..errors import TraceFormatError
from . import format as fmt

_U64 = 1 << 64


@dataclass(frozen=True)
class TraceSymbols:
    """Entry ``i`` names PCs ``addr[i] <= pc < addr[i] + size[i]`` as
    ``name[i]+0xOFF``, with `` [module[i]]`` when ``module[i]`` is not ""
    (the kernel). Sorted by address."""

    addr: list[int] = field(default_factory=list)
    size: list[int] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    module: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, entries: Iterable[tuple[int, int, str, str]]) -> TraceSymbols:
        """The table of (address, size, name, module) entries, sorted."""
        rows = sorted(entries)
        return cls(addr=[r[0] for r in rows], size=[r[1] for r in rows],
                   name=[r[2] for r in rows], module=[r[3] for r in rows])

    def __len__(self) -> int:
        return len(self.addr)

    def entries(self) -> list[tuple[int, int, str, str]]:
        return list(zip(self.addr, self.size, self.name, self.module, strict=True))


def encode(table: TraceSymbols) -> dict[str, Any]:
    """The top-level map for ``table``."""
    return {
        fmt.KEY_TYPE: fmt.TYPE_SYMBOLS,
        "addr": list(table.addr),
        "size": list(table.size),
        "name": list(table.name),
        "module": list(table.module),
    }


def decode(obj: dict[str, Any], path: str, offset: int) -> TraceSymbols:
    """The table of a ``symbols`` map; TraceFormatError if it is malformed."""

    def bad(message: str) -> TraceFormatError:
        return TraceFormatError(path, f"symbols map: {message}", offset=offset)

    missing = [k for k in fmt.SYMBOLS_KEYS if k not in obj]
    if missing:
        raise bad(f"lacks {', '.join(missing)}")
    cols = {k: obj[k] for k in fmt.SYMBOLS_KEYS}
    if not all(isinstance(v, list) for v in cols.values()):
        raise bad("its keys are not lists")
    if len({len(v) for v in cols.values()}) != 1:
        raise bad("its lists differ in length")
    addr, size, name, module = (cols[k] for k in fmt.SYMBOLS_KEYS)
    if not all(type(a) is int and 0 <= a < _U64 for a in addr):
        raise bad("an address is not a u64")
    if not all(type(s) is int and s > 0 and a + s <= _U64 for a, s in zip(addr, size, strict=True)):
        raise bad("a size is not positive or runs past 2**64")
    if not all(isinstance(s, str) for s in name) or not all(
        isinstance(s, str) for s in module
    ):
        raise bad("a name or module is not a string")
    if any(b < a for a, b in zip(addr, addr[1:], strict=False)):
        raise bad("addresses are not sorted")
    return TraceSymbols(addr=addr, size=size, name=name, module=module)


def insert(path: Path, table: TraceSymbols) -> None:
    """Put ``table`` right after the header of the finished trace ``path``
    (rewritten through ``PATH.symbols``, then renamed over it). The trace
    must not have a symbols map yet (the reader refuses a second one)."""
    tmp = path.with_name(path.name + ".symbols")
    with open(path, "rb") as src:
        unpacker = msgpack.Unpacker(src, raw=False, strict_map_key=False)
        header = unpacker.unpack()
        if not isinstance(header, dict) or header.get(fmt.KEY_TYPE) != fmt.TYPE_HEADER:
            raise TraceFormatError(str(path), "not a shadowtrace trace (no header)", offset=0)
        header_end = unpacker.tell()
        src.seek(0)
        with open(tmp, "wb") as dst:
            dst.write(src.read(header_end))
            dst.write(msgpack.packb(encode(table), use_bin_type=True))
            shutil.copyfileobj(src, dst, 1 << 20)
    os.replace(tmp, path)
