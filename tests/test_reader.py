"""Reader: round trips and tiny broken files."""

from __future__ import annotations

import contextlib
from pathlib import Path

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from replay.errors import TraceError, TraceFormatError, TraceVersionError
from replay.trace import format as fmt
from replay.trace.reader import TraceReader, read_all
from replay.trace.symtab import TraceSymbols, insert
from replay.trace.writer import TraceWriter

KERNEL_VA = 0xFFFF_8880_0000_1000
#: A symbols map like a capture's: a kernel function and a module's.
SYMBOLS = TraceSymbols.of([(0xFFFF_FFFF_8100_0000, 0x40, "start_kernel", ""),
                           (0xFFFF_FFFF_C020_6000, 0x100, "test_init", "test")])


def write_small(path: Path, *, footer: bool = True, events: int = 10) -> None:
    with TraceWriter(path, scenario="unit", symbols=SYMBOLS) as w:
        w.snapshot(0x1000, bytes(range(256)) * 16)
        w.marker("start", "a", "b")
        for i in range(events):
            w.access(fmt.Kind.READ, KERNEL_VA + 8 * i, 0x1000 + 8 * i, pc=0xFFFF_FFFF_8100_0000 + i)
        w.event(fmt.Kind.CR3_WRITE, val=(1 << 63) | 0x5000 | 3)
        w.close(footer=footer)


