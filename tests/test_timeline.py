"""Per-VA shadow timelines (replay.analysis.timeline) on a seed-like synthetic trace.

The trace mimics the seed module under one kernel: a page in the direct map
(4 KiB leaf), its neighbour, and a page inside a 2 MiB direct-map superpage;
an "alloc-like" store that writes the page's PTE (through the direct map)
before anything touches the page; the first dereference; a switch to a
second root that shares the kernel-half L3 table; and a store that unlinks
that root's kernel half. Expected numbers say why.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from replay.analysis.episodes import LEVELS
from replay.analysis.golden import read_expectation, stored_options
from replay.analysis.lifetimes import ShadowLifetimes
from replay.analysis.timeline import Timeline
from replay.driver.hub import FactHub, drive
from replay.driver.replayer import Replayer
from replay.guest.memory import PTE_A, PTE_D, PTE_P, PTE_RW, va_index
from replay.report.results import timeline_json
from replay.session import check_options, console_text, console_vas, replay
from replay.shadow.config import EngineConfig
from replay.shadow.engine import ShadowEngine
from replay.shadow.types import Fact
from replay.trace import format as fmt
from replay.trace.reader import Chunk, TraceReader
from replay.trace.writer import TraceWriter

from .replays import EXPECTED, golden_name, trace_of
from .test_guest import TABLE, GuestTables, dm

K = fmt.Kind
#: Kernel data: present, writable, accessed, dirty, supervisor.
KDATA = PTE_P | PTE_RW | PTE_A | PTE_D
#: The watched page's frame: 1 GiB up, so its L3 index (1) differs from the
#: table frames' own direct-map addresses (frames 0x100.., L3 index 0).
PAGE = 0x40010
VA = dm(PAGE)
#: Its neighbour in the same L1 (index + 1): prefetch reaches it.
VA2 = dm(PAGE + 1)
#: A page inside a 2 MiB superpage of the direct map (L2 index 1, 4th page).
BIG = 0x40200
VA3 = dm(BIG) + 0x3000
#: Guest RAM: 2 GiB, so the pages above (1 GiB up) are RAM, not MMIO.
RAM_MIB = 2048
#: PCs, one per "function", to check that the timeline reports them.
PC_ALLOC, PC_DEREF, PC_CR3, PC_OTHER = 0xFFFF_FFFF_8100_1000, 0xFFFF_FFFF_C000_004A, \
    0xFFFF_FFFF_8100_2000, 0xFFFF_FFFF_8100_3000


@dataclass
class Seed:
    """The trace and the event index of every interesting event."""

    path: Path
    root_a: int
    root_b: int
    l1: int
    cr3_a: int  # CR3_WRITE to root A
    alloc_store: int  # WRITE of the PTE through the direct map
    alloc_tw: int  # its TABLE_WRITE
    deref: int  # first READ of VA
    read_va2: int
    read_va3: int
    cr3_b: int
    deref_b: int  # READ of VA under root B
    unlink_b: int  # TABLE_WRITE clearing root B's kernel-half entry
    events: int


def seed_trace(path: Path, *, footer: bool = True) -> Seed:
    t = GuestTables()
    root_a, root_b = t.new(), t.new()
    kl3 = t.new()  # the kernel-half (direct map) L3, shared by both roots
    t.set(root_a, va_index(VA, 4), (kl3 << 12) | TABLE)
    t.set(root_b, va_index(VA, 4), (kl3 << 12) | TABLE)
    _, _, l1 = t.map(root_a, VA, PAGE, KDATA)
    t.map(root_a, VA2, PAGE + 1, KDATA)
    t.set(l1, va_index(VA, 1), 0)  # not mapped yet: the "allocation" maps it
    t.map(root_a, VA3, BIG, KDATA, size="2m")
    t.map(root_a, dm(l1), l1, KDATA)  # the PTE's own direct-map address
    n = 0
    with TraceWriter(path, scenario="seed", vcpus=1, ram_bytes=RAM_MIB << 20) as w:
        def ev(kind: int, **kw: int) -> int:
            nonlocal n
            w.event(kind, **kw)
            n += 1
            return n - 1

        for frame, page in t.pages():
            w.snapshot(frame << 12, page)
            n += 1
        cr3_a = ev(K.CR3_WRITE, val=root_a << 12, pc=PC_CR3)
        pte = (l1 << 12) | (va_index(VA, 1) << 3)
        store = dm(l1) + (va_index(VA, 1) << 3)
        alloc_store = ev(K.WRITE, va=store, pa=pte, info=8, pc=PC_ALLOC)
        alloc_tw = ev(K.TABLE_WRITE, va=store, pa=pte, val=(PAGE << 12) | KDATA, pc=PC_ALLOC)
        deref = ev(K.READ, va=VA, pa=PAGE << 12, info=8, pc=PC_DEREF)
        read_va2 = ev(K.READ, va=VA2, pa=(PAGE + 1) << 12, info=8, pc=PC_OTHER)
        read_va3 = ev(K.READ, va=VA3, pa=(BIG + 3) << 12, info=8, pc=PC_OTHER)
        cr3_b = ev(K.CR3_WRITE, val=root_b << 12, pc=PC_CR3)
        deref_b = ev(K.READ, va=VA, pa=PAGE << 12, info=8, pc=PC_DEREF)
        unlink_b = ev(K.TABLE_WRITE, va=0, pa=(root_b << 12) | (va_index(VA, 4) << 3), val=0,
                      pc=PC_OTHER)
        w.close(footer=footer)
    return Seed(path, root_a, root_b, l1, cr3_a, alloc_store, alloc_tw, deref, read_va2,
                read_va3, cr3_b, deref_b, unlink_b, n)


def run_timeline(path: Path, watch: list[int], **cfg: object) -> tuple[Timeline, ShadowLifetimes]:
    hub = FactHub()
    cfg = {"record_facts": False, "ram_mib": RAM_MIB, **cfg}
    eng = ShadowEngine(EngineConfig.from_dict(cfg), on_fact=hub)
    tl = Timeline(eng, watch)
    lt = ShadowLifetimes()
    hub.add(tl)
    hub.add(lt)
    with TraceReader(path) as reader:
        drive(Replayer(eng), reader, [tl])
    return tl, lt


def test_first_dereference_builds_the_path(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    tl, _ = run_timeline(s.path, [VA])
    v = tl.timelines[VA]
    assert v.first_access is not None and v.first_access.event == s.deref
    assert v.first_access.pc == PC_DEREF
    assert v.accesses == 2  # the dereference under root A, then under root B
    # two roots reach it: A at the dereference, B when it reads it too
    assert [ep.root for ep in v.episodes] == [s.root_a, s.root_b]
    a = v.episodes[0]
    rows = {lv: a.row(lv) for lv in LEVELS}
    assert rows["L4"].birth.event == s.cr3_a and rows["L4"].birth.reason == "cr3"
    # the alloc-like store faulted on the PTE's own direct-map address: that
    # built the shared kernel L3 shadow and linked it from root A's L4 ...
    assert rows["L4e"].birth.event == s.alloc_store
    assert rows["L3"].birth.event == s.alloc_store
    # ... but nothing of this VA's own path below the L3: the first read does
    for lv in ("L3e", "L2", "L2e", "L1", "L1e"):
        assert rows[lv].birth.event == s.deref, lv
        assert rows[lv].birth.reason == "demand", lv
        assert rows[lv].birth.pc == PC_DEREF, lv
        assert not rows[lv].shared, lv  # root A built it itself
    assert rows["L1"].type == "l1" and rows["L1"].frame == s.l1
    assert rows["L1e"].index == va_index(VA, 1)
    assert a.complete_event == s.deref
    assert v.answer()["when"] == "first-access"


def test_alloc_like_table_write_builds_no_shadow(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    tl, _ = run_timeline(s.path, [VA])
    v = tl.timelines[VA]
    # two table writes on the VA's guest path: the PTE store, and the store
    # that unlinks root B's kernel half (its L4 entry)
    assert [e.event for e in v.table_writes] == [s.alloc_tw, s.unlink_b]
    assert [e.level for e in v.table_writes] == [1, 4]
    # the L1 frame had no shadow yet: the engine did nothing at that event
    assert v.table_writes[0].effects == []
    # root B's L4 frame is shadowed: that store was validated into its shadow
    assert v.table_writes[1].effects == [f"propagated l4 {s.root_b:#x}[273] validate"]
    assert all(lv.birth.event != s.alloc_tw for ep in v.episodes for lv in ep.levels)


def test_neighbour_is_prefetched(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    tl, _ = run_timeline(s.path, [VA2])
    v = tl.timelines[VA2]
    leaf = v.episodes[0].row("L1e")
    # built by the fault on VA (the next L1 entry): a prefetch at that event
    assert leaf.birth.event == s.deref and leaf.birth.reason == "prefetch"
    assert leaf.birth.va == VA  # the access that caused it
    ans = v.answer()
    assert ans["when"] == "before-first-access" and ans["first_access_event"] == s.read_va2


def test_superpage_gets_an_fl1(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    tl, _ = run_timeline(s.path, [VA3])
    ep = tl.timelines[VA3].episodes[0]
    fl1 = ep.row("L1")
    assert (fl1.level, fl1.type, fl1.frame) == ("FL1", "fl1", BIG)  # keyed by the base
    assert fl1.birth.event == s.read_va3 and fl1.birth.reason == "demand"
    assert ep.row("L1e").index == 3  # 4th 4 KiB page of the superpage


def test_second_root_finds_it_already_built(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    tl, _ = run_timeline(s.path, [VA])
    b = tl.timelines[VA].episodes[1]
    assert b.root == s.root_b and b.complete_event == s.deref_b
    assert b.row("L4").birth.event == s.cr3_b  # its own new L4 shadow
    link = b.row("L4e")
    assert link.birth.event == s.deref_b and not link.shared  # only this is new
    for lv in ("L3", "L3e", "L2", "L2e", "L1", "L1e"):
        assert b.row(lv).shared, lv  # built from root A, before B linked it
        assert b.row(lv).birth.event < s.cr3_b, lv


def test_unlink_ends_the_episode(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    tl, lt = run_timeline(s.path, [VA])
    a, b = tl.timelines[VA].episodes
    # the store into root B's L4 frame is validated: B's L4 entry goes away
    assert b.ended == (s.unlink_b, "validate", "L4e")
    assert b.row("L4e").destroyed == (s.unlink_b, "validate")
    assert a.ended is None  # root A still reaches it
    assert b.row("L3").destroyed is None  # the L3 shadow lives on (root A)
    # lifetimes: 2 L4 + L3 + 2 L2 (tables', VA's) + 2 L1 (tables', VA's) + 1 FL1,
    # none destroyed (root A's pin and B's pin keep the L4s)
    rows = lt.all_rows()
    assert sorted(r.type for r in rows) == ["fl1", "l1", "l1", "l2", "l2", "l3", "l4", "l4"]
    assert all(r.destroyed is None for r in rows)


def test_watch_added_late_sees_existing_paths(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    hub = FactHub()
    eng = ShadowEngine(EngineConfig(record_facts=False, ram_mib=RAM_MIB), on_fact=hub)
    tl = Timeline(eng, [])
    hub.add(tl)
    with TraceReader(s.path) as reader:
        drive(Replayer(eng), reader, [tl])
    assert tl.add_watch(VA)
    # both roots still reach it at the end except B (unlinked): one episode
    eps = tl.timelines[VA].episodes
    assert [e.root for e in eps] == [s.root_a]
    assert eps[0].row("L1e").birth.event == s.deref  # births were kept for all entries


def test_auto_watch_is_bounded(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    hub = FactHub()
    eng = ShadowEngine(EngineConfig(record_facts=False, ram_mib=RAM_MIB), on_fact=hub)
    tl = Timeline(eng, auto=2)
    hub.add(tl)
    with TraceReader(s.path) as reader:
        drive(Replayer(eng), reader, [tl])
    # the first two pages touched: the PTE's direct-map page, then VA
    assert [va >> 12 for va in tl.watched] == [dm(s.l1) >> 12, VA >> 12]


def test_fact_hub_routes_by_declared_kinds(tmp_path: Path) -> None:
    # a sink declaring FACT_KINDS (ShadowLifetimes) is handed only those
    # facts, in order, and ends as one handed every fact; others get all
    s = seed_trace(tmp_path / "seed.trace")
    every: list[Fact] = []
    hub = FactHub()
    eng = ShadowEngine(EngineConfig(record_facts=False, ram_mib=RAM_MIB), on_fact=hub)
    routed = ShadowLifetimes()
    taken: list[Fact] = []

    class Kinds:
        FACT_KINDS = frozenset({"created", "propagated"})

        def __call__(self, f: Fact) -> None:
            taken.append(f)

    hub.add(every.append)
    hub.add(routed)
    hub.add(Kinds())
    with TraceReader(s.path) as reader:
        Replayer(eng).run(reader)
    assert {f.kind for f in every} >= {"created", "propagated", "pinned"}
    assert taken == [f for f in every if f.kind in ("created", "propagated")]
    direct = ShadowLifetimes()
    for f in every:
        direct(f)
    assert routed.all_rows() == direct.all_rows() and routed.all_rows()


WATCHED_GOLDENS = [p for p in EXPECTED if stored_options(read_expectation(p)[0])["watch"]
                   or stored_options(read_expectation(p)[0])["watch_console"]]


@pytest.mark.parametrize("golden", WATCHED_GOLDENS, ids=[golden_name(p) for p in WATCHED_GOLDENS])
def test_fixed_watch_timeline_equals_the_full_one(golden: Path) -> None:
    # the replay's timeline (fixed_watch: births only of entries a watched
    # path can use) against one of the same VAs keeping every entry's
    # birth, fed the same facts and chunks: the same timelines
    opts = check_options(trace_of(golden), golden, read_expectation(golden)[0])
    opts.progress = False
    watch = list(opts.watch)
    if opts.watch_console is not None:
        watch += [va for va in console_vas(console_text(opts.trace), opts.watch_console, "")
                  if va not in watch]
    assert watch
    full: list[Timeline] = []

    class Full:
        def __call__(self, f: Fact) -> None:
            full[0](f)

        def before_chunk(self, chunk: Chunk) -> None:
            full[0].before_chunk(chunk)

        def after_chunk(self, chunk: Chunk) -> None:
            full[0].after_chunk(chunk)

    fwd = Full()
    got = replay(opts, sinks=[fwd], observers=[fwd],
                 attach=lambda eng: full.append(Timeline(eng, watch)))
    assert got.timeline._left_out  # the replay's did leave facts out
    assert got.doc["timelines"] == [timeline_json(t, got.namer)
                                    for t in full[0].timelines.values()]
    assert any(t["episodes"] for t in got.doc["timelines"])
    with pytest.raises(ValueError, match="fixed_watch"):
        got.timeline.add_watch(0x7F00_0000_0000)
