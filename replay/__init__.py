"""shadowtrace replay: read traces and model Xen's shadow paging over them."""

from .errors import ShadowtraceError, TraceError, TraceFormatError, TraceVersionError
from .trace.reader import Chunk, TraceReader

__all__ = [
    "TraceReader",
    "Chunk",
    "ShadowtraceError",
    "TraceError",
    "TraceFormatError",
    "TraceVersionError",
]
