"""``shadowtrace cut``: a smaller, valid trace of a range of events.

The output is a trace of the format in :mod:`replay.trace.format` (the same header,
with ``options["cut"] = "FROM:TO"``, and the same symbols map) laid out as::

    [state prefix]   WINDOW_OPEN, CR3_CURRENT per vCPU, SNAPSHOT per known frame
    [carried marks]  kernel / module markers (and live secure-* markers) before FROM
    events FROM .. TO-1, unchanged (pages and markers re-indexed per chunk)
    [carried marks]  kernel / module markers after TO
    footer

**Range.** ``--events FROM:TO`` is half-open (original event indexes, TO
may be omitted: to the end). ``--from-marker A --to-marker B`` runs from the
first marker A through the first marker B after it, both included. A marker
is named by its name (``start``) or its full text (``secure-root 0x6064000``).

**State prefix.** Only written when a capture window is open at FROM (or the
trace has no window events and something is known): then the guest model is
not empty and the cut must say what it knows. It is the model's knowledge at
FROM, rebuilt by a :class:`~replay.guest.memory.GuestMemory` that replayed the
SNAPSHOT, TABLE_WRITE and WINDOW_OPEN events before FROM: **every known
frame** is snapshotted (not only the frames reachable from the current
roots: a frame known but unlinked at FROM may be linked, or loaded into CR3,
later, and the plugin would not snapshot it again). The A/D bits the
replayer's own walks set before FROM are not in these pages; walks in the
cut set them again (no check looks at them). The CR3 of each vCPU is its last
CR3_WRITE / CR3_CURRENT before FROM in the current window (vCPUs with none
get no CR3_CURRENT). WINDOW_OPEN carries the window number open at FROM, so
a WINDOW_CLOSE inside the range still matches it.

The state prefix resets the engine (WINDOW_OPEN empties the shadow pool, as
after any window open), so the shadow state at FROM is *not* carried: a cut
that starts in the middle of a window replays guest-table state exactly but
rebuilds shadows from nothing.

**Carried markers.** ``kernel`` and ``module`` markers outside the range are
kept (symbols need them; the capture writes module markers at the end, after
``stop``). ``secure-*`` markers before FROM and after the last ``secure-end``
before FROM are kept too, so registrations live at FROM still hold (a
``secure-va`` is then walked on the tables at FROM, not at its original
event). Those before FROM follow the state prefix, in their original order;
those after TO (symbol markers only) end the cut.

The state prefix and carried markers form a chunk of their own (the
replayer reads the engine's vCPU list once per chunk, and WINDOW_OPEN
replaces that list, so a window opening mid-chunk hides the CR3s from the
C7 cross-check for the rest of that chunk).

Index mapping: original event ``i`` in the range is event
``i - FROM + base`` of the cut, ``base = options["cut_base"]`` (the number
of events before it: the prefix and the carried markers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UsageError
from ..guest.memory import PAGE_SHIFT, GuestMemory
from . import format as fmt
from .reader import Chunk, TraceReader
from .symtab import TraceSymbols
from .writer import TraceWriter

_K = fmt.Kind
_SNAPSHOT, _MARKER, _TABLE_WRITE = int(_K.SNAPSHOT), int(_K.MARKER), int(_K.TABLE_WRITE)
_WINDOW_OPEN, _WINDOW_CLOSE = int(_K.WINDOW_OPEN), int(_K.WINDOW_CLOSE)
_CR3_KINDS = (int(_K.CR3_WRITE), int(_K.CR3_CURRENT))
_UNTRACK = int(_K.UNTRACK)
#: Kinds that change what the state prefix must say.
_STATE_KINDS = np.array(
    [_SNAPSHOT, _TABLE_WRITE, _UNTRACK, _WINDOW_OPEN, _WINDOW_CLOSE, *_CR3_KINDS, _MARKER],
    dtype=np.uint8,
)
#: Marker names kept from outside the range (symbols).
SYMBOL_MARKERS = (fmt.MARKER_KERNEL, fmt.MARKER_MODULE)
SECURE_MARKERS = (fmt.MARKER_SECURE_FRAME, fmt.MARKER_SECURE_ROOT, fmt.MARKER_SECURE_VA)


@dataclass
class CutResult:
    """What :func:`cut_trace` wrote."""

    out: Path
    first: int  # original index of the first event of the range
    end: int  # original index after the last event of the range
    base: int  # index in the cut of original event ``first``
    events: int  # events written in all
    snapshots: int  # frames in the state prefix
    cr3: dict[int, int]  # vCPU -> CR3 of the prefix


def marker_name(marker: list[str]) -> str:
    words = marker[0].split() if marker else []
    return words[0] if words else ""


def _matches(marker: list[str], wanted: str) -> bool:
    return marker_name(marker) == wanted or " ".join(marker) == wanted


def parse_events(text: str) -> tuple[int, int | None]:
    """``FROM:TO`` (half-open; TO may be empty) -> (FROM, TO or None)."""
    head, sep, tail = text.partition(":")
    try:
        first = int(head, 0)
        end = int(tail, 0) if tail.strip() else None
    except ValueError:
        raise UsageError(f"--events {text!r}: expected FROM:TO (event indexes)") from None
    if not sep or first < 0 or (end is not None and end <= first):
        raise UsageError(f"--events {text!r}: expected FROM:TO with 0 <= FROM < TO")
    return first, end


class _CutWriter(TraceWriter):
    """TraceWriter that also takes slices of decoded chunks in bulk."""

    def append_slice(self, chunk: Chunk, lo: int, hi: int) -> None:
        """Append events ``lo .. hi-1`` of ``chunk`` (indexes in the chunk)."""
        while lo < hi:
            room = fmt.CHUNK_EVENTS - len(self._rows["kind"])
            stop = min(hi, lo + room)
            self._append(chunk, lo, stop)
            lo = stop
            if len(self._rows["kind"]) >= fmt.CHUNK_EVENTS:
                self.flush()

    def _append(self, chunk: Chunk, lo: int, hi: int) -> None:
        kind = chunk.kind[lo:hi]
        val = chunk.val[lo:hi].copy()
        for i in np.flatnonzero(kind == _SNAPSHOT).tolist():
            self._pages.append(chunk.page(int(val[i])))
            val[i] = len(self._pages) - 1
        for i in np.flatnonzero(kind == _MARKER).tolist():
            self._markers.append(list(chunk.markers[int(val[i])]))
            val[i] = len(self._markers) - 1
        for name in fmt.COLUMNS:
            col = val if name == "val" else getattr(chunk, name)[lo:hi]
            self._rows[name].extend(col.tolist())
        counts = np.bincount(kind, minlength=256)
        for k in np.flatnonzero(counts).tolist():
            self.by_kind[k] = self.by_kind.get(k, 0) + int(counts[k])
        n_access = int(counts[list(fmt.ACCESS_KINDS)].sum())
        self.counts["seen"] += n_access
        self.counts["recorded"] += n_access
        self.counts["tables"] += int(counts[_SNAPSHOT])


class _State:
    """What the replay's guest model knows, up to the current event."""

    def __init__(self) -> None:
        self.guest = GuestMemory()
        self.cr3: dict[int, int] = {}
        self.window: int | None = None  # open window's number
        self.last_window = -1
        self.window_events = False
        #: (vcpu, pc, marker) of the markers to carry: symbol markers and
        #: secure-* markers since the last secure-end, in their order.
        self.carried: list[tuple[int, int, list[str]]] = []

    def apply(self, chunk: Chunk, lo: int, hi: int) -> None:
        kind = chunk.kind[lo:hi]
        rows = np.flatnonzero(np.isin(kind, _STATE_KINDS)) + lo
        guest = self.guest
        for k, vcpu, pa, pc, val in zip(
            chunk.kind[rows].tolist(), chunk.vcpu[rows].tolist(),
            chunk.pa[rows].tolist(), chunk.pc[rows].tolist(), chunk.val[rows].tolist(),
            strict=True,
        ):
            if k == _TABLE_WRITE:
                guest.write(pa, val)
            elif k == _SNAPSHOT:
                guest.snapshot(pa >> PAGE_SHIFT, chunk.page(val))
            elif k == _UNTRACK:
                guest.forget(pa >> PAGE_SHIFT)
            elif k in _CR3_KINDS:
                self.cr3[vcpu] = val
            elif k == _WINDOW_OPEN:
                guest.forget_all()
                self.cr3.clear()
                self.window = self.last_window = val
                self.window_events = True
            elif k == _WINDOW_CLOSE:
                self.window = None
                self.window_events = True
            elif k == _MARKER:
                self.marker(vcpu, pc, chunk.markers[val])

    def marker(self, vcpu: int, pc: int, marker: list[str]) -> None:
        name = marker_name(marker)
        if name in SYMBOL_MARKERS or name in SECURE_MARKERS:
            self.carried.append((vcpu, pc, marker))
        elif name == fmt.MARKER_SECURE_END:
            self.carried = [c for c in self.carried if marker_name(c[2]) in SYMBOL_MARKERS]

    def prefix_needed(self) -> bool:
        if self.window is not None:
            return True
        return not self.window_events and bool(self.guest.frames or self.cr3)


