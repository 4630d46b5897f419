"""Give decoded xentrace rows their meaning for one guest run.

* **vCPU**: the guest's vCPUs were pinned, vCPU i to physical CPU
  ``pcpus[i]``; rows of other CPUs get no vCPU (dom0 and Xen itself).
* **Order**: one buffer per physical CPU, written window by window; with
  more than one guest CPU the rows are merged by the TSC each row inherits
  (stable, so a CPU's own order is kept).
* **Markers**: a scenario's ``stmark`` is a CPUID of leaf
  :data:`~replay.xen.records.MARKER_LEAF`, and Xen records every CPUID it
  handles. The text of a marker is not in Xen's record: markers from user
  space (the ``stmark`` program) print ``stmark: TEXT`` on the console, so
  the n-th user-space marker takes the n-th such line; markers from kernel
  modules print nothing and are named ``kernel-marker`` (or take their text
  from ``names``, the full marker list of a bare-QEMU capture of the same
  scenario, when the counts agree).
* **Window**: rows after the ``start`` marker and before the ``stop``
  marker are ``inside``; earlier rows ``before``, later ones ``after``; the
  two marker rows themselves count as ``marker``.
* **Symbols**: each row's guest instruction (the rIP of the VM exit it
  belongs to) named through :mod:`replay.symbols`, with the kernel base and
  module sections the guest printed (``stmark: kernel _text ADDR``,
  ``stmark: module NAME SECTION ADDR``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import polars as pl

from . import records as rec
from .decode import Decoded

_STMARK = re.compile(r"^stmark: (.+?)\s*$", re.MULTILINE)
#: Canonical-address split: rIPs at or above this are kernel code.
KERNEL_HALF = 0xFFFF800000000000
KERNEL_MARKER = "kernel-marker"


def console_markers(console: str) -> list[str]:
    """Texts of the ``stmark: TEXT`` lines of a guest console, in order."""
    return [m.group(1) for m in _STMARK.finditer(console.replace("\r", ""))]


def marker_names(
    user_kernel: Sequence[bool], console: Sequence[str], names: Sequence[str] | None = None
) -> list[str]:
    """A name for each marker record, given which ones came from the kernel.

    ``names`` (a capture's full marker list) wins when it has one name per
    record; otherwise user-space markers take the console's texts in order.
    """
    if names is not None and len(names) == len(user_kernel):
        return list(names)
    out: list[str] = []
    user = iter(console)
    for i, kernel in enumerate(user_kernel):
        out.append(KERNEL_MARKER if kernel else next(user, f"marker#{i}"))
    return out


def annotate(
    decoded: Decoded,
    *,
    pcpus: Sequence[int],
    console: str,
    name_pc: Callable[[int], str] | None = None,
    names: Sequence[str] | None = None,
) -> pl.DataFrame:
    """The decoded rows with ``vcpu``, ``marker``, ``after_marker``,
    ``window`` and ``symbol`` columns, in guest order."""
    df = decoded.table
    vcpu_of = {p: i for i, p in enumerate(pcpus)}
    df = df.with_columns(
        pl.col("pcpu").replace_strict(vcpu_of, default=None, return_dtype=pl.Int32).alias("vcpu")
    )
    guest_cpus = df.filter(pl.col("vcpu").is_not_null())["pcpu"].unique()
    if len(guest_cpus) > 1:
        df = df.with_columns(pl.col("tsc").fill_null(0).alias("_order")).sort(
            ["_order", "record"], maintain_order=True
        ).drop("_order")
    is_marker = (pl.col("kind") == "cpuid") & (pl.col("leaf") == rec.MARKER_LEAF)
    df = df.with_columns(is_marker.fill_null(False).alias("_marker"))
    marks = df.filter(pl.col("_marker"))
    kernel = [(r or 0) >= KERNEL_HALF for r in marks["rip"].to_list()]
    texts = marker_names(kernel, console_markers(console), names)
    order = df["_marker"].cum_sum().cast(pl.Int64)
    df = df.with_columns(order.alias("_seen"))
    text_of = pl.Series("t", [None, *texts], dtype=pl.Utf8)
    df = df.with_columns(text_of.gather(df["_seen"]).alias("after_marker")).with_columns(
        pl.when(pl.col("_marker")).then(pl.col("after_marker")).otherwise(None).alias("marker")
    )
    start = _first(texts, "start")
    stop = _first(texts, "stop", after=start)
    df = df.with_columns(_window(start, stop).alias("window"))
    df = df.with_columns(_symbols(df, name_pc).alias("symbol"))
    return df.drop("_marker", "_seen")


def rename_markers(df: pl.DataFrame, names: Sequence[str]) -> pl.DataFrame:
    """An annotated table with its marker records named ``names`` (a bare-QEMU
    capture's CPUID markers, in order) and its windows cut again, when there
    are as many names as marker records; else ``df`` unchanged. The console
    names only the markers that print a ``stmark:`` line: a program that
    issues its own CPUID marker (secretmem's ``secure-va``) would otherwise
    take the name of the next ``stmark:`` line (and move the window's stop)."""
    is_marker = pl.col("marker").is_not_null()
    if df.filter(is_marker).height != len(names):
        return df
    df = df.with_columns(is_marker.alias("_marker"),
                         is_marker.cum_sum().cast(pl.Int64).alias("_seen"))
    text_of = pl.Series("t", [None, *names], dtype=pl.Utf8)
    df = df.with_columns(text_of.gather(df["_seen"]).alias("after_marker")).with_columns(
        pl.when(pl.col("_marker")).then(pl.col("after_marker")).otherwise(None).alias("marker")
    )
    start = _first(names, "start")
    stop = _first(names, "stop", after=start)
    return df.with_columns(_window(start, stop).alias("window")).drop("_marker", "_seen")


def _first(texts: Sequence[str], name: str, after: int | None = None) -> int | None:
    """1-based ordinal of the first marker named ``name`` (after ``after``)."""
    lo = after or 0
    for i, text in enumerate(texts[lo:], start=lo + 1):
        if text.split()[:1] == [name]:
            return i
    return None


def _window(start: int | None, stop: int | None) -> pl.Expr:
    seen = pl.col("_seen")
    marker = pl.col("_marker")
    if start is None:
        return pl.lit("before")
    inside = (seen >= start) if stop is None else (seen >= start) & (seen < stop)
    at_mark = marker & ((seen == start) | (seen == (stop if stop is not None else -1)))
    return (
        pl.when(at_mark).then(pl.lit("marker"))
        .when(inside).then(pl.lit("inside"))
        .when(seen < start).then(pl.lit("before"))
        .otherwise(pl.lit("after"))
    )


def _symbols(df: pl.DataFrame, name_pc: Callable[[int], str] | None) -> pl.Series:
    rips = df["rip"]
    if name_pc is None:
        return pl.Series("symbol", [None] * len(df), dtype=pl.Utf8)
    names = {int(r): name_pc(int(r)) for r in rips.drop_nulls().unique().to_list()}
    return rips.replace_strict(names, default=None, return_dtype=pl.Utf8).alias("symbol")
