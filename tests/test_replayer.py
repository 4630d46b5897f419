"""The replayer: canonical dedup, chunk boundaries, the C7 cross-check.

Traces are written with :class:`~replay.trace.writer.TraceWriter` and read back,
so the whole path (columns, pages blob, markers) is exercised.
"""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest

from replay import bench
from replay.driver.replayer import Replayer, replay_file
from replay.guest.memory import PTE_A, PTE_D, PTE_P, PTE_RW, PTE_US, GuestMemory, va_index
from replay.shadow.config import EngineConfig
from replay.shadow.engine import ShadowEngine
from replay.trace import format as fmt
from replay.trace.reader import read_all
from replay.trace.writer import TraceWriter

from .replays import REAL, TRACES, Goldens, engine_state
from .test_guest import DATA, GuestTables, dm

K = fmt.Kind
KDATA = PTE_P | PTE_RW | PTE_A | PTE_D
U = 0x40_0000

#: One event: (kind, fields for TraceWriter.event, snapshot page or None).
Ev = tuple[int, dict[str, int], bytes | None]
#: Kinds that bump the plugin's dedup epoch (its own list, without CR3_CURRENT).
PLUGIN_EPOCH = {K.CR3_WRITE, K.TABLE_WRITE, K.INVLPG, K.INVPCID, K.CR4_WRITE,
                K.WINDOW_OPEN, K.WINDOW_CLOSE}


def workload(seed: int, n: int = 3000) -> list[Ev]:
    """A random but valid 2-vCPU workload over 3 roots sharing a kernel half:
    accesses with many repeats, CR3 switches, INVLPGs and stores into user
    L1 tables through the direct map (WRITE + TABLE_WRITE)."""
    rng = random.Random(seed)
    t = GuestTables()
    roots = [t.new() for _ in range(3)]
    l1s: list[int] = []
    for r_i, r in enumerate(roots):
        for k in range(24):
            va = U + (r_i << 30) + (k << 12)
            flags = DATA if k % 3 else PTE_P | PTE_US | PTE_A  # some read-only, D clear
            _, _, l1 = t.map(r, va, 0x1000 + 64 * r_i + k, flags)
        l1s.append(l1)
    kern = t.new()  # a kernel L3 shared by all roots
    for r in roots:
        t.set(r, 273, (kern << 12) | PTE_P | PTE_RW | PTE_A)
    for l1 in l1s:
        t.map(roots[0], dm(l1), l1, KDATA)
    mem = GuestMemory()
    events: list[Ev] = []
    for frame, page in t.pages():
        events.append((K.SNAPSHOT, {"pa": frame << 12}, page))
        mem.snapshot(frame, page)
    cr3 = [roots[0], roots[0]]
    for v in (0, 1):
        events.append((K.CR3_WRITE, {"vcpu": v, "val": roots[0] << 12}, None))
    for _ in range(n):
        v = rng.randrange(2)
        x = rng.random()
        if x < 0.03:
            cr3[v] = rng.choice(roots)
            events.append((K.CR3_WRITE, {"vcpu": v, "val": cr3[v] << 12 | rng.randrange(4)},
                           None))
        elif x < 0.05:
            events.append((K.INVLPG, {"vcpu": v, "va": U + (rng.randrange(24) << 12)}, None))
        elif x < 0.09 and cr3[v] == roots[0]:
            l1 = rng.choice(l1s)
            idx = rng.randrange(24)
            old = mem.read(l1, idx) or 0
            new = old ^ PTE_RW if rng.random() < 0.5 else old & ~PTE_P
            va = dm(l1) + 8 * idx
            events.append((K.WRITE, {"vcpu": v, "va": va, "pa": (l1 << 12) + 8 * idx,
                                     "info": 8}, None))
            mem.write((l1 << 12) + 8 * idx, new)
            events.append((K.TABLE_WRITE, {"vcpu": v, "va": va, "pa": (l1 << 12) + 8 * idx,
                                           "val": new}, None))
        else:
            r_i = roots.index(cr3[v])
            va = U + (r_i << 30) + (rng.randrange(24) << 12) + rng.randrange(512) * 8
            kind = rng.choice([K.READ, K.READ, K.WRITE, K.FETCH])
            walk = mem.walk(cr3[v] << 12, va, set_ad=False)
            if not walk.ok:
                continue  # the guest would fault: QEMU records no access
            for _rep in range(rng.randrange(1, 4)):  # repeats
                events.append((kind, {"vcpu": v, "va": va, "pa": walk.gpa,
                                      "info": 8 | (fmt.INFO_USER if x > 0.5 else 0)}, None))
    return events


