"""The trace format and its I/O, with no semantics.

``format`` (the one definition; run as a script it emits the plugin's C
header), ``columns`` (the column codec), ``reader`` (decode and validate),
``prefetch`` (decode one chunk ahead on a thread), ``writer`` (tests and
tools write traces) and ``cut`` (a smaller valid trace of a range).
"""

from .reader import Chunk, TraceReader, read_all
from .writer import TraceWriter

__all__ = ["TraceReader", "Chunk", "read_all", "TraceWriter"]
