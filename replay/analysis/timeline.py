"""Per-VA shadow timelines: when each level of a VA's shadow path came to be.

A consumer of the engine's :class:`~replay.shadow.types.Fact` stream (pass a
:class:`FactHub` as the engine's ``on_fact``) and of the chunks themselves
(:func:`drive` calls ``before_chunk`` / ``after_chunk`` around each
:meth:`Replayer.feed <replay.driver.replayer.Replayer.feed>`). Pure data: nothing
here prints.

For a watched VA and every shadow root (L4 shadow) whose path to it becomes
complete, a :class:`PathEpisode` records eight levels -- the L4 shadow, its
entry, the L3 shadow, its entry, the L2 shadow, its entry, the L1 (or FL1)
shadow and the leaf entry -- each with the event at which it came to exist
and why (the fact's reason: ``demand``, ``prefetch``, ``validate``,
``resync``, ``cr3`` ...), the vCPU, its CR3 and the PC of that event. A level
that existed before this root's L4 entry linked the path is marked
``shared``: it was already built from another root (or an earlier link), the
situation of a kernel-half table frame shared between address spaces. When a
level goes away (shadow destroyed, entry cleared or pointed elsewhere) its
``destroyed`` is set and the episode ends; a later rebuild opens a new one.

Guest-side events of the watched page are kept too: first access, first
write, and TABLE_WRITEs into the entries of its guest walk (judged against
the guest tables at the start and at the end of the chunk holding the write),
with what the engine did at that event.

Memory is bounded by the live shadows (a birth record per shadow and per
present shadow entry) plus the caps ``max_episodes`` / ``max_guest_events``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np

from ..driver.hub import ChunkObserver
from ..guest.memory import ADDR_MASK, PAGE_SHIFT, PTE_P, PTE_PS, cr3_root
from ..shadow.engine import ShadowEngine
from ..shadow.types import FL1, L1, L4, SH_ADDR, SH_FL1, SH_P, Fact, ShadowType
from ..trace import format as fmt
from ..trace.reader import Chunk
from .episodes import TYPE_NAMES, Birth, GuestEvent, LevelRecord, PathEpisode, VaTimeline

Key = tuple[int, ShadowType]


_ACCESS_MAX = int(fmt.Kind.FETCH)
_TABLE_WRITE = int(fmt.Kind.TABLE_WRITE)
_CR3_KINDS = (int(fmt.Kind.CR3_WRITE), int(fmt.Kind.CR3_CURRENT))
_KIND_NAMES = {int(k): k.name.lower() for k in fmt.Kind}
#: ShadowType by value (a fact's ``type``), without an enum call per fact.
_STYPES: tuple[ShadowType, ...] = tuple(ShadowType(t) for t in range(5))
#: What an entry's target is made of (:func:`_target`).
_TARGET_BITS = SH_ADDR | SH_FL1
_NO_ENTRY_REFS: dict[int, list[LevelRecord]] = {}
#: Birth(...) without the NamedTuple's Python __new__ (one per shadow entry).
_new_birth = tuple.__new__


def va_index(va: int, level: int) -> int:
    """Index of ``va`` in a table of ``level`` (1..4)."""
    return (va >> (PAGE_SHIFT + 9 * (level - 1))) & 0x1FF


def _level(stype: int) -> int:
    """Table level of a shadow type (FL1 counts as level 1)."""
    return stype if stype else 1


def _child(entry: int, level: int) -> Key:
    """The shadow a present upper-level shadow entry points at."""
    frame = (entry & SH_ADDR) >> PAGE_SHIFT
    if level == 2:
        return (frame, FL1 if entry & SH_FL1 else L1)
    return (frame, _STYPES[level - 1])


def _target(entry: int) -> int:
    """What a shadow entry points at (frame and FL1 bit): equal targets mean
    the same child / mapped frame, whatever the flags."""
    return entry & _TARGET_BITS


class Timeline(ChunkObserver):
    """Shadow timelines of watched VAs.

    :param engine: the engine whose facts arrive (for its shadows, parent
        links and vCPU state; read only).
    :param watch: VAs to follow from the start.
    :param auto: also watch the pages the guest touches, in order of first
        access, up to this many (0: only ``watch``).
    :param max_episodes: path episodes kept per VA.
    :param max_guest_events: table writes kept per VA.
    :param fixed_watch: the watched VAs are all given here (``watch``, no
        ``auto``): births are then kept only for the shadow entries a
        watched path can go through (those at a watched VA's index on
        their level), and :meth:`add_watch` refuses a VA once a fact of
        another entry was left out (its paths' births would be missing).
        The timelines are the same, for less work per fact.
    """

    def __init__(
        self,
        engine: ShadowEngine,
        watch: Iterable[int] = (),
        *,
        auto: int = 0,
        max_episodes: int = 64,
        max_guest_events: int = 256,
        fixed_watch: bool = False,
    ) -> None:
        self.engine = engine
        self.auto = auto
        #: births of every shadow entry are kept (see ``fixed_watch``)
        self._every_entry = not fixed_watch or auto > 0
        #: a fact of an entry no watched path uses was left out
        self._left_out = False
        self.max_episodes = max_episodes
        self.max_guest_events = max_guest_events
        self.timelines: dict[int, VaTimeline] = {}
        #: page -> watched VA
        self._pages: dict[int, int] = {}
        #: (level, index) -> watched VAs with that index at that level
        self._by_index: dict[tuple[int, int], list[int]] = {}
        self._born: dict[Key, Birth] = {}
        self._entry_born: dict[Key, dict[int, Birth]] = {}
        #: open episodes: (va, root frame) -> episode
        self._open: dict[tuple[int, int], PathEpisode] = {}
        #: live level records by shadow, and by shadow entry
        self._shadow_refs: dict[Key, list[LevelRecord]] = {}
        self._entry_refs: dict[Key, dict[int, list[LevelRecord]]] = {}
        #: events (table-write candidates) whose facts are summarised
        self._annotate: set[int] = set()
        self._effects: dict[int, list[str]] = {}
        self._pending: list[tuple[int, int]] = []
        self._paths_before: dict[tuple[int, int], int] = {}
        self._chunk: Chunk | None = None
        #: _birth's columns of the last event it read (and its chunk)
        self._cols_event = -1
        self._cols_chunk: Chunk | None = None
        self._cols: tuple[int, int, str] = (0, 0, "")
        self._auto_added = 0
        for va in watch:
            self.add_watch(va)

    # -- watching --------------------------------------------------------
    def add_watch(self, va: int) -> bool:
        """Follow ``va`` (one VA per page); False if its page is watched."""
        page = va >> PAGE_SHIFT
        if page in self._pages:
            return False
        if self._left_out:
            raise ValueError(f"watch {va:#x}: the timeline follows a fixed set of VAs "
                             "(fixed_watch) and has left out the facts of other entries")
        self._pages[page] = va
        self.timelines[va] = VaTimeline(va)
        for level in (1, 2, 3, 4):
            self._by_index.setdefault((level, va_index(va, level)), []).append(va)
        # paths already complete (a watch added during the replay)
        for key in [k for k in self.engine.shadows if k[1] == L4]:
            self._consider_root(va, key, self.engine._event, self.engine._vcpu)
        return True

    @property
    def watched(self) -> list[int]:
        return list(self.timelines)

    def watched_pages(self) -> list[int]:
        """Page numbers of the watched VAs."""
        return list(self._pages)

    # -- chunk hooks -----------------------------------------------------
    def before_chunk(self, chunk: Chunk) -> None:
        self._chunk = chunk
        if chunk.n == 0:
            return
        kind = chunk.kind
        is_access = kind <= _ACCESS_MAX
        pages = chunk.va >> np.uint64(PAGE_SHIFT)
        if self.auto and self._auto_added < self.auto and is_access.any():
            self._add_auto(pages[is_access])
        if not self._pages:
            return
        watched = np.fromiter(self._pages, dtype=np.uint64, count=len(self._pages))
        hit = np.flatnonzero(is_access & np.isin(pages, watched))
        if len(hit):
            self._guest_accesses(chunk, hit, pages)
        tw = np.flatnonzero(kind == _TABLE_WRITE)
        if len(tw):
            self._pending = self._table_write_candidates(chunk, tw)
            if self._pending:
                self._paths_before = self._guest_path_entries(chunk)
        else:
            self._pending = []

    def after_chunk(self, chunk: Chunk) -> None:
        pending = self._pending
        if pending:
            after = self._guest_path_entries(chunk)
            before = self._paths_before
            for i, va in pending:
                pa = int(chunk.pa[i]) & ~7
                level = after.get((va, pa)) or before.get((va, pa))
                if level is None:
                    continue
                tl = self.timelines[va]
                tl.table_writes_total += 1
                if len(tl.table_writes) < self.max_guest_events:
                    ev = self._guest_event(chunk, i, "TABLE_WRITE")
                    ev.level = level
                    ev.effects = self._effects.get(chunk.first + i, [])
                    tl.table_writes.append(ev)
            self._pending = []
        self._annotate.clear()
        self._effects = {}

    def _add_auto(self, pages: np.ndarray[Any, Any]) -> None:
        uniq, first = np.unique(pages, return_index=True)
        for j in np.argsort(first, kind="stable").tolist():
            if self._auto_added >= self.auto:
                break
            if self.add_watch(int(uniq[j]) << PAGE_SHIFT):
                self._auto_added += 1

    def _guest_accesses(self, chunk: Chunk, hit: np.ndarray[Any, Any],
                        pages: np.ndarray[Any, Any]) -> None:
        for i in hit.tolist():
            va = self._pages[int(pages[i])]
            tl = self.timelines[va]
            tl.accesses += 1
            kind = int(chunk.kind[i])
            if tl.first_access is None:
                tl.first_access = self._guest_event(chunk, i, fmt.Kind(kind).name)
            if kind == fmt.Kind.WRITE and tl.first_write is None:
                tl.first_write = self._guest_event(chunk, i, "WRITE")

    def _guest_event(self, chunk: Chunk, i: int, kind: str) -> GuestEvent:
        vcpu = int(chunk.vcpu[i])
        return GuestEvent(chunk.first + i, kind, vcpu, self._cr3_at(chunk, i, vcpu),
                          int(chunk.pc[i]), int(chunk.va[i]), int(chunk.pa[i]),
                          int(chunk.val[i]))

    def _cr3_at(self, chunk: Chunk, i: int, vcpu: int) -> int | None:
        """The CR3 ``vcpu`` holds at event ``i`` of the chunk (before_chunk
        runs before the engine saw the chunk)."""
        sel = np.flatnonzero(np.isin(chunk.kind[:i], _CR3_KINDS) & (chunk.vcpu[:i] == vcpu))
        if len(sel):
            return int(chunk.val[sel[-1]])
        vcpus = self.engine.vcpus
        return vcpus[vcpu].cr3 if vcpu < len(vcpus) else None

    def _table_write_candidates(self, chunk: Chunk, tw: np.ndarray[Any, Any]
                                ) -> list[tuple[int, int]]:
        """TABLE_WRITEs whose entry offset is a watched VA's index at some level."""
        offs = ((chunk.pa[tw] >> np.uint64(3)) & np.uint64(0x1FF)).astype(np.int64)
        wanted = {idx for (_, idx) in self._by_index}
        mask = np.isin(offs, np.fromiter(wanted, dtype=np.int64, count=len(wanted)))
        out: list[tuple[int, int]] = []
        for j in np.flatnonzero(mask).tolist():
            i = int(tw[j])
            off = int(offs[j])
            vas = {va for lvl in (1, 2, 3, 4) for va in self._by_index.get((lvl, off), ())}
            for va in vas:
                out.append((i, va))
                self._annotate.add(chunk.first + i)
        return out

    def _guest_path_entries(self, chunk: Chunk) -> dict[tuple[int, int], int]:
        """(va, entry address) -> level of every guest table entry on the
        walk of a watched VA, from every root the engine knows of."""
        eng = self.engine
        roots = {k[0] for k in eng.shadows if k[1] == L4}
        roots.update(cr3_root(v.cr3) for v in eng.vcpus if v.cr3 is not None)
        sel = np.isin(chunk.kind, _CR3_KINDS)
        roots.update(cr3_root(int(v)) for v in chunk.val[sel].tolist())
        out: dict[tuple[int, int], int] = {}
        guest = eng.guest
        for va in self.timelines:
            for root in roots:
                frame = root
                for level in (4, 3, 2, 1):
                    idx = va_index(va, level)
                    e = guest.read(frame, idx)
                    if e is None:
                        break
                    out[(va, (frame << PAGE_SHIFT) | (idx << 3))] = level
                    if not e & PTE_P or level == 1 or (level in (2, 3) and e & PTE_PS):
                        break
                    frame = (e & ADDR_MASK) >> PAGE_SHIFT
        return out

    # -- facts -----------------------------------------------------------
    def __call__(self, f: Fact) -> None:
        kind = f.kind
        if kind == "propagated":
            if self._every_entry or (_level(f.type), f.entry) in self._by_index:
                self._propagated(f)
            else:
                # no watched path can use this entry: its birth is never read
                self._left_out = True
        elif kind == "created":
            self._born[(f.frame, _STYPES[f.type])] = self._birth(f, 0)
        elif kind == "destroyed":
            key = (f.frame, _STYPES[f.type])
            self._born.pop(key, None)
            self._entry_born.pop(key, None)
            for rec in self._shadow_refs.pop(key, ()):
                self._gone(rec, f.event, f.reason)
            for recs in self._entry_refs.pop(key, {}).values():
                for rec in recs:
                    self._gone(rec, f.event, f.reason)
        elif kind == "reset":
            self._reset(f.event)
        if self._annotate and f.event in self._annotate:
            eff = self._effects.setdefault(f.event, [])
            if len(eff) < 16:
                where = f"{TYPE_NAMES.get(f.type, '?')} {f.frame:#x}" if f.frame >= 0 else ""
                if f.entry >= 0:
                    where += f"[{f.entry}]"
                eff.append(f"{kind} {where} {f.reason}".replace("  ", " "))

    def _birth(self, f: Fact, value: int) -> Birth:
        vcpus = self.engine.vcpus
        cr3 = vcpus[f.vcpu].cr3 if 0 <= f.vcpu < len(vcpus) else None
        event = f.event
        ch = self._chunk
        if event != self._cols_event or ch is not self._cols_chunk:
            # the event's columns, read once for all the facts of one event
            # (a prefetch run makes many)
            pc = va = 0
            access = ""
            if ch is not None and ch.first <= event < ch.first + ch.n:
                i = event - ch.first
                pc, va = ch.pc.item(i), ch.va.item(i)
                access = _KIND_NAMES.get(ch.kind.item(i), "")
            self._cols_event, self._cols_chunk = event, ch
            self._cols = (pc, va, access)
        pc, va, access = self._cols
        return _new_birth(Birth, (event, f.reason, f.vcpu, cr3, pc, va, value, access))

    def _propagated(self, f: Fact) -> None:
        key = (f.frame, _STYPES[f.type])
        idx = f.entry
        value = f.value
        entries = self._entry_born.get(key)
        if entries is None:
            entries = self._entry_born[key] = {}
        old = entries.get(idx)
        present = value & SH_P
        retarget = old is None or (old.value ^ value) & _TARGET_BITS
        if present and retarget:
            entries[idx] = self._birth(f, value)
        elif not present and old is not None:
            del entries[idx]
        # the watched paths through this entry
        recs = self._entry_refs.get(key, _NO_ENTRY_REFS).get(idx)
        if recs:
            if not present or retarget:
                for rec in self._entry_refs[key].pop(idx):
                    self._gone(rec, f.event, f.reason)
            else:
                for rec in recs:
                    if len(rec.changes) < 8:
                        rec.changes.append((f.event, f.reason, value))
        if present and retarget:
            level = _level(f.type)
            vas = self._by_index.get((level, idx))
            if vas:
                for va in vas:
                    for root in self._roots_above(key, level, va):
                        self._consider_root(va, root, f.event, f.vcpu)

    def _roots_above(self, key: Key, level: int, va: int) -> list[Key]:
        parents = self.engine.parents
        frontier = [key]
        while level < 4 and frontier:
            pidx = va_index(va, level + 1)
            frontier = [pk for k in frontier for pk, i in parents.get(k, ()) if i == pidx]
            level += 1
        return frontier

    def _consider_root(self, va: int, root: Key, event: int, vcpu: int) -> None:
        """Open an episode if ``root``'s path to ``va`` is now complete."""
        shadows = self.engine.shadows
        path: list[tuple[Key, int, int]] = []
        sh = shadows.get(root)
        level = 4
        while sh is not None:
            i = va_index(va, level)
            e = sh.entries[i]
            path.append((sh.key, i, e))
            if not e & SH_P:
                return
            if level == 1:
                break
            sh = shadows.get(_child(e, level))
            level -= 1
        if len(path) != 4:
            return
        okey = (va, root[0])
        old = self._open.get(okey)
        if old is not None:
            if all(old.levels[2 * k].frame == path[k][0][0]
                   and old.levels[2 * k].type == TYPE_NAMES[path[k][0][1]] for k in range(4)):
                return
            old.ended = (event, "replaced", "L4")
        tl = self.timelines[va]
        if len(tl.episodes) >= self.max_episodes:
            tl.episodes_dropped += 1
            return
        vcpus = self.engine.vcpus
        cr3 = vcpus[vcpu].cr3 if 0 <= vcpu < len(vcpus) else None
        ep = PathEpisode(va, root[0], event, vcpu, cr3, [])
        unknown = Birth(-1, "unknown", -1, None, 0, 0, 0)
        link = -1
        for k, (key, i, _e) in enumerate(path):
            sname = "FL1" if key[1] == FL1 else f"L{4 - k}"
            sb = self._born.get(key, unknown)
            srec = LevelRecord(sname, key[0], TYPE_NAMES[key[1]], None, sb, episode=ep)
            eb = self._entry_born.get(key, {}).get(i, unknown)
            erec = LevelRecord(f"L{4 - k}e", key[0], TYPE_NAMES[key[1]], i, eb, episode=ep)
            if k == 0:
                link = eb.event
            else:
                srec.shared = self._elsewhere(sb, link, root[0])
                erec.shared = self._elsewhere(eb, link, root[0])
            ep.levels += [srec, erec]
            self._shadow_refs.setdefault(key, []).append(srec)
            self._entry_refs.setdefault(key, {}).setdefault(i, []).append(erec)
        # the row names are fixed: L1 stands for L1 or FL1 in LEVELS order
        self._open[okey] = ep
        tl.episodes.append(ep)

    @staticmethod
    def _elsewhere(b: Birth, link: int, root: int) -> bool:
        """Built before this root linked the path, or while the guest ran
        another root: "already built from another root"."""
        return b.event < link or (b.cr3 is not None and cr3_root(b.cr3) != root)

    def _gone(self, rec: LevelRecord, event: int, reason: str) -> None:
        if rec.destroyed is None:
            rec.destroyed = (event, reason)
        ep = rec.episode
        if ep is not None and ep.ended is None:
            ep.ended = (event, reason, rec.level)
            if self._open.get((ep.va, ep.root)) is ep:
                del self._open[(ep.va, ep.root)]

    def _reset(self, event: int) -> None:
        for refs in self._shadow_refs.values():
            for rec in refs:
                self._gone(rec, event, "window")
        for by_idx in self._entry_refs.values():
            for recs in by_idx.values():
                for rec in recs:
                    self._gone(rec, event, "window")
        self._shadow_refs.clear()
        self._entry_refs.clear()
        self._born.clear()
        self._entry_born.clear()
        self._open.clear()
