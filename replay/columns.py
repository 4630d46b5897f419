"""Column codecs of the trace format (see ``replay.format``): numpy in bulk."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import zstandard

_U64 = np.dtype("<u8")
_U8 = np.dtype("u1")
_ONE = np.uint64(1)
_SHIFT = np.uint64(63)


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
    z = np.frombuffer(raw, dtype=_U8).reshape(8, n).T.copy().view(_U64).ravel()
    with np.errstate(over="ignore"):
        d = (z >> _ONE) ^ (0 - (z & _ONE))
        return np.cumsum(d, dtype=_U64)


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
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=max(size, 1))
    except zstandard.ZstdError as err:
        raise ValueError(f"bad zstd data: {err}") from err
    if len(raw) != size:
        raise ValueError(f"column holds {len(raw)} bytes, expected {size}")
    return raw
