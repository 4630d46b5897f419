"""Decoding ahead of the consumer: :class:`Prefetch`.

A :class:`~replay.trace.reader.TraceReader` decodes a chunk when it is
asked for the next one; a Prefetch asks for it on a background thread while
the consumer (the replayer) works on the current one.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .reader import Chunk, TraceReader


class Prefetch:
    """Chunks of ``source`` (a :class:`TraceReader`) decoded one chunk
    ahead by a background thread, so that decoding overlaps the consumer's
    work: zstd and numpy release the GIL. At most ``depth`` decoded chunks
    wait, so memory stays bounded. An error of the source is raised by the
    consumer where it would have been (after the chunks before it).

    Use it as a context manager, or call :meth:`close` when done: it stops
    the thread and waits for it, so the source can be closed safely after.
    """

    _END = object()

    def __init__(self, source: TraceReader, depth: int = 1) -> None:
        self._source = source
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Chunk]:
        if self._thread is not None:
            raise RuntimeError("a Prefetch is iterated once")
        self._thread = threading.Thread(
            target=self._produce, name="shadowtrace-prefetch", daemon=True
        )
        self._thread.start()
        while True:
            item = self._queue.get()
            if item is self._END:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
        self._thread.join()

    def _produce(self) -> None:
        try:
            for chunk in self._source:
                if not self._put(chunk):
                    return
        except BaseException as err:  # noqa: BLE001 - raised by the consumer
            self._put(err)
            return
        self._put(self._END)

    def _put(self, item: Any) -> bool:
        """Hand ``item`` over unless :meth:`close` was called."""
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