def plugin_dedup(events: list[Ev], slots: int = 4) -> list[Ev]:
    """The plugin's dedup: a tiny direct-mapped (page, kind, user) -> epoch
    cache per vCPU (collisions keep some repeats); stores into tables kept."""
    epoch = 0
    cache: dict[int, dict[int, tuple[tuple[int, int, int], int]]] = {0: {}, 1: {}}
    out: list[Ev] = []
    for j, (kind, f, page) in enumerate(events):
        if kind in (K.READ, K.WRITE, K.FETCH):
            key = (f["va"] >> 12, kind, f.get("info", 0) & fmt.INFO_USER)
            slot = hash(key) % slots
            hit = cache[f["vcpu"]].get(slot) == (key, epoch)
            cache[f["vcpu"]][slot] = (key, epoch)
            table = j + 1 < len(events) and events[j + 1][0] == K.TABLE_WRITE
            if hit and not table:
                continue
        elif kind in PLUGIN_EPOCH:
            epoch += 1
        out.append((kind, f, page))
    return out


def write_trace(path: Path, events: list[Ev], *, flush_every: int = 0) -> Path:
    with TraceWriter(path, vcpus=2) as w:
        for j, (kind, f, page) in enumerate(events):
            if page is not None:
                w.snapshot(f["pa"], page, vcpu=f.get("vcpu", 0))
            else:
                w.event(kind, **f)
            if flush_every and j % flush_every == flush_every - 1:
                w.flush()  # force chunk boundaries at odd places
    return path


def replay(path: Path, **kw: Any) -> tuple[ShadowEngine, Replayer]:
    _, chunks, _ = read_all(path)
    eng = ShadowEngine(EngineConfig(vcpus=2))
    rep = Replayer(eng, **kw)
    rep.run(chunks)
    return eng, rep


def engine_result(eng: ShadowEngine) -> dict[str, Any]:
    """Everything the engine concluded, minus event numbers and input counts."""
    skip = {"events", "accesses"}
    return {
        "shadows": {k: (s.refcount, s.pinned, tuple(s.entries)) for k, s in eng.shadows.items()},
        "counters": {k: v for k, v in eng.counters.items() if k not in skip},
        "facts": [f._replace(event=0) for f in eng.facts],
        "hazards": [h._replace(event=0) for h in eng.hazards],
    }


def test_dedup_on_and_off_give_identical_results(tmp_path: Path) -> None:
    events = workload(seed=7)
    full = write_trace(tmp_path / "full.trace", events, flush_every=997)
    dedup = write_trace(tmp_path / "dedup.trace", plugin_dedup(events), flush_every=613)
    e_full, r_full = replay(full)
    e_dedup, r_dedup = replay(dedup)
    assert r_full.stats.deduplicated > r_dedup.stats.deduplicated > 0
    assert e_full.counters["shadow_fault"] > 0  # the workload did something
    assert e_full.counters["shadow_emulate"] + e_full.counters["shadow_oos_stale_write"] > 0
    assert engine_result(e_full) == engine_result(e_dedup)
    # and both are what the engine gives with no filtering at all
    e_raw, _ = replay(full, dedup=False)
    assert engine_result(e_raw)["shadows"] == engine_result(e_full)["shadows"]


def test_chunk_boundaries_do_not_matter(tmp_path: Path) -> None:
    events = workload(seed=3, n=1500)
    a = write_trace(tmp_path / "a.trace", events)
    b = write_trace(tmp_path / "b.trace", events, flush_every=1)  # one event per chunk
    e_a, r_a = replay(a)
    e_b, r_b = replay(b)
    assert r_a.stats.deduplicated == r_b.stats.deduplicated
    assert engine_result(e_a) == engine_result(e_b)


def test_repeats_are_dropped_but_table_stores_kept(tmp_path: Path) -> None:
    t = GuestTables()
    root = t.new()
    _, _, l1 = t.map(root, U, 0x1000, DATA)
    t.map(root, dm(l1), l1, KDATA)
    events: list[Ev] = [(K.SNAPSHOT, {"pa": f << 12}, p) for f, p in t.pages()]
    events.append((K.CR3_WRITE, {"val": root << 12}, None))
    for _ in range(10):  # 10 identical reads: 9 repeats
        events.append((K.READ, {"va": U, "pa": 0x1000 << 12, "info": 8}, None))
    pa = (l1 << 12) + 8
    for _ in range(2):  # two stores into the table, each a WRITE + TABLE_WRITE
        events.append((K.WRITE, {"va": dm(l1) + 8, "pa": pa, "info": 8}, None))
        events.append((K.TABLE_WRITE, {"va": dm(l1) + 8, "pa": pa, "val": 0}, None))
    eng, rep = replay(write_trace(tmp_path / "t.trace", events))
    assert rep.stats.deduplicated == 9  # the repeated reads only
    assert eng.counters["accesses"] == 1 + 2  # one read, both stores
    assert eng.counters["table_writes"] == 2


