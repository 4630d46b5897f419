"""Name guest PCs: ``test_init+0x4a [test]``, ``do_syscall_64+0x5d``.

Kernel symbols come from a System.map-style file (``build/guest/kallsyms``,
taken from the guest at build time: Debian's own System.map is a stub), shifted by the
KASLR slide that the trace's ``kernel _text ADDR`` marker gives. Module
symbols come from the module's ``.ko`` (its ELF symbol table) placed at the
section addresses of the trace's ``module NAME SECTION ADDR`` markers.

A capture keeps, in the trace, the entries that name its PCs
(:meth:`Symbols.covering`, each with the extent it names); a replay names
PCs from those (:meth:`Symbols.from_entries`), with the same answers for
every PC of the trace, and ``build/`` only for traces without them.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

_TEXT_TYPES = set("TtWw")


#: How far past its symbol a PC is still named after it.
MAX_OFFSET = 1 << 20


@dataclass
class Symbols:
    """Sorted (address, name, module) triples with a lookup by address.

    Each entry names the PCs from its address up to the next entry's, at most
    MAX_OFFSET past it; entries made by :meth:`from_entries` name only their
    own extent (``_ends``).
    """

    _addrs: list[int] = field(default_factory=list)
    _names: list[tuple[str, str]] = field(default_factory=list)
    _ends: list[int] | None = None

    def add_all(self, entries: Iterable[tuple[int, str, str]]) -> None:
        if self._ends is not None:
            raise ValueError("a table of extents (from_entries) takes no more symbols")
        merged = sorted(
            [*zip(self._addrs, self._names, strict=True), *((a, (n, m)) for a, n, m in entries)]
        )
        self._addrs = [a for a, _ in merged]
        self._names = [nm for _, nm in merged]

    @classmethod
    def from_entries(cls, entries: Iterable[tuple[int, int, str, str]]) -> Symbols:
        """The table of (address, size, name, module) entries, each naming
        ``address <= pc < address + size`` (a trace's symbols map)."""
        rows = sorted(entries)
        return cls([a for a, _, _, _ in rows], [(n, m) for _, _, n, m in rows],
                   [a + s for a, s, _, _ in rows])

    def __len__(self) -> int:
        return len(self._addrs)

    def _index(self, pc: int) -> int | None:
        i = bisect.bisect_right(self._addrs, pc) - 1
        if i < 0 or pc - self._addrs[i] > MAX_OFFSET:
            return None
        if self._ends is not None and pc >= self._ends[i]:
            return None
        return i

    def name(self, pc: int) -> str:
        """``symbol+0xoff [module]``, or the bare hex address when unknown."""
        i = self._index(pc)
        if i is None:
            return f"0x{pc:x}"
        sym, module = self._names[i]
        text = f"{sym}+0x{pc - self._addrs[i]:x}"
        return f"{text} [{module}]" if module else text

    def covering(self, pcs: Iterable[int]) -> list[tuple[int, int, str, str]]:
        """(address, size, name, module) of the entries that name ``pcs``,
        each sized to what it names here (up to the next entry, at most
        MAX_OFFSET + 1 bytes), so that :meth:`from_entries` of them names
        every one of ``pcs`` as this table does (and any other PC either as
        this table does or as a bare address)."""
        used = sorted({i for i in map(self._index, pcs) if i is not None})
        out = []
        for i in used:
            addr = self._addrs[i]
            end = min(addr + MAX_OFFSET + 1, 1 << 64)
            if i + 1 < len(self._addrs):
                end = min(end, self._addrs[i + 1])
            if self._ends is not None:
                end = min(end, self._ends[i])
            out.append((addr, end - addr, *self._names[i]))
        return out


def read_system_map(path: Path, slide: int = 0) -> list[tuple[int, str, str]]:
    """Text symbols of a System.map, moved by ``slide`` (KASLR)."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[1] in _TEXT_TYPES:
                out.append(((int(parts[0], 16) + slide) % (1 << 64), parts[2], ""))
    return out


def system_map_address(path: Path, symbol: str) -> int | None:
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == symbol:
                return int(parts[0], 16)
    return None


def read_module(ko: Path, sections: dict[str, int], module: str) -> list[tuple[int, str, str]]:
    """Function symbols of a ``.ko`` placed at the given section addresses."""
    out = []
    try:
        with open(ko, "rb") as f:
            elf = ELFFile(f)
            names = {i: s.name for i, s in enumerate(elf.iter_sections())}
            for sec in elf.iter_sections():
                if not isinstance(sec, SymbolTableSection):
                    continue
                for sym in sec.iter_symbols():
                    if sym["st_info"]["type"] != "STT_FUNC":
                        continue
                    shndx = sym["st_shndx"]
                    base = sections.get(names.get(shndx, "")) if isinstance(shndx, int) else None
                    if base is not None:
                        out.append((base + sym["st_value"], sym.name, module))
    except (OSError, ELFError):
        return []
    return out


def from_markers(
    markers: Iterable[list[str]],
    *,
    system_map: Path | None,
    module_dirs: Iterable[Path] = (),
) -> Symbols:
    """Symbols for a trace from its markers (kernel base, module sections)."""
    syms = Symbols()
    sections: dict[str, dict[str, int]] = {}
    text_at: int | None = None
    for m in markers:
        if len(m) == 3 and m[0] == "kernel" and m[1] == "_text":
            text_at = _hex(m[2])
        elif len(m) == 4 and m[0] == "module":
            addr = _hex(m[3])
            if addr is not None:
                sections.setdefault(m[1], {})[m[2]] = addr
    if system_map is not None and system_map.is_file():
        slide = 0
        linked = system_map_address(system_map, "_text")
        if text_at is not None and linked is not None:
            slide = text_at - linked
        syms.add_all(read_system_map(system_map, slide))
    dirs = list(module_dirs)
    for module, secs in sections.items():
        for d in dirs:
            ko = d / f"{module}.ko"
            if ko.is_file():
                syms.add_all(read_module(ko, secs, module))
                break
    return syms


def _hex(text: str) -> int | None:
    try:
        return int(text, 16)
    except ValueError:
        return None