def cut_trace(
    src: str | Path,
    out: str | Path,
    *,
    events: tuple[int, int | None] | None = None,
    from_marker: str | None = None,
    to_marker: str | None = None,
    level: int = 3,
) -> CutResult:
    """Write the cut of ``src`` to ``out`` (see the module); UsageError on a
    bad range (nothing is left at ``out`` then)."""
    if (events is None) == (from_marker is None and to_marker is None):
        raise UsageError("give either --events FROM:TO or --from-marker A --to-marker B")
    if events is None and (from_marker is None or to_marker is None):
        raise UsageError("--from-marker and --to-marker go together")
    out = Path(out)
    tmp = out.with_name(out.name + ".partial")
    try:
        result = _cut(Path(src), out, tmp, events, from_marker, to_marker, level)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)
    return result


def _find_range(
    src: Path, from_marker: str, to_marker: str
) -> tuple[int, int]:
    first: int | None = None
    with TraceReader(src) as reader:
        for chunk in reader:
            for i in np.flatnonzero(chunk.kind == _MARKER).tolist():
                marker = chunk.markers[int(chunk.val[i])]
                if first is None:
                    if _matches(marker, from_marker):
                        first = chunk.first + i
                elif _matches(marker, to_marker):
                    return first, chunk.first + i + 1
    if first is None:
        raise UsageError(f"{src}: no marker {from_marker!r}")
    raise UsageError(f"{src}: no marker {to_marker!r} after marker {from_marker!r}")


