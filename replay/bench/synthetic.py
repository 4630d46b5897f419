"""The synthetic part of the replay benchmark (``make bench-replay``).

Writes a synthetic trace of 10 million accesses in the real format, built
in bulk with numpy (chunk maps encoded with :mod:`replay.trace.columns`, exactly
as :class:`~replay.trace.writer.TraceWriter` writes them), then measures, in one
run:

* decode rate: events/s reading every chunk with :class:`TraceReader`;
* end-to-end replay rate: accesses/s through :class:`Replayer` and the
  engine (canonical dedup on, as ``shadowtrace replay`` runs);
* peak memory: ``ru_maxrss`` of the process.

The workload looks like a dedup=off capture of a small kernel workload:
four address spaces sharing a kernel half (direct map through one shared
L3), CR3 switches every few thousand events, stores into user L1 tables
through the direct map (WRITE + TABLE_WRITE, rewriting the entry's value so
translations stay valid), and a working set of 256 kernel and 4 x 64 user
pages accessed in bursts of repeats.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from ..driver.replayer import Replayer
from ..shadow.config import EngineConfig
from ..shadow.engine import ShadowEngine
from ..trace import columns
from ..trace import format as fmt
from ..trace.reader import TraceReader

K = fmt.Kind
DIRECT_MAP = 0xFFFF_8880_0000_0000
USER = 0x40_0000
P, RW, US, A, D = 1, 2, 4, 1 << 5, 1 << 6
TABLE = P | RW | US | A
DATA = P | RW | US | A | D
KDATA = P | RW | A | D
ROOTS = 4
USER_PAGES = 64
KERNEL_PAGES = 256
#: Frames: tables from 0x1000, user data 0x1100.., kernel data 0x1200..
T0, UDATA, KDATA0 = 0x1000, 0x1100, 0x1200


def _idx(va: int, level: int) -> int:
    return (va >> (12 + 9 * (level - 1))) & 0x1FF


class _Tables:
    """The guest tables of the workload: frame -> 512 entries."""

    def __init__(self) -> None:
        self.t: dict[int, npt.NDArray[np.uint64]] = {}
        self.next = T0

    def new(self) -> int:
        f = self.next
        self.next += 1
        self.t[f] = np.zeros(512, dtype=np.uint64)
        return f

    def link(self, frame: int, i: int, child: int, flags: int = TABLE) -> None:
        self.t[frame][i] = (child << 12) | flags


def _build_tables() -> tuple[_Tables, list[int], list[int]]:
    tb = _Tables()
    roots = [tb.new() for _ in range(ROOTS)]
    k3, k2, k1 = tb.new(), tb.new(), tb.new()
    for r in roots:
        tb.link(r, _idx(DIRECT_MAP, 4), k3, P | RW | A)
    tb.link(k3, 0, k2, P | RW | A)
    # frames 0x1000..0x13ff: L2 entries 8 and 9 of the direct map
    k1b = tb.new()
    tb.link(k2, T0 >> 9, k1, P | RW | A)
    tb.link(k2, (T0 >> 9) + 1, k1b, P | RW | A)
    user_l1 = []
    for r_i, r in enumerate(roots):
        u3, u2, u1 = tb.new(), tb.new(), tb.new()
        tb.link(r, _idx(USER, 4), u3)
        tb.link(u3, _idx(USER, 3), u2)
        tb.link(u2, _idx(USER, 2), u1)
        for k in range(USER_PAGES):
            tb.t[u1][k] = ((UDATA + r_i * USER_PAGES + k) << 12) | DATA
        user_l1.append(u1)
    for f in range(T0, T0 + 1024):
        l1 = k1 if f < T0 + 512 else k1b
        tb.t[l1][f & 0x1FF] = (f << 12) | KDATA
    return tb, roots, user_l1


def _chunk_map(seq: int, cols: dict[str, npt.NDArray[Any]], pages: bytes = b"") -> bytes:
    n = len(cols["kind"])
    enc = {c: columns.encode_u8(cols[c]) for c in fmt.U8_COLUMNS}
    enc |= {c: columns.encode_u64(cols[c]) for c in fmt.U64_COLUMNS}
    out: bytes = msgpack.packb({fmt.KEY_TYPE: fmt.TYPE_CHUNK, "seq": seq, "n": n, "cols": enc,
                                "pages": columns.compress(pages), "markers": []},
                               use_bin_type=True)
    return out


def write_trace(path: Path, accesses: int, seed: int = 1) -> dict[str, int]:
    """Write the workload with ``accesses`` accesses; returns event counts."""
    rng = np.random.default_rng(seed)
    tb, roots, user_l1 = _build_tables()
    by_kind: dict[int, int] = {}
    n_access = 0
    seq = 0
    with open(path, "wb") as f:
        f.write(msgpack.packb({
            fmt.KEY_TYPE: fmt.TYPE_HEADER, "magic": fmt.MAGIC, "version": fmt.VERSION,
            "qemu": "", "options": {"dedup": "off"}, "kernel": "", "ram_bytes": 512 << 20,
            "vcpus": 1, "scenario": "bench"}, use_bin_type=True))
        # chunk 0: snapshots of every table, then the first CR3
        frames = sorted(tb.t)
        nsnap = len(frames)
        c0 = {c: np.zeros(nsnap + 1, dtype=np.uint8 if c in fmt.U8_COLUMNS else np.uint64)
              for c in fmt.COLUMNS}
        c0["kind"][:nsnap] = K.SNAPSHOT
        c0["pa"][:nsnap] = np.array(frames, dtype=np.uint64) << np.uint64(12)
        c0["val"][:nsnap] = np.arange(nsnap, dtype=np.uint64)
        c0["kind"][nsnap] = K.CR3_WRITE
        c0["val"][nsnap] = roots[0] << 12
        pages = b"".join(tb.t[fr].astype("<u8").tobytes() for fr in frames)
        f.write(_chunk_map(seq, c0, pages))
        seq += 1
        for k in (int(K.SNAPSHOT), int(K.CR3_WRITE)):
            by_kind[k] = by_kind.get(k, 0) + int((c0["kind"] == k).sum())
        events = nsnap + 1
        cur_root = 0
        n = fmt.CHUNK_EVENTS
        while n_access < accesses:
            kind = np.empty(n, dtype=np.uint8)
            va = np.empty(n, dtype=np.uint64)
            pa = np.empty(n, dtype=np.uint64)
            val = np.zeros(n, dtype=np.uint64)
            pc = rng.integers(0xFFFF_FFFF_8100_0000, 0xFFFF_FFFF_8110_0000, n,
                              dtype=np.uint64) & ~np.uint64(3)
            info = np.full(n, 8, dtype=np.uint8)
            # CR3 switches about every 4000 events; the root of every event
            sw = rng.random(n) < 1 / 4000
            sw[-1] = False
            nxt_roots = (cur_root + np.cumsum(rng.integers(1, ROOTS, n) * sw)) % ROOTS
            root = np.where(sw, nxt_roots, nxt_roots).astype(np.int64)
            cur_root = int(root[-1])
            # accesses in bursts of repeats (mean 4) over the working set
            m = n // 2
            user = rng.random(m) < 0.3
            page = np.where(user, rng.integers(0, USER_PAGES, m), rng.integers(0, KERNEL_PAGES, m))
            off = rng.integers(0, 512, m).astype(np.uint64) * np.uint64(8)
            akind = rng.choice(np.array([K.READ, K.READ, K.READ, K.WRITE, K.FETCH], np.uint8), m)
            reps = rng.geometric(0.25, m)
            sel = np.repeat(np.arange(m), reps)[:n]
            u, pg, of = user[sel], page[sel].astype(np.uint64), off[sel]
            r = root.astype(np.uint64)
            va[:] = np.where(u, np.uint64(USER) + (pg << np.uint64(12)),
                             np.uint64(DIRECT_MAP) + ((np.uint64(KDATA0) + pg) << np.uint64(12)))
            va |= of
            frame = np.where(u, np.uint64(UDATA) + r * np.uint64(USER_PAGES) + pg,
                             np.uint64(KDATA0) + pg)
            pa[:] = (frame << np.uint64(12)) | of
            kind[:] = akind[sel]
            info[u] |= fmt.INFO_USER
            # stores into this root's user L1 (0.2%): WRITE + TABLE_WRITE
            tw = np.flatnonzero(rng.random(n) < 0.002)
            tw = tw[(tw + 1 < n) & ~sw[tw] & ~sw[np.minimum(tw + 1, n - 1)]]
            tw = tw[np.diff(tw, prepend=-2) > 1]
            l1 = np.array(user_l1, dtype=np.uint64)[root[tw]]
            ent = rng.integers(0, USER_PAGES, len(tw)).astype(np.uint64)
            epa = (l1 << np.uint64(12)) | (ent << np.uint64(3))
            kind[tw], kind[tw + 1] = K.WRITE, K.TABLE_WRITE
            va[tw] = va[tw + 1] = np.uint64(DIRECT_MAP) + epa
            pa[tw] = pa[tw + 1] = epa
            info[tw], info[tw + 1] = 8, 0
            val[tw + 1] = ((np.uint64(UDATA) + root[tw].astype(np.uint64) * np.uint64(USER_PAGES)
                            + ent) << np.uint64(12)) | np.uint64(DATA)
            kind[sw], va[sw], pa[sw], info[sw] = K.CR3_WRITE, 0, 0, 0
            val[sw] = np.array(roots, dtype=np.uint64)[root[sw]] << np.uint64(12)
            cols: dict[str, npt.NDArray[Any]] = {
                "kind": kind, "vcpu": np.zeros(n, np.uint8), "info": info, "va": va,
                "pa": pa, "pc": pc, "val": val}
            f.write(_chunk_map(seq, cols))
            seq += 1
            events += n
            counts = np.bincount(kind, minlength=16)
            for k in np.flatnonzero(counts).tolist():
                by_kind[k] = by_kind.get(k, 0) + int(counts[k])
            n_access += int(counts[1] + counts[2] + counts[3])
        f.write(msgpack.packb({
            fmt.KEY_TYPE: fmt.TYPE_FOOTER, "chunks": seq, "events": events, "by_kind": by_kind,
            "seen": n_access, "recorded": n_access, "deduplicated": 0, "dropped": 0,
            "tables": nsnap}, use_bin_type=True))
    return {"events": events, "accesses": n_access, "chunks": seq}


def rss_mib() -> float:
    """Peak memory of this process so far (ru_maxrss, KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run(accesses: int, dedup: bool = True, keep: Path | None = None) -> list[str]:
    """Write the synthetic trace, decode it, replay it with a bare
    :class:`Replayer` (no tools); the report's lines."""
    out: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        path = keep or Path(tmp) / "bench.trace"
        t0 = time.perf_counter()
        counts = write_trace(path, accesses)
        t_write = time.perf_counter() - t0
        size = path.stat().st_size
        out.append(f"trace: {counts['events']:,} events ({counts['accesses']:,} accesses), "
                   f"{counts['chunks']:,} chunks, {size / 2**20:.1f} MiB "
                   f"({size / counts['accesses']:.2f} B/access), written in {t_write:.1f} s")
        rss0 = rss_mib()
        t0 = time.perf_counter()
        n = 0
        with TraceReader(path) as reader:
            for chunk in reader:
                n += chunk.n
        t_dec = time.perf_counter() - t0
        out.append(f"decode: {n / t_dec / 1e6:.1f} M events/s ({t_dec:.2f} s)")
        cfg = EngineConfig(record_facts=False)
        rep = Replayer(ShadowEngine(cfg), dedup=dedup)
        t0 = time.perf_counter()
        with TraceReader(path) as reader:
            st = rep.run(reader)
        t_rep = time.perf_counter() - t0
        eng = rep.engine
        out.append(f"bare replay: {st.accesses / t_rep / 1e6:.2f} M accesses/s ({t_rep:.2f} s; "
                   f"{st.deduplicated:,} repeats dropped, {eng.counters['accesses']:,} accesses "
                   f"reached the engine, {eng.counters['shadow_fault']:,} shadow faults, "
                   f"C7 mismatches {st.translation_mismatches})")
        out.append(f"peak memory: {rss_mib():.0f} MiB ru_maxrss (after writing: {rss0:.0f} MiB)")
    return out
