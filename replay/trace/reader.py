"""Trace reader: decode and validate only, no semantics.

:class:`TraceReader` streams a trace chunk by chunk with bounded memory (one
chunk's bytes at a time), decoding each column in bulk with numpy. Every
problem becomes a :class:`TraceFormatError` or :class:`TraceVersionError`
naming the path, chunk, event and byte offset.
"""

from __future__ import annotations

import functools
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import msgpack
import numpy as np
import numpy.typing as npt

from ..errors import TraceFormatError, TraceVersionError
from . import columns, symtab
from . import format as fmt

#: Largest msgpack object accepted: a full chunk with every event a snapshot
#: is about CHUNK_EVENTS * 4 KiB compressed to much less; allow 1 GiB.
_MAX_OBJECT = 1 << 30

#: Event kinds as a lookup table (kind byte -> known), and their range.
_KIND_OK = np.zeros(256, dtype=bool)
_KIND_OK[[int(k) for k in fmt.Kind]] = True
_KIND_LO, _KIND_HI = min(fmt.Kind), max(fmt.Kind)
_KINDS_CONTIGUOUS = len(fmt.Kind) == _KIND_HI - _KIND_LO + 1

#: Columns in the order a chunk's decoding hands them out, costliest first
#: (so that the threads finish together); errors are reported in format order.
_DECODE_ORDER = ("va", "pa", "pc", "val", "kind", "info", "vcpu")
assert sorted(_DECODE_ORDER) == sorted(fmt.COLUMNS)
#: Chunks with fewer events than this are decoded by the calling thread alone.
_PARALLEL_MIN_EVENTS = 4096


def _default_threads() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 4))


#: Threads decoding one chunk's columns together (the caller's included);
#: zstd and numpy release the GIL, so they run in parallel. 1: no pool.
DECODE_THREADS = _default_threads()
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _decode_pool() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(
                max_workers=DECODE_THREADS - 1, thread_name_prefix="shadowtrace-decode"
            )
        return _pool


def _forget_pool() -> None:
    """In a forked child the pool's threads do not exist: make a new one."""
    global _pool, _pool_lock
    _pool, _pool_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def _run_all(jobs: list[Callable[[], Any]]) -> list[Any]:
    """Run ``jobs`` on the calling thread and up to ``DECODE_THREADS - 1``
    pool threads, each taking the next job not yet taken. Returns each job's
    result, or the Exception it raised."""
    results: list[Any] = [None] * len(jobs)
    taken = itertools.count()  # next() on it is atomic under the GIL

    def drain() -> None:
        for i in iter(taken.__next__, None):
            if i >= len(jobs):
                return
            try:
                results[i] = jobs[i]()
            except Exception as err:  # noqa: BLE001 - handed to the caller
                results[i] = err

    helpers = min(DECODE_THREADS, len(jobs)) - 1
    if helpers <= 0:
        drain()
        return results
    pool = _decode_pool()
    futures = [pool.submit(drain) for _ in range(helpers)]
    drain()
    wait(futures)
    for future in futures:
        future.result()  # a helper that died of something else than a job's error
    return results


@dataclass
class Chunk:
    """One decoded chunk: columns as numpy arrays, events ``first .. first+n``."""

    seq: int
    first: int
    kind: npt.NDArray[np.uint8]
    vcpu: npt.NDArray[np.uint8]
    info: npt.NDArray[np.uint8]
    va: npt.NDArray[np.uint64]
    pa: npt.NDArray[np.uint64]
    pc: npt.NDArray[np.uint64]
    val: npt.NDArray[np.uint64]
    pages: bytes = b""
    markers: list[list[str]] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.kind)

    def page(self, index: int) -> bytes:
        """The 4 KiB snapshot with this index in the chunk's pages."""
        start = index * fmt.PAGE_SIZE
        return self.pages[start : start + fmt.PAGE_SIZE]