def _cut(
    src: Path, out: Path, tmp: Path, events: tuple[int, int | None] | None,
    from_marker: str | None, to_marker: str | None, level: int,
) -> CutResult:
    if events is not None:
        first, end_opt = events
    else:
        assert from_marker is not None and to_marker is not None
        first, end_opt = _find_range(src, from_marker, to_marker)
    state = _State()
    with TraceReader(src) as reader:
        header: dict[str, Any] = reader.header
        footer_total = None
        chunks = iter(reader)
        writer: _CutWriter | None = None
        result: CutResult | None = None
        for chunk in chunks:
            c0, c1 = chunk.first, chunk.first + chunk.n
            end = c1 if end_opt is None else end_opt
            if writer is None:
                # still before FROM: learn state
                if c1 <= first:
                    state.apply(chunk, 0, chunk.n)
                    continue
                state.apply(chunk, 0, first - c0)
                writer, result = _open(tmp, out, header, reader.symbols, state, first,
                                       end_opt, level)
            lo, hi = max(first, c0) - c0, min(end, c1) - c0
            if lo < hi:
                writer.append_slice(chunk, lo, hi)
            if end < c1:
                # after TO: only symbol markers
                tail = _State()
                tail.apply(chunk, max(end, c0) - c0, chunk.n)
                for vcpu, pc, marker in tail.carried:
                    if marker_name(marker) in SYMBOL_MARKERS:
                        writer.marker(*marker, vcpu=vcpu, pc=pc)
        footer_total = reader.events
        if writer is None or result is None:
            raise UsageError(
                f"{src}: FROM {first} is past the trace's end ({footer_total} events)")
        if end_opt is not None and end_opt > footer_total:
            writer.close()
            raise UsageError(
                f"{src}: TO {end_opt} is past the trace's end ({footer_total} events)")
        src_footer = reader.footer or {}
        writer.counts["dropped"] = int(src_footer.get("dropped", 0))
        writer.close()
        result.end = end_opt if end_opt is not None else footer_total
        result.events = writer.events
        return result


def _open(
    tmp: Path, out: Path, header: dict[str, Any], symbols: TraceSymbols | None,
    state: _State, first: int, end: int | None, level: int,
) -> tuple[_CutWriter, CutResult]:
    """Open the output and write the state prefix and carried markers."""
    prefix = state.prefix_needed()
    frames = sorted(state.guest.frames) if prefix else []
    cr3 = dict(sorted(state.cr3.items())) if prefix else {}
    base = (1 + len(cr3) + len(frames) if prefix else 0) + len(state.carried)
    options = {str(k): str(v) for k, v in dict(header.get("options") or {}).items()}
    options["cut"] = f"{first}:{'' if end is None else end}"
    options["cut_base"] = str(base)
    writer = _CutWriter(
        tmp, scenario=str(header.get("scenario", "")), vcpus=int(header.get("vcpus") or 1),
        ram_bytes=int(header.get("ram_bytes") or 0), kernel=str(header.get("kernel", "")),
        qemu=str(header.get("qemu", "")), options=options, level=level, symbols=symbols,
    )
    if prefix:
        window = state.window if state.window is not None else max(state.last_window, 0)
        writer.event(_K.WINDOW_OPEN, val=window)
        for vcpu, value in cr3.items():
            writer.event(_K.CR3_CURRENT, vcpu=vcpu, val=value)
        for frame in frames:
            writer.snapshot(frame << PAGE_SHIFT, bytes(state.guest.frames[frame]))
    for vcpu, pc, marker in state.carried:
        writer.marker(*marker, vcpu=vcpu, pc=pc)
    # the prefix is a chunk of its own: the replayer takes the engine's vCPU
    # list once per chunk, and WINDOW_OPEN replaces it
    writer.flush()
    assert writer.events == base
    return writer, CutResult(out=out, first=first, end=-1, base=base, events=0,
                             snapshots=len(frames), cr3=cr3)
