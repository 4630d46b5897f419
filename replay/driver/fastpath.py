"""The replayer's fast path: runs of accesses the engine already allowed, in bulk.

Accesses between two other events are taken in bulk when the engine
already found each of them allowed (same vCPU, kind, mode and page) on
the same roots with no restricting shadow change since
(:meth:`ShadowEngine.access_token`), and their translations already
matched the walk with the same CR3s and table layout: the engine
would change nothing but its counters and the vCPU's last store, so only
those are updated. The results are the same as event by event
(``Replayer(fast=False)`` feeds every event one by one; the tests compare
the two after every chunk). Event tools (:mod:`replay.driver.tools`) are
told every event the engine handles (an access only when the engine did not
find it allowed, or an MMIO one), and the bulk or allowed accesses their
interest names (selected with numpy over spans of the chunk, kept while the
interest stays).

:class:`FastPath` is a part of :class:`~replay.driver.replayer.Replayer`,
which holds the state it uses (declared below for the type checker).
"""

from __future__ import annotations

from bisect import bisect_left
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..guest.memory import PAGE_SHIFT
from ..shadow.engine import ShadowEngine
from ..shadow.types import Key, VCpu
from ..trace import format as fmt
from ..trace.reader import Chunk
from .tools import ToolSet

if TYPE_CHECKING:
    from .replayer import ReplayStats

_READ, _WRITE, _FETCH = int(fmt.Kind.READ), int(fmt.Kind.WRITE), int(fmt.Kind.FETCH)
_WINDOW_OPEN = int(fmt.Kind.WINDOW_OPEN)
_MARKER = int(fmt.Kind.MARKER)
_TABLE_WRITE = int(fmt.Kind.TABLE_WRITE)
#: Fast path: runs of at most this many accesses between other events are
#: taken one by one (cheaper than in bulk when short).
_SHORT_RUN = 8
#: Fast path: the bulk accesses the tools want are selected (numpy) over
#: spans of at least this many events of a chunk, kept while their
#: interest stays the same.
_SELECT_SPAN = 4096
#: Fast path: the matched translations (allowed accesses) are dropped all at
#: once when their walks' entries noted (``_walked``; their shadow paths:
#: ``_by_leaf``) pass this many (bounds their memory).
_WALKED_MAX = 1 << 20


def _not_in(known: set[Any], keys: list[Any], lo: int, hi: int) -> list[int]:
    """Positions ``lo .. hi-1`` whose key is not in ``known``, in order."""
    part = keys[lo:hi]
    if known.issuperset(part):
        return []
    # one pass of look-ups, then the misses found by list.index (in C)
    find = list(map(known.__contains__, part)).index
    out: list[int] = []
    k = -1
    try:
        while True:
            k = find(False, k + 1)
            out.append(lo + k)
    except ValueError:
        return out


#: Translation keys pack into one 64-bit number when the VA is canonical
#: with 48 bits (its page is then its low 36 bits) and the pa below 4 GiB.
_VA_TOP_SHIFT = np.uint64(47)
_VA_TOP_ALL = np.uint64((1 << 17) - 1)
_VPAGE_36 = np.uint64((1 << 36) - 1)


def _translation_keys(
    va: npt.NDArray[np.uint64], vcpu: npt.NDArray[np.uint8], pa: npt.NDArray[np.uint64],
    is_access: npt.NDArray[np.bool_],
) -> list[int | bytes]:
    """One key per event for (VA page, vCPU, pa page), equal exactly when
    the three are (for the accesses; other events' keys are not used): a
    64-bit number (VA page low 36 bits, pa page 20 bits, vCPU 8 bits) when
    every access of the chunk fits, else 16 bytes. The two forms never
    compare equal, so mixing them in one set is sound."""
    vpage = va >> np.uint64(PAGE_SHIFT)
    ppage = pa >> np.uint64(PAGE_SHIFT)
    top = (va >> _VA_TOP_SHIFT)[is_access]
    if (len(top) and ((top == 0) | (top == _VA_TOP_ALL)).all()
            and int(ppage[is_access].max()) < 1 << 20):
        packed = (vpage & _VPAGE_36) << np.uint64(28)
        packed |= ppage << np.uint64(8)
        packed |= vcpu.astype(np.uint64)
        keys: list[int | bytes] = packed.tolist()
        return keys
    pair = np.empty((len(va), 2), dtype=np.uint64)
    pair[:, 0] = (vpage << np.uint64(8)) | vcpu
    pair[:, 1] = ppage
    keys = pair.view("V16").ravel().tolist()
    return keys


