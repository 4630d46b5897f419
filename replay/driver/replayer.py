"""Drive a trace through the guest model and the shadow engine.

:class:`Replayer` takes chunks (from :class:`~replay.trace.reader.TraceReader` or
any iterable of :class:`~replay.trace.reader.Chunk`) and feeds their events, in
order, to a :class:`~replay.shadow.engine.ShadowEngine`. Before the per-event loop
each chunk is filtered with numpy:

**Canonical dedup.** The capture plugin may drop an access when the same
vCPU already made one of the same kind (READ/WRITE/FETCH, user/kernel) to
the same 4 KiB page since the last event that can change a translation
(CR3/CR4 writes, TABLE_WRITE, INVLPG, INVPCID, window changes, and here also
CR3_CURRENT). Its cache is small and direct-mapped, so it keeps some repeats
and drops others. The replayer drops *every* such repeat, except a WRITE
immediately followed by a TABLE_WRITE (a store into a table frame, which the
plugin never drops). A trace captured with dedup on and the same run
captured with dedup off therefore reach the engine as the same event
sequence, and give the same results. Dropping a repeat is safe for the
engine: between two translation-changing events the second identical access
finds the shadows the first one left (only other accesses ran in between).

**Fast path.** Runs of accesses the engine already allowed are taken in
bulk (:mod:`replay.driver.fastpath`); the results are the same as event by
event (``Replayer(fast=False)``). Event tools (:mod:`replay.driver.tools`:
the checks, the plot's counters) are told the events the engine handles
and the bulk accesses they ask for.

**Translation cross-check (C7).** For every access that reaches the engine
and whose walk is known, the guest-physical page the trace recorded is
compared with the walk of the reconstructed tables (before the engine sees
the access); a dropped repeat is compared with the first access of its
group, which must have had the same translation. On a correct trace the
mismatch count is 0.
"""

from __future__ import annotations

import gc
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..guest.memory import PAGE_SHIFT, TRANSLATE_UNKNOWN, TRANSLATE_UNMAPPED
from ..shadow.config import EngineConfig
from ..shadow.engine import ShadowEngine
from ..trace import format as fmt
from ..trace.prefetch import Prefetch
from ..trace.reader import Chunk, TraceReader
from .fastpath import FastPath
from .tools import EventTool, ToolSet

#: Kinds that bump the plugin's dedup epoch (plus CR3_CURRENT, conservatively).
EPOCH_KINDS: tuple[int, ...] = tuple(int(k) for k in (
    fmt.Kind.CR3_WRITE, fmt.Kind.TABLE_WRITE, fmt.Kind.INVLPG, fmt.Kind.INVPCID,
    fmt.Kind.CR4_WRITE, fmt.Kind.WINDOW_OPEN, fmt.Kind.WINDOW_CLOSE, fmt.Kind.CR3_CURRENT,
    fmt.Kind.UNTRACK,
))
#: kind -> bumps the epoch, as a lookup table (faster than np.isin).
_EPOCH_LUT = np.zeros(256, dtype=bool)
_EPOCH_LUT[list(EPOCH_KINDS)] = True
_READ, _WRITE, _FETCH = int(fmt.Kind.READ), int(fmt.Kind.WRITE), int(fmt.Kind.FETCH)
_TABLE_WRITE = int(fmt.Kind.TABLE_WRITE)
_SNAPSHOT = int(fmt.Kind.SNAPSHOT)
_MARKER = int(fmt.Kind.MARKER)
_WINDOW_OPEN = int(fmt.Kind.WINDOW_OPEN)

#: Access key of dedup: page << 12 | vcpu << 4 | kind << 1 | user (see
#: :func:`_access_keys`).
AccessKey = int
_PAGE_BITS = np.uint64(~((1 << PAGE_SHIFT) - 1) & (2**64 - 1))
#: Odd multipliers of the grouping fingerprint (see :func:`_groups`).
_FP_KEY = np.uint64(0x9E3779B97F4A7C15)
_FP_SEG = np.uint64(0xC2B2AE3D27D4EB4F)
_POS_BITS = 16
_POS_MASK = np.uint64((1 << _POS_BITS) - 1)


