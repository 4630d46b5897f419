"""Column codecs of the trace format (see ``replay.trace.format``): numpy in bulk."""

from __future__ import annotations

import threading

import numpy as np
import numpy.typing as npt
import zstandard

_U64 = np.dtype("<u8")
_U8 = np.dtype("u1")
_ONE = np.uint64(1)
_SHIFT = np.uint64(63)
_local = threading.local()
_M8, _M16, _SH32 = np.uint16(1 << 8), np.uint32(1 << 16), np.uint64(32)


def encode_u8(values: npt.ArrayLike, level: int = 1) -> bytes:
    """Compress a u8 column."""
    arr = np.ascontiguousarray(values, dtype=_U8)
    return zstandard.ZstdCompressor(level=level).compress(arr.tobytes())


def decode_u8(blob: bytes, n: int) -> npt.NDArray[np.uint8]:
    """Decompress a u8 column of ``n`` values; ValueError if it is not that."""
    raw = _decompress(blob, n)
    return np.frombuffer(raw, dtype=_U8)


def encode_u64(values: npt.ArrayLike, level: int = 1) -> bytes:
    """Delta, zigzag, byte-plane split and compress a u64 column."""
    v = np.ascontiguousarray(values, dtype=_U64)
    with np.errstate(over="ignore"):
        d = np.diff(v, prepend=np.uint64(0))  # wraps mod 2**64
        z = (d << _ONE) ^ (0 - (d >> _SHIFT))  # zigzag of d as int64
    planes = z.view(_U8).reshape(-1, 8).T.copy()
    return zstandard.ZstdCompressor(level=level).compress(planes.tobytes())


def decode_u64(blob: bytes, n: int) -> npt.NDArray[np.uint64]:
    """Inverse of :func:`encode_u64`; ValueError if ``blob`` is not ``n`` values."""
    raw = _decompress(blob, 8 * n)
    if n == 0:
        return np.zeros(0, dtype=_U64)
    # Un-transpose the byte planes by widening pairs of planes (8 x u8 ->
    # 4 x u16 -> 2 x u32 -> u64) with contiguous multiplies and ORs: much
    # faster than numpy's strided transposing copy (and multiplying is
    # faster than shifting u16/u32). Everything after the first widening
    # is in place, reusing buffers: fresh large temporaries cost page
    # faults that used to dominate. When the upper four planes are zero
    # (small deltas: pa, pc), only the lower four are widened.
    high = bool(np.frombuffer(raw, dtype=np.uint32, offset=4 * n).max())
    rows = 4 if high else 2  # u16 rows to build
    planes = np.frombuffer(raw, dtype=_U8, count=2 * rows * n).reshape(rows, 2, n)
    w16, w32 = _scratch(n)
    a16 = w16[:rows]
    np.copyto(a16, planes[:, 1])
    np.multiply(a16, _M8, out=a16)
    np.bitwise_or(a16, planes[:, 0], out=a16)
    pairs16 = a16.reshape(rows // 2, 2, n)
    a32 = w32[: rows // 2]
    np.copyto(a32, pairs16[:, 1])
    np.multiply(a32, _M16, out=a32)
    np.bitwise_or(a32, pairs16[:, 0], out=a32)
    z = np.empty(n, dtype=_U64)
    if high:
        np.copyto(z, w32[1])
        np.left_shift(z, _SH32, out=z)
        np.bitwise_or(z, w32[0], out=z)
    else:
        np.copyto(z, w32[0])
    # zigzag back: d = (z >> 1) ^ -(z & 1), then the running sum (mod 2**64)
    neg = np.bitwise_and(z, _ONE, out=w16.reshape(-1).view(_U64))
    np.negative(neg, out=neg)
    np.right_shift(z, _ONE, out=z)
    np.bitwise_xor(z, neg, out=z)
    return np.cumsum(z, dtype=_U64, out=z)


def _scratch(n: int) -> tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint32]]:
    """Per-thread contiguous work buffers of :func:`decode_u64` for ``n``
    values, (4, n) u16 and (2, n) u32: reused across calls, since fresh ones
    cost a page fault per 4 KiB every time."""
    bufs: tuple[npt.NDArray[np.uint16], npt.NDArray[np.uint32]] | None
    bufs = getattr(_local, "bufs", None)
    if bufs is None or len(bufs[1]) < 2 * n:
        size = max(n, 1 << 16)
        bufs = (np.empty(4 * size, dtype=np.uint16), np.empty(2 * size, dtype=np.uint32))
        _local.bufs = bufs
    return bufs[0][: 4 * n].reshape(4, n), bufs[1][: 2 * n].reshape(2, n)


def _decompressor() -> zstandard.ZstdDecompressor:
    """This thread's decompressor (each call resets it; making one costs)."""
    dctx: zstandard.ZstdDecompressor | None = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


def compress(data: bytes, level: int = 1) -> bytes:
    """Compress an opaque blob (the chunk's ``pages``)."""
    return zstandard.ZstdCompressor(level=level).compress(data)


def decompress(blob: bytes, size: int) -> bytes:
    """Decompress an opaque blob that must be ``size`` bytes."""
    return _decompress(blob, size)


def _decompress(blob: bytes, size: int) -> bytes:
    if not isinstance(blob, (bytes, bytearray)):
        raise ValueError(f"column is {type(blob).__name__}, not bytes")
    try:
        # Check the frame's declared size first: a corrupt one must not make
        # the decompressor allocate gigabytes.
        declared = zstandard.frame_content_size(blob)
        if declared not in (size, -1):
            raise ValueError(f"column declares {declared} bytes, expected {size}")
        raw = _decompressor().decompress(blob, max_output_size=max(size, 1))
    except zstandard.ZstdError as err:
        raise ValueError(f"bad zstd data: {err}") from err
    if len(raw) != size:
        raise ValueError(f"column holds {len(raw)} bytes, expected {size}")
    return raw