class FastPath:
    """:meth:`Replayer._loop`'s bulk path (a part of :class:`~replay.driver.replayer.Replayer`)."""

    engine: ShadowEngine
    stats: ReplayStats
    check_translation: bool
    tools: ToolSet
    bulk_accesses: int
    _allowed: dict[tuple[object, ...], set[int]]
    _allowed_gen: int
    _by_leaf: defaultdict[tuple[object, int], list[tuple[set[int], int]]]
    _by_leaf_n: int
    _matched: dict[tuple[object, ...], set[int | bytes]]
    _matched_layout: int
    _walked: defaultdict[int, list[tuple[set[int | bytes], int | bytes]]]
    _walked_n: int
    _stale: bool
    _ok_a: set[int]
    _ok_c: set[int | bytes]
    _ok_c_vcpus: list[VCpu] | None
    _kept: bool

    if TYPE_CHECKING:
        def _c7(self, index: int, vcpu: int, va: int, pa: int,
                vcpus: Sequence[Any], walked: list[int] | None = None) -> bool: ...
        def _other(self, chunk: Chunk, index: int, kind: int, vcpu: int, info: int,
                   va: int, pa: int, pc: int, val: int) -> None: ...

    def _tokens(self, c7_vcpus: list[VCpu]) -> tuple[set[int], set[int | bytes]]:
        """The fast path's sets for the engine's state now (C7 looks at the
        CR3s of ``c7_vcpus``, as the per-event loop does).

        The allowed set is looked up again only when the engine was called
        since (``_stale``: nothing else changes its state). The matched
        translations are kept across table changes to entries (and frames)
        their walks did not read (``_walked``, :meth:`GuestMemory.layout_changes`)."""
        eng = self.engine
        guest = eng.guest
        stale = self._stale
        if (not stale and guest.layout == self._matched_layout
                and self._ok_c_vcpus is c7_vcpus):
            self._kept = True
            return self._ok_a, self._ok_c  # nothing changed since the last look
        # kept: the sets handed out last time are handed out again, with no
        # key taken out of them (a caller's list of the keys they lack
        # then still holds)
        prev_a, prev_c = self._ok_a, self._ok_c
        kept = self._ok_c_vcpus is c7_vcpus
        if stale:
            self._stale = False
            log = eng.leaf_log
            if eng.restrict_gen != self._allowed_gen or self._by_leaf_n > _WALKED_MAX:
                self._allowed = {}
                self._by_leaf = defaultdict(list)
                self._by_leaf_n = 0
                self._allowed_gen = eng.restrict_gen
                log.clear()
                kept = False
            elif log:
                by_leaf = self._by_leaf
                for leaf in log:
                    for ok, key in by_leaf.pop(leaf, ()):
                        if ok is prev_a:
                            kept = False
                        ok.discard(key)
                log.clear()
            token = eng.access_token()
            ok_a = self._allowed.get(token)
            if ok_a is None:
                ok_a = self._allowed[token] = set()
            if ok_a is not prev_a:
                kept = False
            self._ok_a = ok_a
        layout = guest.layout
        fresh = stale or not kept  # the CR3s may differ (or the vCPU list)
        if layout != self._matched_layout:
            changed = guest.layout_changes(self._matched_layout)
            walked = self._walked
            if changed is None or guest.ALL_FRAMES in changed or self._walked_n > _WALKED_MAX:
                self._matched = {}
                walked.clear()
                self._walked_n = 0
                kept, fresh = False, True
            elif walked:
                for what in changed:
                    for matched, ck in walked.pop(what, ()):
                        if matched is prev_c:
                            kept = False
                        matched.discard(ck)
            self._matched_layout = layout
        if fresh:
            # the CR3s change only in engine calls (then _stale is set)
            ok_c = self._matched.setdefault(tuple(v.cr3 for v in c7_vcpus), set())
            if ok_c is not prev_c:
                kept = False
            self._ok_c, self._ok_c_vcpus = ok_c, c7_vcpus
        self._kept = kept
        return self._ok_a, self._ok_c

    def _rests_on(self, path: list[int], ok: set[int | bytes], key: int | bytes) -> None:
        """Note that matched key ``key`` of ``ok`` holds while the entries
        of ``path`` (and their frames) stay as they are."""
        walked = self._walked
        dep = (ok, key)
        for eid in path:
            walked[eid].append(dep)
            walked[-2 - (eid >> 9)].append(dep)  # GuestMemory.frame_id
        self._walked_n += len(path)

    def _loop_fast(self, chunk: Chunk, rows: npt.NDArray[np.intp]) -> None:
        """:meth:`_loop` with runs of accesses in bulk.

        Between two other events, the accesses whose keys the engine found
        allowed (and whose translations matched) under the current tokens
        are counted in bulk; each other access is fed as in :meth:`_loop`,
        and after one that changed the engine the tokens are read again.
        Tools are told each event fed to the engine, and each bulk access
        they want right after it is counted."""
        eng = self.engine
        counters = eng.counters
        guest = eng.guest
        pt_types = eng.pt_types
        # C7 reads the CR3s from the current vCPU list (a WINDOW_OPEN
        # replaces it), like the per-event loop
        c7_vcpus = eng.vcpus
        check = self.check_translation
        st = self.stats
        first = chunk.first
        kind_k = chunk.kind[rows]
        vcpu_k = chunk.vcpu[rows]
        info_k = chunk.info[rows]
        va_k = chunk.va[rows]
        pa_k = chunk.pa[rows]
        is_acc = kind_k <= _FETCH
        # access key: page, vCPU, MMIO, kind, user (64 bits)
        vpage = va_k >> np.uint64(PAGE_SHIFT)
        akey = (
            (vpage << np.uint64(12))
            | (vcpu_k.astype(np.uint64) << np.uint64(4))
            | ((info_k & fmt.INFO_IO) != 0).astype(np.uint64) << np.uint64(3)
            | ((kind_k.astype(np.uint64) - np.uint64(1)) & np.uint64(3)) << np.uint64(1)
            | ((info_k & fmt.INFO_USER) != 0).astype(np.uint64)
        )
        akeys: list[int] = akey.tolist()
        ckeys: list[int | bytes] = _translation_keys(va_k, vcpu_k, pa_k, is_acc) if check else []
        L_i: list[int] = rows.tolist()
        L_vcpu: list[int] = vcpu_k.tolist()
        wpos: list[int] = np.flatnonzero(kind_k == _WRITE).tolist()
        other = np.flatnonzero(~is_acc)
        bounds: list[int] = other.tolist()
        bounds.append(len(rows))
        # the columns of the other events (each read once: as lists)
        o_rows = rows[other]
        o_kind: list[int] = kind_k[other].tolist()
        o_info: list[int] = info_k[other].tolist()
        o_va: list[int] = va_k[other].tolist()
        o_pa: list[int] = pa_k[other].tolist()
        o_val: list[int] = chunk.val[o_rows].tolist()
        o_pc: list[int] = chunk.pc[o_rows].tolist()
        # the other columns, read per event: as lists when many events are
        # read one by one (short runs between other events), else each
        # value from numpy when needed
        kind_at: Callable[[int], int]
        info_at: Callable[[int], int]
        va_at: Callable[[int], int]
        pa_at: Callable[[int], int]
        if len(bounds) * _SHORT_RUN > len(rows):
            kind_at, info_at = kind_k.tolist().__getitem__, info_k.tolist().__getitem__
            va_at, pa_at = va_k.tolist().__getitem__, pa_k.tolist().__getitem__
        else:
            kind_at, info_at, va_at, pa_at = kind_k.item, info_k.item, va_k.item, pa_k.item
        size_mask = fmt.INFO_SIZE_MASK
        user_bit = fmt.INFO_USER
        io_bit = 1 << 3
        tools = self.tools if self.tools else None
        if tools is not None:
            frame_np = pa_k >> np.uint64(PAGE_SHIFT)
            tell_tools = tools.tell
            val_col = chunk.val

        def tell(j: int) -> None:
            """Tell the tools event j (an access) as the per-event loop does."""
            i = L_i[j]
            tell_tools(first + i, kind_at(j), L_vcpu[j], info_at(j), va_at(j), pa_at(j),
                       val_col.item(i), None)

        def bulk(x: int, y: int) -> None:
            """Accesses x .. y-1, every one allowed and translated as
            before: the engine would only count them and note each vCPU's
            last store."""
            n = y - x
            counters["accesses"] += n
            self.bulk_accesses += n
            if check:
                st.translations_checked += n
            lo, hi = bisect_left(wpos, x), bisect_left(wpos, y)
            if hi > lo:
                seen: set[int] = set()
                for t in range(hi - 1, lo - 1, -1):
                    j = wpos[t]
                    vc = L_vcpu[j]
                    if vc not in seen:
                        seen.add(vc)
                        info = info_at(j)
                        eng.vcpus[vc].last_store = (
                            va_at(j), info & size_mask or 8, bool(info & user_bit))
            eng._event, eng._vcpu = first + L_i[y - 1], L_vcpu[y - 1]

        # the positions some tool wants, selected with numpy over a span of
        # the chunk and kept while the joint interest stays (its version)
        sel_ver, sel_lo, sel_hi = -1, 0, 0
        sel_pos: list[int] = []
        n_rows = len(L_i)

        def wanted(x: int, y: int) -> list[int]:
            """Accesses x .. y-1 some tool wants (positions, in order)."""
            nonlocal sel_ver, sel_lo, sel_hi, sel_pos
            assert tools is not None
            if tools.all:
                return list(range(x, y))
            if tools.version != sel_ver or x < sel_lo or y > sel_hi:
                sel_ver, sel_lo = tools.version, x
                sel_hi = max(y, min(n_rows, x + _SELECT_SPAN))
                sel_pos = (tools.select(frame_np[x:sel_hi], vpage[x:sel_hi]) + x).tolist()
            return sel_pos[bisect_left(sel_pos, x):bisect_left(sel_pos, y)]

        def bulk_told(x: int, y: int) -> None:
            """:func:`bulk`, telling the tools the accesses they want (each
            right after it is counted; their interest read again after each)."""
            assert tools is not None
            while x < y:
                if not tools.any:
                    bulk(x, y)
                    return
                ver = tools.version
                for p in wanted(x, y):
                    bulk(x, p + 1)
                    tell(p)
                    x = p + 1
                    if tools.version != ver:
                        break
                else:
                    if y > x:
                        bulk(x, y)
                    return

        span = bulk if tools is None else bulk_told

        def one(j: int, ok_a: set[int], ok_c: set[int | bytes]) -> bool:
            """Access j as the per-event loop feeds it; False when the
            engine may have changed (the tokens must be read again)."""
            index = first + L_i[j]
            vcpu, va, pa = L_vcpu[j], va_at(j), pa_at(j)
            if check:
                ck = ckeys[j]
                if ck in ok_c:
                    st.translations_checked += 1
                else:
                    path: list[int] = []
                    if self._c7(index, vcpu, va, pa, c7_vcpus, path):
                        ok_c.add(ck)
                        self._rests_on(path, ok_c, ck)
            ak = akeys[j]
            kind, info = kind_at(j), info_at(j)
            if ak in ok_a:
                counters["accesses"] += 1
                if kind == _WRITE:
                    eng.vcpus[vcpu].last_store = (va, info & size_mask or 8, bool(info & user_bit))
                eng._event, eng._vcpu = index, vcpu
                if tools is not None and tools.any and tools.wants(
                        pa >> PAGE_SHIFT, va >> PAGE_SHIFT):
                    tell(j)
                return True
            stale, self._stale = self._stale, True
            spath: list[tuple[Key, int]] = []
            allowed = eng.access(index, vcpu, kind, va, info, pa, spath)
            if allowed and not ak & io_bit:
                # the engine changed nothing the tokens rest on (only counters
                # and the last store)
                self._stale = stale
                # allowed while no entry of its path (eng.allowed_path), nor
                # a shadow of it, is in the engine's leaf_log
                ok_a.add(ak)
                dep = (ok_a, ak)
                by_leaf = self._by_leaf
                for entry in spath:
                    by_leaf[entry].append(dep)
                    by_leaf[entry[0], -1].append(dep)
                self._by_leaf_n += 2 * len(spath)
            if tools is not None:
                if not allowed or ak & io_bit:
                    tell(j)  # the engine may have changed: every tool is told
                elif tools.any and tools.wants(pa >> PAGE_SHIFT, va >> PAGE_SHIFT):
                    # allowed: the engine changed only what a bulk access
                    # changes (counters, last store), so told as one
                    tell(j)
            return allowed

        a = 0
        for t, b in enumerate(bounds):
            if 0 < b - a <= _SHORT_RUN:
                # a short run: one by one, each known one counted on the spot
                ok_a, ok_c = self._tokens(c7_vcpus)
                for j in range(a, b):
                    if akeys[j] in ok_a and (not check or ckeys[j] in ok_c):
                        counters["accesses"] += 1
                        self.bulk_accesses += 1
                        if check:
                            st.translations_checked += 1
                        vcpu = L_vcpu[j]
                        if kind_at(j) == _WRITE:
                            info = info_at(j)
                            eng.vcpus[vcpu].last_store = (
                                va_at(j), info & size_mask or 8, bool(info & user_bit))
                        eng._event, eng._vcpu = first + L_i[j], vcpu
                        if tools is not None and tools.any and tools.wants(
                                pa_at(j) >> PAGE_SHIFT, va_at(j) >> PAGE_SHIFT):
                            tell(j)
                    elif not one(j, ok_a, ok_c):
                        ok_a, ok_c = self._tokens(c7_vcpus)
            elif b > a:
                ok_a, ok_c = self._tokens(c7_vcpus)
                # windows of accesses: all of them first, after an engine
                # change a short one, doubling while nothing changes
                j, win = a, b - a
                while j < b:
                    hi = min(b, j + win)
                    unknown = _not_in(ok_a, akeys, j, hi)
                    if check:
                        unknown_c = _not_in(ok_c, ckeys, j, hi)
                        if unknown_c:
                            unknown = sorted(set(unknown).union(unknown_c))
                    changed = False
                    for u in unknown:
                        if u > j:
                            span(j, u)
                        j = u + 1
                        if not one(u, ok_a, ok_c):
                            ok_a, ok_c = self._tokens(c7_vcpus)
                            if not self._kept:
                                changed = True
                                break
                            # the same sets, none lost a key: the rest of
                            # ``unknown`` still holds every key they lack
                    if changed:
                        win = 64
                    else:
                        if hi > j:
                            span(j, hi)
                        j = hi
                        win *= 2
            if b < len(L_i):
                kind, i, val, pa = o_kind[t], L_i[b], o_val[t], o_pa[t]
                if kind == _TABLE_WRITE and pa >> PAGE_SHIFT not in pt_types:
                    # a store into a frame with no shadow: the engine would
                    # only count it and update the guest's table
                    # (ShadowEngine.table_write's first steps)
                    counters["events"] += 1
                    counters["table_writes"] += 1
                    guest.write(pa, val)
                    eng._event, eng._vcpu = first + i, L_vcpu[b]
                    if (tools is not None and tools.tw_any
                            and tools.wants_table_write(pa >> PAGE_SHIFT, val)):
                        tell_tools(first + i, kind, L_vcpu[b], o_info[t], o_va[t], pa, val,
                                   None)
                else:
                    self._stale = True
                    self._other(chunk, first + i, kind, L_vcpu[b], o_info[t], o_va[t],
                                pa, o_pc[t], val)
                    if tools is not None:
                        tell_tools(first + i, kind, L_vcpu[b], o_info[t], o_va[t], pa, val,
                                   chunk.markers[val] if kind == _MARKER else None)
                if kind == _WINDOW_OPEN:
                    c7_vcpus = eng.vcpus  # the window replaced the vCPU list
            a = b + 1