class TraceReader:
    """Iterate over a trace's chunks; ``header`` is read on open.

    After iteration, ``footer`` holds the footer map, or None when the trace
    was truncated and ``allow_truncated`` let the valid prefix through
    (``truncated`` is then True). ``symbols`` (read on open) is the trace's
    :class:`~replay.trace.symtab.TraceSymbols`, or None when it has none.
    """

    def __init__(self, path: str | Path, *, allow_truncated: bool = False) -> None:
        self.path = str(path)
        self.allow_truncated = allow_truncated
        self.footer: dict[str, Any] | None = None
        self.truncated = False
        self.events = 0
        self.chunks = 0
        try:
            self._file: IO[bytes] = open(self.path, "rb")  # noqa: SIM115
        except OSError as err:
            raise TraceFormatError(self.path, f"cannot open: {err.strerror}") from err
        self._unpacker = msgpack.Unpacker(
            self._file,
            raw=False,
            max_buffer_size=_MAX_OBJECT,
            strict_map_key=False,
        )
        #: The object read after the header when it was not a symbols map
        #: (or the end of the file, or the error reading it), for __iter__.
        self._peeked: tuple[Any, int] | BaseException | None = None
        self.header = self._read_header()
        self.symbols = self._read_symbols()

    @property
    def position(self) -> int:
        """Bytes of the file decoded so far (how far a replay has come)."""
        return int(self._unpacker.tell())

    # -- context manager -------------------------------------------------
    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TraceReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ---------------------------------------------------------
    def _next(self) -> tuple[Any, int]:
        """Next msgpack object and its byte offset; StopIteration at EOF."""
        if self._peeked is not None:
            peeked, self._peeked = self._peeked, None
            if isinstance(peeked, BaseException):
                raise peeked
            return peeked
        offset = self._unpacker.tell()
        try:
            obj = self._unpacker.unpack()
        except msgpack.OutOfData:
            if not self._has_more(offset):
                raise StopIteration from None
            raise TraceFormatError(
                self.path, "file ends inside an object", offset=offset
            ) from None
        except StopIteration:
            raise
        except (ValueError, msgpack.UnpackException, TypeError) as err:
            raise TraceFormatError(
                self.path, f"bad msgpack data: {err}", offset=offset
            ) from err
        return obj, offset

    def _has_more(self, offset: int) -> bool:
        try:
            size = Path(self.path).stat().st_size
        except OSError:
            return False
        return size > offset

    def _read_header(self) -> dict[str, Any]:
        try:
            obj, offset = self._next()
        except StopIteration:
            raise TraceFormatError(self.path, "empty file, no header", offset=0) from None
        if not isinstance(obj, dict) or obj.get(fmt.KEY_TYPE) != fmt.TYPE_HEADER:
            raise TraceFormatError(self.path, "not a shadowtrace trace (no header)", offset=offset)
        if obj.get("magic") != fmt.MAGIC:
            raise TraceFormatError(self.path, f"bad magic {obj.get('magic')!r}", offset=offset)
        version = obj.get("version")
        if version not in fmt.READS_VERSIONS:
            known = ", ".join(str(v) for v in fmt.READS_VERSIONS)
            raise TraceVersionError(
                self.path,
                f"format version {version!r}, this reader reads versions {known}",
                offset=offset,
            )
        missing = [k for k in fmt.HEADER_KEYS if k not in obj]
        if missing:
            raise TraceFormatError(
                self.path, f"header lacks {', '.join(missing)}", offset=offset
            )
        return obj

    def _read_symbols(self) -> symtab.TraceSymbols | None:
        """The symbols map if one follows the header; whatever else follows
        (a chunk, the end, an error) is kept for iteration."""
        try:
            obj, offset = self._next()
        except (StopIteration, TraceFormatError) as err:
            self._peeked = err
            return None
        if isinstance(obj, dict) and obj.get(fmt.KEY_TYPE) == fmt.TYPE_SYMBOLS:
            return symtab.decode(obj, self.path, offset)
        self._peeked = (obj, offset)
        return None

    def __iter__(self) -> Iterator[Chunk]:
        while True:
            try:
                obj, offset = self._next()
            except StopIteration:
                self._end_without_footer(self._unpacker.tell())
                return
            except TraceFormatError:
                if not self.allow_truncated:
                    raise
                self.truncated = True
                return
            if not isinstance(obj, dict):
                raise TraceFormatError(
                    self.path, f"expected a map, found {type(obj).__name__}",
                    offset=offset, chunk=self.chunks,
                )
            kind = obj.get(fmt.KEY_TYPE)
            if kind == fmt.TYPE_CHUNK:
                chunk = self._decode_chunk(obj, offset)
                self.chunks += 1
                self.events += chunk.n
                yield chunk
            elif kind == fmt.TYPE_FOOTER:
                self._check_footer(obj, offset)
                self.footer = obj
                try:
                    extra, extra_at = self._next()
                except StopIteration:
                    return
                raise TraceFormatError(
                    self.path, "data after the footer", offset=extra_at
                )
            elif kind == fmt.TYPE_SYMBOLS:
                raise TraceFormatError(
                    self.path, "a symbols map not right after the header",
                    offset=offset, chunk=self.chunks,
                )
            else:
                raise TraceFormatError(
                    self.path, f"unknown object type {kind!r}",
                    offset=offset, chunk=self.chunks,
                )

    def _end_without_footer(self, offset: int) -> None:
        if self.allow_truncated:
            self.truncated = True
            return
        raise TraceFormatError(
            self.path, "truncated: no footer (capture did not finish)", offset=offset
        )

    def _decode_chunk(self, obj: dict[str, Any], offset: int) -> Chunk:
        where = {"offset": offset, "chunk": self.chunks}

        def bad(message: str) -> TraceFormatError:
            return TraceFormatError(self.path, message, **where)

        missing = [k for k in fmt.CHUNK_KEYS if k not in obj]
        if missing:
            raise bad(f"chunk lacks {', '.join(missing)}")
        n, seq, cols = obj["n"], obj["seq"], obj["cols"]
        if not isinstance(n, int) or not 0 <= n <= fmt.CHUNK_EVENTS:
            raise bad(f"bad event count {n!r}")
        if seq != self.chunks:
            raise bad(f"chunk sequence {seq!r}, expected {self.chunks}")
        if not isinstance(cols, dict) or set(cols) != set(fmt.COLUMNS):
            raise bad("chunk columns are not " + ", ".join(fmt.COLUMNS))
        decoded = self._decode_columns(cols, n, bad)
        markers = obj["markers"]
        if not isinstance(markers, list) or not all(
            isinstance(m, list) and m and all(isinstance(s, str) for s in m)
            for m in markers
        ):
            raise bad("markers are not lists of strings")
        kind = decoded["kind"]
        if n and not (
            _KINDS_CONTIGUOUS and kind.min() >= _KIND_LO and kind.max() <= _KIND_HI
        ) and not _KIND_OK[kind].all():
            i = int(np.argmin(_KIND_OK[kind]))
            raise TraceFormatError(
                self.path, f"unknown event kind {int(kind[i])}",
                offset=offset, chunk=self.chunks, event=self.events + i,
            )
        snaps = kind == fmt.Kind.SNAPSHOT
        n_pages = int(snaps.sum())
        pages_blob = obj["pages"]
        try:
            pages = columns.decompress(pages_blob, n_pages * fmt.PAGE_SIZE)
        except ValueError as err:
            raise bad(f"pages: {err}") from err
        if n_pages and not np.array_equal(
            np.sort(decoded["val"][snaps]), np.arange(n_pages, dtype=np.uint64)
        ):
            raise bad("snapshot events do not index the pages blob one to one")
        mark = kind == fmt.Kind.MARKER
        if mark.any() and int(decoded["val"][mark].max()) >= len(markers):
            i = int(np.argmax(mark & (decoded["val"] >= len(markers))))
            raise TraceFormatError(
                self.path, "marker event names no marker",
                offset=offset, chunk=self.chunks, event=self.events + i,
            )
        return Chunk(seq=seq, first=self.events, pages=pages, markers=markers, **decoded)

    @staticmethod
    def _decode_columns(
        cols: dict[str, Any], n: int, bad: Callable[[str], TraceFormatError]
    ) -> dict[str, Any]:
        """Every column of a chunk, decoded by several threads when it is
        large; a broken column raises for the first one in format order."""
        jobs: list[Callable[[], Any]] = []
        for name in _DECODE_ORDER:
            decode = columns.decode_u8 if name in fmt.U8_COLUMNS else columns.decode_u64
            jobs.append(functools.partial(decode, cols[name], n))
        if n >= _PARALLEL_MIN_EVENTS:
            results = _run_all(jobs)
        else:
            results = []
            for job in jobs:
                try:
                    results.append(job())
                except ValueError as err:
                    results.append(err)
        decoded = dict(zip(_DECODE_ORDER, results, strict=True))
        for name in fmt.COLUMNS:
            value = decoded[name]
            if isinstance(value, ValueError):
                raise bad(f"column {name}: {value}") from value
            if isinstance(value, Exception):
                raise value
        return decoded

    def _check_footer(self, obj: dict[str, Any], offset: int) -> None:
        missing = [k for k in fmt.FOOTER_KEYS if k not in obj]
        if missing:
            raise TraceFormatError(
                self.path, f"footer lacks {', '.join(missing)}", offset=offset
            )
        if obj["chunks"] != self.chunks or obj["events"] != self.events:
            raise TraceFormatError(
                self.path,
                f"footer counts {obj['chunks']} chunks / {obj['events']} events, "
                f"read {self.chunks} / {self.events}",
                offset=offset,
            )


def read_all(
    path: str | Path, *, allow_truncated: bool = False
) -> tuple[dict[str, Any], list[Chunk], dict[str, Any] | None]:
    """Read a whole (small) trace: header, chunks, footer. For tests and tools."""
    with TraceReader(path, allow_truncated=allow_truncated) as reader:
        chunks = list(reader)
        return reader.header, chunks, reader.footer