def _access_keys(chunk: Chunk, idx: npt.NDArray[np.intp]) -> npt.NDArray[np.uint64]:
    """The dedup key of the accesses ``idx``: (page, vCPU, kind, user) in
    one 64-bit number, page << 12 | vcpu << 4 | kind << 1 | user."""
    key = chunk.va[idx] & _PAGE_BITS
    key |= chunk.vcpu[idx].astype(np.uint64) << np.uint64(4)
    key |= chunk.kind[idx].astype(np.uint64) << np.uint64(1)
    key |= ((chunk.info[idx] & fmt.INFO_USER) != 0).astype(np.uint64)
    return key


def _groups(
    seg: npt.NDArray[np.intp], key: npt.NDArray[np.uint64]
) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.bool_]]:
    """Group the accesses by (segment, key): their positions ordered by
    group, then position; and which of them starts a group.

    One sort of a number per access: a 48-bit fingerprint of (segment, key)
    above the position. Equal groups have equal fingerprints; if two groups
    share one (rare), the check below sees it and an exact lexicographic
    sort is used instead, so the result is always exact."""
    m = len(key)
    if m == 0:
        return np.zeros(0, dtype=np.intp), np.zeros(0, dtype=bool)
    first = np.empty(m, dtype=bool)
    first[0] = True
    if m <= 1 << _POS_BITS:
        fp = key * _FP_KEY
        fp += seg.astype(np.uint64) * _FP_SEG
        fp &= ~_POS_MASK
        fp |= np.arange(m, dtype=np.uint64)
        fp.sort()
        order = (fp & _POS_MASK).astype(np.intp)
        fp >>= np.uint64(_POS_BITS)
        np.not_equal(fp[1:], fp[:-1], out=first[1:])
        s_key, s_seg = key[order], seg[order]
        same = (s_key[1:] == s_key[:-1]) & (s_seg[1:] == s_seg[:-1])
        if np.array_equal(same, ~first[1:]):
            return order, first
    order = np.lexsort((key, seg))  # stable: equal keys by position
    s_key, s_seg = key[order], seg[order]
    first[1:] = (s_key[1:] != s_key[:-1]) | (s_seg[1:] != s_seg[:-1])
    return order, first


#: While a trace replays, the collector's youngest generation is collected
#: after this many new container objects (not 700, the default).
GC_YOUNG = 50_000


