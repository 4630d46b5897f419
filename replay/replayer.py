"""Drive a trace through the guest model and the shadow engine.

:class:`Replayer` takes chunks (from :class:`~replay.reader.TraceReader` or
any iterable of :class:`~replay.reader.Chunk`) and feeds their events, in
order, to a :class:`~replay.engine.ShadowEngine`. Before the per-event loop
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

**Translation cross-check (C7).** For every access that reaches the engine
and whose walk is known, the guest-physical page the trace recorded is
compared with the walk of the reconstructed tables (before the engine sees
the access); a dropped repeat is compared with the first access of its
group, which must have had the same translation. On a correct trace the
mismatch count is 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from . import format as fmt
from .config import EngineConfig
from .engine import ShadowEngine
from .guest import PAGE_SHIFT, TRANSLATE_UNKNOWN, TRANSLATE_UNMAPPED
from .reader import Chunk, TraceReader

#: Kinds that bump the plugin's dedup epoch (plus CR3_CURRENT, conservatively).
EPOCH_KINDS: tuple[int, ...] = tuple(int(k) for k in (
    fmt.Kind.CR3_WRITE, fmt.Kind.TABLE_WRITE, fmt.Kind.INVLPG, fmt.Kind.INVPCID,
    fmt.Kind.CR4_WRITE, fmt.Kind.WINDOW_OPEN, fmt.Kind.WINDOW_CLOSE, fmt.Kind.CR3_CURRENT,
))
_READ, _WRITE, _FETCH = int(fmt.Kind.READ), int(fmt.Kind.WRITE), int(fmt.Kind.FETCH)
_TABLE_WRITE = int(fmt.Kind.TABLE_WRITE)
_SNAPSHOT = int(fmt.Kind.SNAPSHOT)
_MARKER = int(fmt.Kind.MARKER)

#: Access key within a segment: (vcpu, kind, user, page).
AccessKey = tuple[int, int, int, int]


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


class Replayer:
    """Feed chunks to an engine, filtering repeats and cross-checking walks.

    :param engine: the engine to drive (a default one if omitted).
    :param dedup: drop repeated accesses (canonical dedup, see the module).
    :param check_translation: run the C7 cross-check.
    :param max_mismatches: how many :class:`Mismatch` samples to keep.
    """

    def __init__(
        self,
        engine: ShadowEngine | None = None,
        *,
        dedup: bool = True,
        check_translation: bool = True,
        max_mismatches: int = 1000,
    ) -> None:
        self.engine = engine if engine is not None else ShadowEngine()
        self.dedup = dedup
        self.check_translation = check_translation
        self.max_mismatches = max_mismatches
        self.stats = ReplayStats()
        #: Keys seen in the segment still open at the end of the last chunk.
        self._open: set[AccessKey] = set()

    # -- driving ---------------------------------------------------------
    def run(self, chunks: Iterable[Chunk]) -> ReplayStats:
        """Replay every chunk (with one chunk of look-ahead)."""
        it: Iterator[Chunk] = iter(chunks)
        cur = next(it, None)
        while cur is not None:
            nxt = next(it, None)
            following = int(nxt.kind[0]) if nxt is not None and nxt.n else None
            self.feed(cur, following)
            cur = nxt
        return self.stats

    def feed(self, chunk: Chunk, next_kind: int | None = None) -> None:
        """Replay one chunk; ``next_kind`` is the kind of the event after
        its last one (None at the end of the trace)."""
        st = self.stats
        st.chunks += 1
        st.events += chunk.n
        if chunk.n == 0:
            return
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
            if np.isin(kind, EPOCH_KINDS).any():
                self._open = set()  # a translation may change: a new segment
        st.deduplicated += int(chunk.n - keep.sum())
        self._loop(chunk, np.flatnonzero(keep))

    # -- filtering -------------------------------------------------------
    def _dedup_mask(
        self, chunk: Chunk, is_access: npt.NDArray[np.bool_], next_kind: int | None
    ) -> npt.NDArray[np.bool_]:
        kind = chunk.kind
        n = chunk.n
        seg = np.cumsum(np.isin(kind, EPOCH_KINDS))
        idx = np.flatnonzero(is_access)
        page = chunk.va[idx] >> np.uint64(PAGE_SHIFT)
        user = (chunk.info[idx] & fmt.INFO_USER) != 0
        small = (
            (seg[idx].astype(np.uint64) << np.uint64(16))
            | (chunk.vcpu[idx].astype(np.uint64) << np.uint64(8))
            | (kind[idx].astype(np.uint64) << np.uint64(1))
            | user.astype(np.uint64)
        )
        order = np.lexsort((idx, page, small))
        s_small, s_page, s_idx = small[order], page[order], idx[order]
        first_sorted = np.ones(len(idx), dtype=bool)
        first_sorted[1:] = (s_small[1:] != s_small[:-1]) | (s_page[1:] != s_page[:-1])
        # C7 for repeats: same translation as the group's first access
        if self.check_translation:
            head = np.maximum.accumulate(np.where(first_sorted, np.arange(len(idx)), 0))
            pa_page = chunk.pa[s_idx] >> np.uint64(PAGE_SHIFT)
            differs = ~first_sorted & (pa_page != pa_page[head])
            if differs.any():
                for j in np.flatnonzero(differs).tolist():
                    i = int(s_idx[j])
                    self._mismatch(chunk.first + i, int(chunk.vcpu[i]), int(chunk.va[i]),
                                   int(chunk.pa[i]), int(chunk.pa[s_idx[head[j]]]))
        keep = np.zeros(n, dtype=bool)
        keep[~is_access] = True
        keep[s_idx[first_sorted]] = True
        # a store into a table frame (WRITE right before a TABLE_WRITE) stays
        nxt = np.empty(n, dtype=np.int16)
        nxt[:-1] = kind[1:]
        nxt[-1] = -1 if next_kind is None else next_kind
        keep |= (kind == _WRITE) & (nxt == _TABLE_WRITE)
        # segment 0 continues the segment left open by the previous chunk
        open_keys = self._open
        firsts0 = np.flatnonzero(keep & is_access & (seg == 0))
        if open_keys and len(firsts0):
            for i in firsts0.tolist():
                if nxt[i] == _TABLE_WRITE and kind[i] == _WRITE:
                    continue
                key = self._key(chunk, i)
                if key in open_keys:
                    keep[i] = False
        last_seg = int(seg[-1])
        if last_seg > 0:
            open_keys = set()
        tail = np.flatnonzero(is_access & (seg == last_seg))
        open_keys.update(self._key(chunk, i) for i in tail.tolist())
        self._open = open_keys
        return keep

    @staticmethod
    def _key(chunk: Chunk, i: int) -> AccessKey:
        return (int(chunk.vcpu[i]), int(chunk.kind[i]),
                int(chunk.info[i]) & fmt.INFO_USER, int(chunk.va[i]) >> PAGE_SHIFT)

    # -- the per-event loop ------------------------------------------------
    def _loop(self, chunk: Chunk, rows: npt.NDArray[np.intp]) -> None:
        eng = self.engine
        guest = eng.guest
        vcpus = eng.vcpus
        check = self.check_translation
        st = self.stats
        first = chunk.first
        hook = eng.after_event
        cols = zip(
            rows.tolist(), chunk.kind[rows].tolist(), chunk.vcpu[rows].tolist(),
            chunk.info[rows].tolist(), chunk.va[rows].tolist(), chunk.pa[rows].tolist(),
            chunk.pc[rows].tolist(), chunk.val[rows].tolist(), strict=True,
        )
        for i, kind, vcpu, info, va, pa, pc, val in cols:
            index = first + i
            if kind <= _FETCH:
                if check:
                    cr3 = vcpus[vcpu].cr3 if vcpu < len(vcpus) else None
                    model = TRANSLATE_UNKNOWN if cr3 is None else guest.translate(cr3, va)
                    if model == TRANSLATE_UNKNOWN:
                        st.translations_unknown += 1
                    else:
                        st.translations_checked += 1
                        if model == TRANSLATE_UNMAPPED or model >> PAGE_SHIFT != pa >> PAGE_SHIFT:
                            self._mismatch(index, vcpu, va, pa, model)
                eng.access(index, vcpu, kind, va, info, pa)
            elif kind == _SNAPSHOT:
                eng.process(kind, index, vcpu, info, va, pa, pc, val, chunk.page(val))
            elif kind == _MARKER:
                marker = chunk.markers[val]
                st.markers.append((index, vcpu, marker))
                eng.process(kind, index, vcpu, info, va, pa, pc, val, None, marker)
            else:
                eng.process(kind, index, vcpu, info, va, pa, pc, val)
            if hook is not None:
                hook(index, kind, vcpu, info, va, pa, val,
                     chunk.markers[val] if kind == _MARKER else None)

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
            header = reader.header
            config = EngineConfig(
                vcpus=max(1, int(header.get("vcpus") or 1)),
                ram_mib=max(1, int(header.get("ram_bytes") or (512 << 20)) >> 20),
            )
        replayer = Replayer(ShadowEngine(config), dedup=dedup)
        stats = replayer.run(reader)
        return replayer.engine, stats