def test_translation_cross_check(tmp_path: Path) -> None:
    events = workload(seed=11, n=800)
    _, rep = replay(write_trace(tmp_path / "ok.trace", events))
    assert rep.stats.translations_checked > 0
    assert rep.stats.translation_mismatches == 0  # a correct trace: none
    # corrupt the pa of one first access, and of one repeat
    bad = list(events)
    accesses = [j for j, e in enumerate(bad) if e[0] in (K.READ, K.FETCH)]
    j1 = accesses[10]
    kind, f, page = bad[j1]
    bad[j1] = (kind, {**f, "pa": f["pa"] ^ (1 << 20)}, page)
    repeats = [j for j in accesses[20:] if bad[j - 1][0] == bad[j][0]
               and bad[j - 1][1] == bad[j][1]]
    j2 = repeats[0]
    kind, f, page = bad[j2]
    bad[j2] = (kind, {**f, "pa": f["pa"] ^ (1 << 21)}, page)
    _, rep = replay(write_trace(tmp_path / "bad.trace", bad))
    assert rep.stats.translation_mismatches == 2  # exactly the two corrupted ones
    assert {m.event for m in rep.stats.mismatches} == {j1, j2}


def test_markers_are_collected(tmp_path: Path) -> None:
    path = tmp_path / "m.trace"
    with TraceWriter(path) as w:
        w.marker("secure-root", "0x1000")
        w.event(K.READ, va=0x1000, pa=0x1000, info=8)
    _, rep = replay(path)
    assert rep.stats.markers == [(0, 0, ["secure-root", "0x1000"])]
    assert rep.engine.counters["access_no_cr3"] == 1  # no CR3 known yet


def test_replay_file_uses_header(tmp_path: Path) -> None:
    events = workload(seed=5, n=300)
    path = write_trace(tmp_path / "f.trace", events)
    eng, stats = replay_file(path)
    assert eng.config.vcpus == 2  # from the header
    assert eng.config.ram_mib == 512  # TraceWriter's default ram_bytes
    assert stats.events == len(events)
    assert va_index(U, 2) == 2  # the layout these tests assume


# -- the fast path and the event-by-event path agree -------------------------

def both_paths(path: Path, config: EngineConfig, **kw: Any) -> tuple[Replayer, Replayer]:
    """Replay ``path`` with the fast and with the event-by-event path in
    lockstep (as :meth:`Replayer.run` does, one chunk of look-ahead) and
    assert that after every chunk the engines and the replay stats are
    equal; returns the (fast, slow) replayers."""
    fast = Replayer(ShadowEngine(dataclasses.replace(config)), fast=True, **kw)
    slow = Replayer(ShadowEngine(dataclasses.replace(config)), fast=False, **kw)
    _, chunks, _ = read_all(path)
    for i, chunk in enumerate(chunks):
        after = chunks[i + 1] if i + 1 < len(chunks) else None
        next_kind = int(after.kind[0]) if after is not None and after.n else None
        for rep in (fast, slow):
            rep.feed(chunk, next_kind)
        state_f, state_s = engine_state(fast.engine), engine_state(slow.engine)
        assert state_f.keys() == state_s.keys()
        for key in state_f:
            assert state_f[key] == state_s[key], f"chunk {i}: {key}"
        # C7 and dedup counts, mismatch samples (in order) and markers
        assert dataclasses.asdict(fast.stats) == dataclasses.asdict(slow.stats), f"chunk {i}"
    # the comparison means something only if the fast path took accesses in
    # bulk (without the engine), and the slow path none
    assert fast.bulk_accesses > 0
    assert slow.bulk_accesses == 0
    return fast, slow