@contextmanager
def fewer_collections() -> Iterator[None]:
    """Collect the youngest generation less often while a trace replays
    (thresholds as before afterwards). A replay makes lists as long as a
    chunk (its columns), which every collection of the young generations
    walks again while they live, and next to no reference cycles: at the
    default threshold the collector took 6-9% of a replay's time."""
    old = gc.get_threshold()
    gc.set_threshold(max(GC_YOUNG, old[0]), *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


@dataclass(frozen=True)
class Mismatch:
    """One C7 finding: the trace's pa differs from the model's walk."""

    event: int
    vcpu: int
    va: int
    trace_pa: int
    #: The model's address, or TRANSLATE_UNMAPPED.
    model_pa: int


@dataclass
class ReplayStats:
    """What the replayer did (input side; the engine keeps its own)."""

    chunks: int = 0
    events: int = 0
    accesses: int = 0
    #: Accesses dropped as repeats before the engine.
    deduplicated: int = 0
    #: C7: accesses compared, and how many differed / were unknown.
    translations_checked: int = 0
    translation_mismatches: int = 0
    translations_unknown: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    #: (event, vcpu, [name, args...]) of every MARKER, in order.
    markers: list[tuple[int, int, list[str]]] = field(default_factory=list)


class Replayer(FastPath):
    """Feed chunks to an engine, filtering repeats and cross-checking walks.

    :param engine: the engine to drive (a default one if omitted).
    :param dedup: drop repeated accesses (canonical dedup, see the module).
    :param check_translation: run the C7 cross-check.
    :param max_mismatches: how many :class:`Mismatch` samples to keep.
    :param fast: take runs of accesses the engine already allowed in bulk
        (the fast path, see the module). False feeds every event that
        survives dedup one by one and tells every tool every event: the
        reference the tests compare the fast path with.
    :param tools: event tools (:mod:`replay.driver.tools`); more with
        :meth:`add_tool`.
    """

    def __init__(
        self,
        engine: ShadowEngine | None = None,
        *,
        dedup: bool = True,
        check_translation: bool = True,
        max_mismatches: int = 1000,
        fast: bool = True,
        tools: Iterable[EventTool] = (),
    ) -> None:
        self.engine = engine if engine is not None else ShadowEngine()
        self.dedup = dedup
        self.check_translation = check_translation
        self.max_mismatches = max_mismatches
        self.fast = fast
        self.tools = ToolSet(tools)
        #: Accesses the fast path took in bulk, without calling the engine
        #: (a diagnostic, not a result: it differs between the two paths).
        self.bulk_accesses = 0
        self.stats = ReplayStats()
        #: Keys seen in the segment still open at the end of the last chunk.
        self._open: set[AccessKey] = set()
        #: Fast path: access keys found allowed, per engine access token
        #: (all of one ``restrict_gen``) ...
        self._allowed: dict[tuple[object, ...], set[int]] = {}
        self._allowed_gen = -1
        #: Shadow entry (key, index), or shadow (key, -1) -> the (set, key)
        #: entries relying on it (ShadowEngine.leaf_log).
        self._by_leaf: defaultdict[tuple[object, int], list[tuple[set[int], int]]] = (
            defaultdict(list))
        self._by_leaf_n = 0
        #: ... and translation keys that matched, per (layout, CR3s).
        self._matched: dict[tuple[object, ...], set[int | bytes]] = {}
        self._matched_layout = -1
        #: ... the matched keys resting on each entry / frame their walks
        #: read (:meth:`GuestMemory.entry_id` / ``frame_id`` -> (set, key)),
        #: so a table change drops only the translations through it ...
        self._walked: defaultdict[int, list[tuple[set[int | bytes], int | bytes]]] = (
            defaultdict(list))
        self._walked_n = 0
        #: ... and whether the engine was called since the allowed set
        #: (``_ok_a``) was looked up.
        self._stale = True
        self._ok_a: set[int] = set()
        #: The matched set last handed out, and the vCPU list it was for.
        self._ok_c: set[int | bytes] = set()
        self._ok_c_vcpus: list[Any] | None = None
        #: Whether the last look-up handed out the sets of the one before,
        #: none of their keys dropped since.
        self._kept = False

    def add_tool(self, tool: EventTool) -> None:
        """Tell ``tool`` the events (see :mod:`replay.driver.tools`); once."""
        self.tools.add(tool)

    # -- driving ---------------------------------------------------------
    def run(self, chunks: Iterable[Chunk]) -> ReplayStats:
        """Replay every chunk (with one chunk of look-ahead). A
        :class:`TraceReader` decodes the next chunks in a background thread
        meanwhile (:class:`~replay.trace.prefetch.Prefetch`)."""
        with fewer_collections():
            if isinstance(chunks, TraceReader):
                with Prefetch(chunks) as ahead:
                    self._run(ahead)
            else:
                self._run(chunks)
        return self.stats

    def _run(self, chunks: Iterable[Chunk]) -> None:
        it: Iterator[Chunk] = iter(chunks)
        cur = next(it, None)
        while cur is not None:
            nxt = next(it, None)
            following = int(nxt.kind[0]) if nxt is not None and nxt.n else None
            self.feed(cur, following)
            cur = nxt

    def feed(self, chunk: Chunk, next_kind: int | None = None) -> None:
        """Replay one chunk; ``next_kind`` is the kind of the event after
        its last one (None at the end of the trace)."""
        st = self.stats
        st.chunks += 1
        st.events += chunk.n
        if chunk.n == 0:
            return
        # the fact sinks, as they are now, say which facts the engine makes
        self.engine.facts_wanted()
        kind = chunk.kind
        is_access = kind <= _FETCH
        n_access = int(is_access.sum())
        st.accesses += n_access
        if not self.dedup:
            keep = np.ones(chunk.n, dtype=bool)
        elif n_access:
            keep = self._dedup_mask(chunk, is_access, next_kind)
        else:
            keep = np.ones(chunk.n, dtype=bool)
            if _EPOCH_LUT[kind].any():
                self._open = set()  # a translation may change: a new segment
        st.deduplicated += int(chunk.n - keep.sum())
        self._loop(chunk, np.flatnonzero(keep))

    # -- filtering -------------------------------------------------------
    def _dedup_mask(
        self, chunk: Chunk, is_access: npt.NDArray[np.bool_], next_kind: int | None
    ) -> npt.NDArray[np.bool_]:
        kind = chunk.kind
        n = chunk.n
        seg = np.cumsum(_EPOCH_LUT[kind])
        idx = np.flatnonzero(is_access)
        key = _access_keys(chunk, idx)
        aseg = seg[idx]
        order, first = _groups(aseg, key)
        if self.check_translation:
            # C7 for repeats: same translation as the group's first access.
            # When every repeat has its predecessor's, all have the first's.
            pa_page = (chunk.pa[idx] >> np.uint64(PAGE_SHIFT))[order]
            if (~first[1:] & (pa_page[1:] != pa_page[:-1])).any():
                self._repeat_mismatches(chunk, idx, aseg, order, first, pa_page)
        keep = ~is_access
        is_first = np.zeros(len(idx), dtype=bool)
        is_first[order[first]] = True
        keep[idx[is_first]] = True
        # a store into a table frame (WRITE right before a TABLE_WRITE) stays
        table_store = np.empty(n, dtype=bool)
        np.logical_and(kind[:-1] == _WRITE, kind[1:] == _TABLE_WRITE, out=table_store[:-1])
        table_store[-1] = kind[-1] == _WRITE and next_kind == _TABLE_WRITE
        keep |= table_store
        # segment 0 continues the segment left open by the previous chunk
        open_keys = self._open
        if open_keys:
            in0 = int(np.searchsorted(aseg, 1))  # accesses idx[:in0] are in segment 0
            first0 = np.flatnonzero(is_first[:in0] & ~table_store[idx[:in0]])
            for j, k in zip(first0.tolist(), key[first0].tolist(), strict=True):
                if k in open_keys:
                    keep[idx[j]] = False
        last_seg = int(seg[-1])
        if last_seg > 0:
            open_keys = set()
        tail = int(np.searchsorted(aseg, last_seg))  # accesses idx[tail:] are in it
        open_keys.update(key[tail:][is_first[tail:]].tolist())
        self._open = open_keys
        return keep

    def _repeat_mismatches(
        self, chunk: Chunk, idx: npt.NDArray[np.intp], aseg: npt.NDArray[np.intp],
        order: npt.NDArray[np.intp], first: npt.NDArray[np.bool_],
        pa_page: npt.NDArray[np.uint64],
    ) -> None:
        """C7 findings of repeats whose translation differs from their
        group's first access, reported by (segment, vCPU, kind, user, page,
        event)."""
        head = np.maximum.accumulate(np.where(first, np.arange(len(order)), 0))
        found = []
        for j in np.flatnonzero(~first & (pa_page != pa_page[head])).tolist():
            i, h = int(idx[order[j]]), int(idx[order[head[j]]])
            found.append(((int(aseg[order[j]]), int(chunk.vcpu[i]), int(chunk.kind[i]),
                           int(chunk.info[i]) & fmt.INFO_USER, int(chunk.va[i]) >> PAGE_SHIFT,
                           i), h))
        for (_, vcpu, _, _, _, i), h in sorted(found):
            self._mismatch(chunk.first + i, vcpu, int(chunk.va[i]), int(chunk.pa[i]),
                           int(chunk.pa[h]))

    # -- the per-event loop ------------------------------------------------
    def _loop(self, chunk: Chunk, rows: npt.NDArray[np.intp]) -> None:
        if self.fast and len(rows):
            self._loop_fast(chunk, rows)
            return
        eng = self.engine
        vcpus = eng.vcpus
        check = self.check_translation
        first = chunk.first
        hook = self.tools.tell if self.tools else None
        cols = zip(
            rows.tolist(), chunk.kind[rows].tolist(), chunk.vcpu[rows].tolist(),
            chunk.info[rows].tolist(), chunk.va[rows].tolist(), chunk.pa[rows].tolist(),
            chunk.pc[rows].tolist(), chunk.val[rows].tolist(), strict=True,
        )
        for i, kind, vcpu, info, va, pa, pc, val in cols:
            index = first + i
            if kind <= _FETCH:
                if check:
                    self._c7(index, vcpu, va, pa, vcpus)
                eng.access(index, vcpu, kind, va, info, pa)
            else:
                self._other(chunk, index, kind, vcpu, info, va, pa, pc, val)
                if kind == _WINDOW_OPEN:
                    vcpus = eng.vcpus  # the window replaced the vCPU list
            if hook is not None:
                hook(index, kind, vcpu, info, va, pa, val,
                     chunk.markers[val] if kind == _MARKER else None)

    def _other(self, chunk: Chunk, index: int, kind: int, vcpu: int, info: int, va: int,
               pa: int, pc: int, val: int) -> None:
        """Feed one event that is not an access."""
        eng = self.engine
        if kind == _SNAPSHOT:
            eng.process(kind, index, vcpu, info, va, pa, pc, val, chunk.page(val))
        elif kind == _MARKER:
            marker = chunk.markers[val]
            self.stats.markers.append((index, vcpu, marker))
            eng.process(kind, index, vcpu, info, va, pa, pc, val, None, marker)
        else:
            eng.process(kind, index, vcpu, info, va, pa, pc, val)

    def _c7(self, index: int, vcpu: int, va: int, pa: int, vcpus: Sequence[Any],
            walked: list[int] | None = None) -> bool:
        """Cross-check one access (C7): the model's walk of the guest tables
        under the vCPU's CR3 against the trace's PA. True when they agree;
        ``walked``, if given, gets the entries the walk read."""
        st = self.stats
        cr3 = vcpus[vcpu].cr3 if vcpu < len(vcpus) else None
        model = (TRANSLATE_UNKNOWN if cr3 is None
                 else self.engine.guest.translate(cr3, va, walked))
        if model == TRANSLATE_UNKNOWN:
            st.translations_unknown += 1
            return False
        st.translations_checked += 1
        if model == TRANSLATE_UNMAPPED or model >> PAGE_SHIFT != pa >> PAGE_SHIFT:
            self._mismatch(index, vcpu, va, pa, model)
            return False
        return True

    def _mismatch(self, event: int, vcpu: int, va: int, trace_pa: int, model_pa: int) -> None:
        st = self.stats
        st.translation_mismatches += 1
        if len(st.mismatches) < self.max_mismatches:
            st.mismatches.append(Mismatch(event, vcpu, va, trace_pa, model_pa))


def replay_file(
    path: str | Path,
    config: EngineConfig | None = None,
    *,
    dedup: bool = True,
    allow_truncated: bool = False,
) -> tuple[ShadowEngine, ReplayStats]:
    """Replay a whole trace file; the config's vCPU count and RAM size
    default to the trace header's when no config is given."""
    with TraceReader(path, allow_truncated=allow_truncated) as reader:
        if config is None:
            config = EngineConfig.for_trace(reader.header)
        replayer = Replayer(ShadowEngine(config), dedup=dedup)
        stats = replayer.run(reader)
        return replayer.engine, stats