def test_round_trip_keeps_every_field(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write_small(path)
    header, chunks, footer = read_all(path)
    assert header["scenario"] == "unit"
    (chunk,) = chunks
    # 1 snapshot + 1 marker + 10 reads + 1 CR3 write
    assert chunk.n == 13
    assert chunk.kind[2:12].tolist() == [fmt.Kind.READ] * 10
    assert chunk.va[2:12].tolist() == [KERNEL_VA + 8 * i for i in range(10)]
    # values above 2**63 survive the zigzag/delta coding
    assert int(chunk.val[12]) == (1 << 63) | 0x5003
    assert chunk.markers == [["start", "a", "b"]]
    assert chunk.page(0) == bytes(range(256)) * 16
    assert footer is not None and footer["events"] == 13
    with TraceReader(path) as reader:
        assert reader.symbols == SYMBOLS


def test_symbols_map_is_optional_and_inserted_after_the_header(tmp_path: Path) -> None:
    """A trace without symbols (as the plugin writes it) reads with
    ``symbols`` None; capture's insert puts the map after the header and
    every chunk still reads the same."""
    plain, with_syms = tmp_path / "plain.trace", tmp_path / "syms.trace"
    with TraceWriter(plain, scenario="unit") as w:
        w.marker("start")
        w.access(fmt.Kind.READ, KERNEL_VA, 0x1000, pc=0xFFFF_FFFF_8100_0004)
    with_syms.write_bytes(plain.read_bytes())
    insert(with_syms, SYMBOLS)
    with TraceReader(plain) as reader:
        assert reader.symbols is None
    h0, c0, f0 = read_all(plain)
    h1, c1, f1 = read_all(with_syms)
    with TraceReader(with_syms) as reader:
        assert reader.symbols == SYMBOLS
    assert (h0, f0) == (h1, f1)
    assert [c.pc.tolist() for c in c0] == [c.pc.tolist() for c in c1]
    assert with_syms.stat().st_size > plain.stat().st_size


def test_symbols_map_elsewhere_or_malformed_is_a_format_error(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write_small(path)
    with open(path, "ab") as f:  # a second map after the footer
        f.write(msgpack.packb({"t": "symbols", "addr": [], "size": [], "name": [],
                               "module": []}))
    with pytest.raises(TraceFormatError, match="data after the footer"):
        read_all(path)
    unsorted = {"t": "symbols", "addr": [2, 1], "size": [1, 1], "name": ["a", "b"],
                "module": ["", ""]}
    short = {"t": "symbols", "addr": [1], "size": [], "name": ["a"], "module": [""]}
    for bad, message in ((unsorted, "not sorted"), (short, "differ in length")):
        blob = msgpack.packb({"t": "header", "magic": fmt.MAGIC, "version": fmt.VERSION,
                              **{k: 0 for k in fmt.HEADER_KEYS[2:]}})
        path.write_bytes(blob + msgpack.packb(bad))
        with pytest.raises(TraceFormatError, match=message):
            read_all(path)


def test_u64_extremes_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    values = [0, 2**64 - 1, 1, 2**63, 2**63 - 1, 0]
    with TraceWriter(path) as w:
        for v in values:
            w.event(fmt.Kind.INVLPG, va=v, pc=2**64 - 1 - v)
    _, (chunk,), _ = read_all(path)
    assert chunk.va.tolist() == values
    assert chunk.pc.tolist() == [2**64 - 1 - v for v in values]


def test_chunks_split_at_chunk_events(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with TraceWriter(path) as w:
        for i in range(fmt.CHUNK_EVENTS + 5):
            w.access(fmt.Kind.WRITE, i, i)
    _, chunks, footer = read_all(path)
    # one full chunk and one of the 5 left over
    assert [c.n for c in chunks] == [fmt.CHUNK_EVENTS, 5]
    assert chunks[1].first == fmt.CHUNK_EVENTS
    assert footer is not None and footer["chunks"] == 2


def test_missing_footer_is_truncated(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write_small(path, footer=False)
    with pytest.raises(TraceFormatError, match="truncated"):
        read_all(path)
    with TraceReader(path, allow_truncated=True) as reader:
        chunks = list(reader)
        assert reader.truncated and reader.footer is None
    assert sum(c.n for c in chunks) == 13  # the valid prefix is all there


def test_bad_magic_and_version(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    header = {"t": "header", "magic": "NOPE", "version": 1}
    path.write_bytes(msgpack.packb(header))
    with pytest.raises(TraceFormatError, match="bad magic"):
        read_all(path)
    header = {"t": "header", "magic": fmt.MAGIC, "version": fmt.VERSION + 1}
    path.write_bytes(msgpack.packb(header))
    with pytest.raises(TraceVersionError, match="version"):
        read_all(path)


def test_error_names_path_chunk_and_offset(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write_small(path)
    data = bytearray(path.read_bytes())
    with open(path, "rb") as f:  # the chunk follows the header and the symbols map
        unpacker = msgpack.Unpacker(f, raw=False, strict_map_key=False)
        unpacker.unpack()
        unpacker.unpack()
        chunk_at = unpacker.tell()
    # flip the chunk's "seq" value (0 -> 5): the first byte after the "seq" key
    at = data.index(b"\xa3seq", chunk_at) + 4
    data[at] = 5
    path.write_bytes(bytes(data))
    with pytest.raises(TraceFormatError) as err:
        read_all(path)
    assert err.value.chunk == 0 and err.value.offset == chunk_at
    assert str(path) in str(err.value)


def test_footer_counts_must_match(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    with TraceWriter(path) as w:
        w.access(fmt.Kind.READ, 1, 1)
        w.events += 1  # the footer will claim one event more than written
    with pytest.raises(TraceFormatError, match="footer counts"):
        read_all(path)


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.trace"
    empty.write_bytes(b"")
    with pytest.raises(TraceFormatError, match="empty"):
        read_all(empty)
    with pytest.raises(TraceFormatError, match="cannot open"):
        read_all(tmp_path / "absent.trace")


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("fuzz") / "t.trace"
    write_small(path, events=40)
    return path.read_bytes()


def _read_fully(path: Path, *, allow_truncated: bool) -> None:
    """Read every chunk; only TraceError may come out."""
    with contextlib.suppress(TraceError), TraceReader(path, allow_truncated=allow_truncated) as r:
        for _ in r:
            pass


def test_every_truncation_point_is_a_trace_error(small_trace: bytes, tmp_path: Path) -> None:
    path = tmp_path / "cut.trace"
    for cut in range(len(small_trace)):
        path.write_bytes(small_trace[:cut])
        with pytest.raises(TraceError):
            read_all(path)
        _read_fully(path, allow_truncated=True)


def _corrupt_and_read(trace: bytes, tmp_path: Path, data: st.DataObject) -> None:
    """Overwrite 1 to 8 random bytes of ``trace``; reading it (with and
    without --allow-truncated) must end cleanly or in a trace error."""
    blob = bytearray(trace)
    for _ in range(data.draw(st.integers(1, 8))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] = data.draw(st.integers(0, 255))
    path = tmp_path / "bad.trace"
    path.write_bytes(bytes(blob))
    _read_fully(path, allow_truncated=False)
    _read_fully(path, allow_truncated=True)


@settings(
    max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_random_corruption_never_escapes(
    small_trace: bytes, tmp_path: Path, data: st.DataObject
) -> None:
    _corrupt_and_read(small_trace, tmp_path, data)


def test_numpy_columns_have_the_format_types(tmp_path: Path) -> None:
    path = tmp_path / "t.trace"
    write_small(path)
    _, (chunk,), _ = read_all(path)
    for name in fmt.U8_COLUMNS:
        assert getattr(chunk, name).dtype == np.uint8
    for name in fmt.U64_COLUMNS:
        assert getattr(chunk, name).dtype == np.uint64


# -- large chunks: their columns are decoded by several threads ---------------

#: Events of the large chunk: at least reader._PARALLEL_MIN_EVENTS (4096), so
#: that its columns go to the decode threads.
LARGE = 5000


def write_large(path: Path, seed: int = 1) -> None:
    rng = np.random.default_rng(seed)
    kinds = rng.choice([int(fmt.Kind.READ), int(fmt.Kind.WRITE), int(fmt.Kind.FETCH)], LARGE)
    va, pa, pc = (rng.integers(0, 2**64, LARGE, dtype=np.uint64) for _ in range(3))
    with TraceWriter(path, scenario="large", vcpus=4) as w:
        for i in range(LARGE):
            w.event(int(kinds[i]), vcpu=i % 4, va=int(va[i]), pa=int(pa[i]), pc=int(pc[i]),
                    val=i, info=8 | (fmt.INFO_USER if i % 3 else 0))


@pytest.fixture(scope="module")
def large_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("large") / "t.trace"
    write_large(path)
    return path


def test_threaded_decode_equals_one_thread(
    large_trace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from replay.trace import reader as reader_mod

    assert reader_mod._PARALLEL_MIN_EVENTS <= LARGE  # the large chunk is decoded in parallel
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(reader_mod, "DECODE_THREADS", threads)
        _, (chunk,), _ = read_all(large_trace)
        results.append({c: getattr(chunk, c).tolist() for c in fmt.COLUMNS})
    assert results[0] == results[1] == results[2]
    assert results[0]["val"] == list(range(LARGE))  # and it is what was written


def _replace_columns(path: Path, blobs: dict[str, bytes]) -> int:
    """Rewrite the first chunk's column blobs; returns the chunk's offset."""
    with open(path, "rb") as f:
        objs = list(msgpack.Unpacker(f, raw=False, strict_map_key=False))
    objs[1]["cols"].update(blobs)
    header = msgpack.packb(objs[0], use_bin_type=True)
    path.write_bytes(b"".join(msgpack.packb(o, use_bin_type=True) for o in objs))
    return len(header)


@pytest.mark.parametrize("threads", [1, 2])
def test_broken_columns_of_a_large_chunk(
    large_trace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int
) -> None:
    from replay.trace import reader as reader_mod

    monkeypatch.setattr(reader_mod, "DECODE_THREADS", threads)
    path = tmp_path / "bad.trace"
    path.write_bytes(large_trace.read_bytes())
    # two broken columns: the error names the first in format order (pa
    # before val), whichever thread finished first
    offset = _replace_columns(path, {"val": b"not zstd", "pa": b"\x28\xb5\x2f\xfd junk"})
    with pytest.raises(TraceFormatError, match="column pa: column declares 106 bytes") as err:
        read_all(path)
    assert err.value.chunk == 0 and err.value.offset == offset
    # a column of the wrong length, and one that is not bytes at all
    path.write_bytes(large_trace.read_bytes())
    from replay.trace import columns

    _replace_columns(path, {"info": columns.encode_u8(np.zeros(LARGE - 1, np.uint8)),
                            "pc": 7})  # type: ignore[dict-item]
    with pytest.raises(TraceFormatError, match="column info: column declares 4999 bytes"):
        read_all(path)


def test_unknown_kind_in_a_large_chunk_names_the_event(
    large_trace: Path, tmp_path: Path
) -> None:
    from replay.trace import columns

    _, (chunk,), _ = read_all(large_trace)
    kind = chunk.kind.copy()
    kind[4321] = 200  # no such kind
    kind[4500] = 0  # nor this, later
    path = tmp_path / "bad.trace"
    path.write_bytes(large_trace.read_bytes())
    _replace_columns(path, {"kind": columns.encode_u8(kind)})
    with pytest.raises(TraceFormatError, match="unknown event kind 200") as err:
        read_all(path)
    assert err.value.event == 4321  # the first bad one


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_corruption_of_a_large_chunk_never_escapes(
    large_trace: Path, tmp_path: Path, data: st.DataObject
) -> None:
    _corrupt_and_read(large_trace.read_bytes(), tmp_path, data)


# -- Prefetch: the next chunk decoded by a background thread -------------------


def write_chunks(path: Path, chunks: int, per_chunk: int = 50, footer: bool = True) -> None:
    with TraceWriter(path) as w:
        for c in range(chunks):
            for i in range(per_chunk):
                w.access(fmt.Kind.READ, KERNEL_VA + 8 * i, 0x1000 + 8 * i, pc=c)
            w.flush()
        w.close(footer=footer)


def test_prefetch_gives_the_same_chunks(tmp_path: Path) -> None:
    from replay.trace.prefetch import Prefetch

    path = tmp_path / "t.trace"
    write_chunks(path, 5)
    _, plain, _ = read_all(path)
    with TraceReader(path) as reader, Prefetch(reader) as ahead:
        fetched = list(ahead)
        assert reader.footer is not None  # the source was read to its end
    assert [c.seq for c in fetched] == [0, 1, 2, 3, 4]
    for a, b in zip(plain, fetched, strict=True):
        assert all(np.array_equal(getattr(a, c), getattr(b, c)) for c in fmt.COLUMNS)


def test_prefetch_raises_where_the_reader_would(tmp_path: Path) -> None:
    from replay.trace.prefetch import Prefetch

    path = tmp_path / "t.trace"
    write_chunks(path, 4, footer=False)  # truncated: no footer after 4 chunks
    got = []
    with (TraceReader(path) as reader, Prefetch(reader) as ahead,
          pytest.raises(TraceFormatError, match="truncated")):
        for chunk in ahead:
            got.append(chunk.seq)
    assert got == [0, 1, 2, 3]  # every valid chunk came first


def test_prefetch_close_stops_the_thread(tmp_path: Path) -> None:
    from replay.trace.prefetch import Prefetch

    path = tmp_path / "t.trace"
    write_chunks(path, 20)
    with TraceReader(path) as reader:
        ahead = Prefetch(reader)
        for chunk in ahead:
            assert chunk.seq == 0
            break  # the consumer stops early
        ahead.close()
        assert ahead._thread is not None and not ahead._thread.is_alive()
        # the background thread read at most the queue's one chunk and the
        # one it was handing over beyond the consumer's
        assert reader.chunks <= 3


@pytest.mark.parametrize("n", [1, 2, 7, 4097, fmt.CHUNK_EVENTS])
@pytest.mark.parametrize("top", [0, 1 << 20, 1 << 40, 1 << 63])
def test_u64_column_round_trip(n: int, top: int) -> None:
    """decode_u64 widens only the lower four byte planes when the upper
    four are zero (every zigzag delta below 2**32): both ways, odd n too."""
    from replay.trace import columns

    rng = np.random.default_rng(n + top)
    values = rng.integers(0, top, n, dtype=np.uint64) if top else np.zeros(n, np.uint64)
    values[::5] = 2**64 - 1 - values[::5]  # and some wrap-around deltas
    steps = np.cumsum(rng.integers(0, 1 << 12, n, dtype=np.uint64))  # small deltas only
    for v in (values, steps):
        out = columns.decode_u64(columns.encode_u64(v), n)
        assert out.dtype == np.uint64 and out.tolist() == v.tolist()