@pytest.mark.parametrize("name,variant", REAL, ids=[f"{n}+{v}" if v else n for n, v in REAL])
def test_fast_path_equals_event_by_event_on_recorded_traces(
    name: str, variant: str | None, goldens: Goldens
) -> None:
    # The trace's golden replay (the fast path, with the checks as event
    # tools, as every user command runs) fed the event-by-event reference (a
    # checker of the same specs told every event) in lockstep, compared the
    # engines and the replay stats after every chunk, as both_paths does, and
    # the two checkers' findings and summaries at the end (tests/replays.py)
    lock = goldens(f"{name}+{variant}" if variant else name).lockstep
    assert lock is not None and lock.chunks > 0
    assert lock.difference is None, lock.difference
    # the comparison means something only if the fast path took accesses in
    # bulk (without the engine), and the slow path none
    assert lock.fast_bulk > 0
    assert lock.slow_bulk == 0
    st = lock.fast_stats
    # a sound recording: the plugin's pa of every access that reached the
    # engine is the model's walk of the reconstructed tables
    assert st.translation_mismatches == 0
    # every access reaching the engine was cross-checked: none ran before
    # a CR3 was known (the vCPU list is read again after WINDOW_OPEN)
    assert st.translations_checked == lock.fast_accesses > 0


def test_fast_path_equals_event_by_event_on_synthetic_traces(tmp_path: Path) -> None:
    # the unit workload (2 vCPUs, INVLPGs, stores into L1 tables, read-only
    # and D-clear pages) with odd chunk boundaries, dedup on and off
    events = workload(seed=7)
    path = write_trace(tmp_path / "w.trace", events, flush_every=997)
    for dedup in (True, False):
        fast, _ = both_paths(path, EngineConfig(vcpus=2), dedup=dedup)
        assert fast.engine.counters["shadow_fault"] > 0  # the shadows did change
    # the same with two corrupted translations (a first access and a
    # repeat): both paths report the same C7 findings, samples capped at 1
    bad = list(events)
    accesses = [j for j, e in enumerate(bad) if e[0] in (K.READ, K.FETCH)]
    for j, bit in ((accesses[10], 20), (accesses[400], 21)):
        kind, f, page = bad[j]
        bad[j] = (kind, {**f, "pa": f["pa"] ^ (1 << bit)}, page)
    path = write_trace(tmp_path / "bad.trace", bad, flush_every=997)
    fast, _ = both_paths(path, EngineConfig(vcpus=2), max_mismatches=1)
    # each corrupted access differs from the model (or from its group's
    # first access) once: 2 findings, 1 kept as a sample
    assert fast.stats.translation_mismatches == 2
    assert len(fast.stats.mismatches) == 1
    # the benchmark's workload (4 roots, CR3 switches, L1 stores through the
    # direct map, bursts of repeats)
    path = tmp_path / "bench.trace"
    counts = bench.write_trace(path, 200_000)
    # chunk 0 holds the snapshots; then full chunks of 65,536 events until
    # 200,000 accesses are written: three hold fewer, so four
    assert counts["chunks"] == 1 + 4
    both_paths(path, EngineConfig(record_facts=False))


def test_dedup_grouping_fallback_gives_the_same_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dedup groups accesses by a fingerprint and checks it; when two groups
    share a fingerprint it sorts exactly instead. Force that everywhere
    (every fingerprint 0) and expect the same replay."""
    import numpy as np

    from replay.driver import replayer as replayer_mod

    events = workload(seed=13, n=2000)
    path = write_trace(tmp_path / "w.trace", events, flush_every=701)
    e_fp, r_fp = replay(path)
    monkeypatch.setattr(replayer_mod, "_FP_KEY", np.uint64(0))
    monkeypatch.setattr(replayer_mod, "_FP_SEG", np.uint64(0))
    e_exact, r_exact = replay(path)
    assert r_fp.stats.deduplicated > 0  # there were repeats to group
    assert dataclasses.asdict(r_fp.stats) == dataclasses.asdict(r_exact.stats)
    assert engine_result(e_fp) == engine_result(e_exact)


def test_fast_path_with_translation_keys_as_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Translation keys are 64-bit numbers when the chunk's accesses fit
    (every recorded trace), else 16 bytes. Make kernel addresses not fit:
    chunks with one take bytes, the others numbers, in the same sets."""
    import numpy as np

    from replay.driver import fastpath

    monkeypatch.setattr(fastpath, "_VA_TOP_ALL", np.uint64(0))
    events = workload(seed=21)
    # small chunks: those with a store into a table (through the direct
    # map) take bytes, the others numbers
    path = write_trace(tmp_path / "w.trace", events, flush_every=97)
    fast, _ = both_paths(path, EngineConfig(vcpus=2))
    assert fast.engine.counters["table_writes"] > 0  # kernel-address stores were in it


def test_c7_walks_again_only_translations_through_a_changed_entry(tmp_path: Path) -> None:
    # Two pages A and B under one L1 table. The fast path keeps each matched
    # translation until an entry its walk read changes: a store into another
    # entry of the same L1 walks nothing again; the store that remaps A makes
    # A's next access walk again, and finds its stale pa.
    t = GuestTables()
    root = t.new()
    va_a, va_b = U, U + 0x1000
    _, _, l1 = t.map(root, va_a, 0x1000)
    t.map(root, va_b, 0x1001)
    events: list[Ev] = [(K.SNAPSHOT, {"pa": f << 12}, page) for f, page in t.pages()]
    events.append((K.CR3_WRITE, {"vcpu": 0, "val": root << 12}, None))

    def read(va: int, frame: int) -> Ev:
        return (K.READ, {"vcpu": 0, "va": va, "pa": frame << 12, "info": 8}, None)

    def store(index: int, value: int) -> Ev:
        pa = (l1 << 12) + 8 * index
        return (K.TABLE_WRITE, {"vcpu": 0, "va": dm(l1) + 8 * index, "pa": pa, "val": value},
                None)

    events += [read(va_a, 0x1000), read(va_b, 0x1001),
               store(5, (0x1005 << 12) | DATA),   # another entry of the same L1
               read(va_a, 0x1000), read(va_b, 0x1001),
               store(va_index(va_a, 1), (0x1007 << 12) | DATA),  # A remapped
               read(va_a, 0x1000)]                # A's stale pa: a C7 finding
    path = write_trace(tmp_path / "c7.trace", events)
    _, chunks, _ = read_all(path)
    rep = Replayer(ShadowEngine(EngineConfig(vcpus=2)), fast=True)
    guest = rep.engine.guest
    walks: list[int] = []
    real = guest.translate

    def counted(cr3: int, va: int, walked: list[int] | None = None) -> int:
        walks.append(va)
        return real(cr3, va, walked)

    guest.translate = counted  # type: ignore[method-assign]
    rep.run(chunks)
    # A and B once each, then A again after its own entry changed: 3 walks
    # (a cache dropped per frame would walk A and B again after the first
    # store: 5)
    assert walks == [va_a, va_b, va_a]
    # the one stale access (the last event) is the one finding
    assert rep.stats.translation_mismatches == 1
    assert rep.stats.mismatches[0].event == len(events) - 1
    # each of the 5 accesses was cross-checked, from the cache or by a walk
    # (the mismatch too)
    assert rep.stats.translations_checked == 5


def test_access_path_is_the_allowed_path(tmp_path: Path) -> None:
    # the fast path takes an allowed access's shadow path from the access
    # itself (ShadowEngine.access(path=...)): it is allowed_path's, on the
    # unit workload fed event by event
    path = write_trace(tmp_path / "w.trace", workload(seed=3), flush_every=997)
    eng = ShadowEngine(EngineConfig(vcpus=2))
    _, chunks, _ = read_all(path)
    allowed = 0
    for chunk in chunks:
        for i in range(chunk.n):
            kind, vcpu, info = int(chunk.kind[i]), int(chunk.vcpu[i]), int(chunk.info[i])
            va, pa, val = int(chunk.va[i]), int(chunk.pa[i]), int(chunk.val[i])
            if kind > fmt.Kind.FETCH:
                page = chunk.page(val) if kind == fmt.Kind.SNAPSHOT else None
                eng.process(kind, chunk.first + i, vcpu, info, va, pa, int(chunk.pc[i]), val,
                            page)
                continue
            walked: list[Any] = []
            if eng.access(chunk.first + i, vcpu, kind, va, info, pa, walked):
                allowed += 1
                assert walked == eng.allowed_path(vcpu, va)
    assert allowed > 100 and eng.counters["shadow_fault"] > 0


def test_collector_thresholds_raised_during_a_replay_only() -> None:
    """Replayer.run and drive collect the young generation less often while
    they replay, and put the thresholds back after (also on an error)."""
    import gc

    from replay.driver.hub import drive
    from replay.driver.replayer import GC_YOUNG

    before = gc.get_threshold()
    seen: list[int] = []

    class Probe:
        def before_chunk(self, chunk: Any) -> None:
            seen.append(gc.get_threshold()[0])

    chunks = read_all(TRACES / "seed.trace")[1]
    drive(Replayer(), chunks, [Probe()])
    assert seen and set(seen) == {max(GC_YOUNG, before[0])}
    assert gc.get_threshold() == before

    def boom() -> Any:
        seen.append(gc.get_threshold()[0])
        yield from chunks[:1]
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError):
        Replayer().run(boom())
    assert seen[-1] == max(GC_YOUNG, before[0]) and gc.get_threshold() == before
