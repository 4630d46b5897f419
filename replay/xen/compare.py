"""The model beside the real Xen: one scenario, two runs.

The model side is a replay of a bare-QEMU capture (``TRACE``); the Xen side
is the record table of ``shadowtrace xen`` (``NAME.xen.parquet``). Both are
cut to the marker window, the events between the scenario's ``start`` and
``stop`` markers. The two runs place pages differently, so a watched VA is
found on each side in that side's own console.

Answers
    For each watched VA, the first thing each side did to its leaf inside
    the window. Model: the timeline's leaf entry (:mod:`replay.timeline`),
    named ``demand-read`` / ``demand-write`` / ``demand-fetch`` (built by a
    shadow fault of that access) or by its reason (``prefetch``,
    ``validate``, ``resync`` ...), with its instruction's symbol. Xen: the
    first shadow record whose VA is on the page (``fixup``,
    ``not_shadow``, ``emulate`` ...; ``fixup+new-l1e`` when the record has
    the ``l1_get_ref`` flag, i.e. Xen built a new shadow L1 entry), with the
    symbol of the faulting instruction (an unnamed PC, a user program's,
    must be the same address), or ``none``; faults Xen passed to
    the guest (``not_shadow``) before it are skipped and counted (the
    bare-QEMU trace cannot hold them: :func:`xen_answer`). They **agree** when the
    model's demand fault meets Xen's ``fixup+new-l1e`` in the same function,
    or when the model built the leaf without a fault (prefetch, validation,
    resync) and Xen has no record for the page.

Metrics
    :data:`METRICS`: counts inside the window, each named once, with the
    Xen record or flag it is counted from and the engine counter or fault
    outcome it is compared with (``docs/compare.md`` has the same list).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from ..errors import UsageError
from ..session import ReplayOptions, console_text, console_vas, replay
from ..shadow.engine import ShadowEngine
from ..shadow.types import Fact, ShadowType
from ..trace import format as fmt
from ..trace.reader import TraceReader
from .annotate import rename_markers
from .summary import read_parquet

#: Xen records that stand for one shadow fault on their VA.
FAULT_KINDS: tuple[str, ...] = (
    "fixup", "not_shadow", "emulate", "mmio", "fast_propagate", "fast_mmio",
    "false_fast_path", "emulate_unshadow_user", "emulate_unshadow_evtinj",
    "emulate_unshadow_unhandled",
)
#: Xen records whose TRCE_SFLAG path flags tell what their own fault did.
#: Not ``not_shadow``: sh_page_fault clears the per-CPU flags
#: (TRACE_CLEAR_PATH_FLAGS) only once the guest walk succeeded, and a
#: failed walk jumps to ``propagate`` and records trace_not_shadow_fault
#: with the flags this CPU's previous fault left (the seed run: 84 of the
#: window's 86 not_shadow records repeat the flags of the fault record
#: before them on their vCPU; fork: 235 of 242).
FLAGGED_KINDS: tuple[str, ...] = ("fixup", "emulate")


@dataclass(frozen=True)
class Metric:
    """One window count, model vs Xen."""

    name: str
    #: what it counts, and where each side's number comes from
    doc: str
    model: Callable[[WindowTally], int]
    xen: Callable[[pl.DataFrame], int]


def _kinds(*kinds: str) -> Callable[[pl.DataFrame], int]:
    return lambda df: df.filter(pl.col("kind").is_in(kinds)).height


def _flag(*flags: str, kinds: tuple[str, ...] = FLAGGED_KINDS) -> Callable[[pl.DataFrame], int]:
    """Records of ``kinds`` with any of ``flags`` among their path flags."""
    pattern = "(^|\\|)(" + "|".join(flags) + ")(\\||$)"
    return lambda df: df.filter(
        pl.col("kind").is_in(kinds) & pl.col("flag_names").fill_null("").str.contains(pattern)
    ).height


def _cr3(df: pl.DataFrame) -> int:
    return df.filter((pl.col("kind") == "cr_write") & (pl.col("cr") == 3)).height


METRICS: tuple[Metric, ...] = (
    Metric("faults_fixed",
           "shadow faults fixed by building or fixing shadow entries: Xen TRC_SHADOW_FIXUP "
           "records (sh_page_fault's trace_shadow_fixup); model faults ending 'fixed'",
           lambda t: t.outcome("fixed"), _kinds("fixup")),
    Metric("faults_to_guest",
           "faults that were the guest's own, passed on: Xen TRC_SHADOW_NOT_SHADOW + "
           "TRC_SHADOW_FAST_PROPAGATE; model 'guest_fault' + 'fast_gnp'",
           lambda t: t.outcome("guest_fault") + t.outcome("fast_gnp"),
           _kinds("not_shadow", "fast_propagate")),
    Metric("emulated_writes",
           "page-table writes emulated (slow and fast path): Xen TRC_SHADOW_EMULATE "
           "(trace_shadow_emulate); model 'emulate' + 'fast_emulate'",
           lambda t: t.outcome("emulate") + t.outcome("fast_emulate"), _kinds("emulate")),
    Metric("early_unshadows",
           "emulated writes during which shadows were destroyed: Xen EMULATE records with "
           "the demote flag (shadow_demote, run for every shadow destroyed while the write "
           "is handled: check_for_early_unshadow's two-write or dying-process rule, "
           "sh_page_fault's rule for a write to a dying top-level table, or a lower "
           "shadow losing its last reference to the written entry) or the early_unshadow "
           "flag; model emulated writes ('emulate', 'fast_emulate') during which the "
           "engine destroyed a shadow of a guest table, not an FL1 (at the store or at "
           "its TABLE_WRITEs)",
           lambda t: t.destroying_emulates(),
           _flag("early_unshadow", "demote", kinds=("emulate",))),
    Metric("user_write_unshadows",
           "user-mode writes to a page table, taken as 'no page table any more': Xen "
           "TRC_SHADOW_EMULATE_UNSHADOW_USER; model 'user_write_unshadow'",
           lambda t: t.outcome("user_write_unshadow"), _kinds("emulate_unshadow_user")),
    Metric("resyncs",
           "out-of-sync L1s brought back in sync (write-protected again): Xen "
           "TRC_SHADOW_RESYNC_FULL (_sh_resync); model counter shadow_resync",
           lambda t: t.counter("shadow_resync"), _kinds("resync_full")),
    Metric("unsyncs",
           "L1s let out of sync: Xen fixup/emulate records with the unsync flag (sh_unsync); model "
           "counter shadow_unsync",
           lambda t: t.counter("shadow_unsync"), _flag("unsync")),
    Metric("write_access_removals",
           "faults whose handling had to remove writable mappings of a new page table: Xen "
           "fixup/emulate records with the wrmap flag (sh_remove_write_access); model faults that "
           "made a writable shadow entry read-only",
           lambda t: t.wrmap, _flag("wrmap")),
    Metric("pool_reclaims",
           "top-level shadows unpinned to free pool memory: Xen TRC_SHADOW_PREALLOC_UNPIN "
           "(_shadow_prealloc); model 'unpinned' facts with reason 'pool'",
           lambda t: t.pool_unpins, _kinds("prealloc_unpin")),
    Metric("cr3_writes",
           "guest CR3 writes: Xen TRC_HVM_CR_WRITE64 records of CR3; model counters "
           "cr3_write_intercepted + cr3_write_not_intercepted",
           lambda t: t.counter("cr3_write_intercepted")
           + t.counter("cr3_write_not_intercepted"), _cr3),
    Metric("faulted_pages",
           "distinct VA pages with at least one shadow fault: Xen fault records "
           f"({', '.join(FAULT_KINDS)}); model faults of any outcome",
           lambda t: len(t.pages),
           lambda df: len(_fault_pages(df))),
)
#: The last metric: the share of faulted VA pages that the other side faults on too.
SHARED = "faulted_pages_shared"
SHARED_DOC = (
    "share of the faulted VA pages the other side faults on too: model column |M&X|/|M|, "
    "Xen column |M&X|/|X| (M, X: the two sides' faulted_pages)"
)


#: TABLE_WRITE events one store is followed by, at most (16 bytes, 8 per entry).
TABLE_WRITES_PER_STORE = 2


@dataclass
class WindowTally:
    """What the model did inside the marker window (engine hooks and facts)."""

    inside: bool = False
    outcomes: dict[str, int] = field(default_factory=dict)
    wrmap: int = 0
    pool_unpins: int = 0
    pages: set[int] = field(default_factory=set)
    #: events of emulated writes, and events at which a shadow was destroyed
    emulates: set[int] = field(default_factory=set)
    destroys: set[int] = field(default_factory=set)
    start: dict[str, int] | None = None
    stop: dict[str, int] | None = None
    #: event indices of the start and stop markers
    start_event: int | None = None
    stop_event: int | None = None
    counters: Callable[[], dict[str, int]] | None = None

    def fault(self, event: int, vcpu: int, va: int, write: bool, outcome: str,
              wrmap: bool) -> None:
        if not self.inside:
            return
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.wrmap += wrmap
        self.pages.add(va >> 12)
        if outcome in ("emulate", "fast_emulate"):
            self.emulates.add(event)

    def marker(self, event: int, words: list[str]) -> None:
        name = words[0] if words else ""
        if name == "start" and self.start is None:
            self.inside = True
            self.start_event = event
            self.start = dict(self.counters()) if self.counters else {}
        elif name == "stop" and self.inside:
            self.inside = False
            self.stop_event = event
            self.stop = dict(self.counters()) if self.counters else {}

    def __call__(self, fact: Fact) -> None:
        if not self.inside:
            return
        if fact.kind == "unpinned" and fact.reason == "pool":
            self.pool_unpins += 1
        elif fact.kind == "destroyed" and fact.type != ShadowType.FL1:
            # an FL1 shadow (a splintered superpage) backs no guest table:
            # sh_destroy_l1_shadow deletes its fl1 status without
            # shadow_demote, so Xen's record has no demote flag for it
            self.destroys.add(fact.event)

    def destroying_emulates(self) -> int:
        """Emulated writes with a shadow destroyed at their store's event or at
        one of the TABLE_WRITEs that follow it (one per 8-byte entry, so at
        most two for a 16-byte store), where the engine validates the entry."""
        return sum(1 for e in self.emulates
                   if any(e + k in self.destroys for k in range(TABLE_WRITES_PER_STORE + 1)))

    def outcome(self, name: str) -> int:
        return self.outcomes.get(name, 0)

    def counter(self, name: str) -> int:
        if self.start is None or self.stop is None:
            return 0
        return self.stop.get(name, 0) - self.start.get(name, 0)


def _fault_pages(df: pl.DataFrame) -> set[int]:
    rows = df.filter(pl.col("kind").is_in(FAULT_KINDS) & pl.col("va").is_not_null())
    return {int(v) >> 12 for v in rows["va"].to_list()}


def xen_files(xen_dir: Path) -> tuple[Path, Path]:
    """The record table and guest console of the one Xen run in ``xen_dir``."""
    tables = sorted(xen_dir.glob("*.xen.parquet"))
    if not tables:
        raise UsageError(f"{xen_dir}: no *.xen.parquet (run 'shadowtrace xen --out {xen_dir}')")
    if len(tables) > 1:
        raise UsageError(f"{xen_dir}: more than one Xen run ({', '.join(p.name for p in tables)})")
    stem = tables[0].name[: -len(".xen.parquet")]
    return tables[0], tables[0].with_name(f"{stem}.xen.console.log")


def check_vcpus(trace: Path, table_path: Path) -> None:
    """Both runs must have had the same number of guest vCPUs: the capture's
    header says how many it had, the Xen run's ``NAME.xen.json`` which pCPUs
    its vCPUs were pinned to (one each)."""
    with TraceReader(trace) as reader:
        model = int(reader.header.get("vcpus") or 1)
    summary = table_path.with_name(table_path.name[: -len(".parquet")] + ".json")
    try:
        doc = json.loads(summary.read_text())
    except (OSError, ValueError):
        return  # a table without its summary: nothing says otherwise
    pcpus = doc.get("pcpus") if isinstance(doc, dict) else None
    if isinstance(pcpus, list) and len(pcpus) != model:
        raise UsageError(
            f"{trace} was captured with {model} vCPU(s), the Xen run in "
            f"{table_path.parent} had {len(pcpus)}: compare runs of one vCPU count "
            f"(shadowtrace xen --vcpus {model})"
        )


def _function(symbol: str | None) -> str | None:
    """``clear_page_erms`` of ``clear_page_erms+0x7 [mod]``."""
    if not symbol or symbol.startswith("0x"):
        return None
    return symbol.split("+", 1)[0].split(" ", 1)[0]


def _ratio(model: float, xen: float) -> float | None:
    if xen == 0:
        return 1.0 if model == 0 else None
    return model / xen


def model_answer(rep: Any, va: int, window: tuple[int, int] | None = None) -> dict[str, Any]:
    """The model's first leaf event of ``va`` (timeline) inside ``window``
    (start and stop event; None: the whole trace), as compare reports it.

    A leaf built before the window and still there when it opens (a warm
    start) is ``held``: the model had nothing to build, as Xen has nothing
    to record for a shadow it already holds. Its ``symbol``, ``event`` and
    ``built`` say how it was built before the window (the frame's own
    history: two runs that place a page on frames with different pasts
    may answer differently for that reason alone)."""
    tl = rep.timeline.timelines.get(va)
    rows = [e.row("L1e") for e in tl.episodes] if tl is not None else []
    lo, hi = window if window is not None else (0, 1 << 62)
    births = [r.birth for r in rows if lo <= r.birth.event < hi]
    if not births:
        held = [r.birth for r in rows
                if r.birth.event < lo and (r.destroyed is None or r.destroyed[0] >= lo)]
        if held:
            b = max(held, key=lambda b: b.event)
            return {"kind": "held", "symbol": _named(rep, b.pc), "event": b.event,
                    "built": _birth_kind(b)}
        return {"kind": "none", "symbol": None, "event": None}
    b = min(births, key=lambda b: b.event)
    return {"kind": _birth_kind(b), "symbol": _named(rep, b.pc), "event": b.event}


def _birth_kind(b: Any) -> str:
    return f"demand-{b.access}" if b.reason == "demand" and b.access else str(b.reason)


def _named(rep: Any, pc: int | None) -> str | None:
    return rep.namer(pc) if rep.namer is not None and pc else None


def xen_answer(inside: pl.DataFrame, va: int) -> dict[str, Any]:
    """Xen's first shadow record on the page of ``va`` inside the window
    that did something to the shadows: ``not_shadow`` records before it
    (faults Xen passed to the guest, leaving the shadows as they were:
    sh_page_fault's not-a-shadow-fault exit) are skipped and counted in
    ``guest_faults_before``; a bare-QEMU trace never holds those accesses
    (a QEMU plugin sees only accesses that complete), only their retry."""
    page = va >> 12
    rows = inside.filter(
        pl.col("kind").is_in(FAULT_KINDS) & pl.col("va").is_not_null()
        & ((pl.col("va") // 4096) == page)
    )
    if rows.height == 0:
        return {"kind": "none", "symbol": None, "record": None, "guest_faults_before": 0}
    kinds = rows["kind"].to_list()
    skipped = next((i for i, k in enumerate(kinds) if k != "not_shadow"), None)
    if skipped is None:  # only guest faults: report the first
        skipped = 0
    r = rows.row(skipped, named=True)
    kind = r["kind"]
    if kind == "fixup" and "l1_get_ref" in (r["flag_names"] or "").split("|"):
        kind = "fixup+new-l1e"
    return {"kind": kind, "symbol": r["symbol"], "record": r["record"],
            "guest_faults_before": skipped}


def agree(model: dict[str, Any], xen: dict[str, Any]) -> bool:
    """The rule of the module docstring."""
    if model["kind"].startswith("demand-"):
        fm, fx = _function(model["symbol"]), _function(xen["symbol"])
        # an unnamed PC (a user program's: linked at a fixed address, the
        # same on both sides) must be the same instruction
        same = (fm == fx if fm is not None
                else model["symbol"] is not None and model["symbol"] == xen["symbol"])
        return bool(xen["kind"] == "fixup+new-l1e" and same)
    if model["kind"] in ("prefetch", "validate", "resync", "held"):
        return bool(xen["kind"] == "none")
    return False


@dataclass
class ModelSide:
    """The model's replay of one trace, counted for comparison: made once,
    put beside any number of Xen runs of the scenario (:func:`against`)."""

    trace: Path
    rep: Any
    tally: WindowTally
    #: the watched VAs the trace's console names, and the regex that found them
    vas: list[int]
    watch_console: str | None
    #: event indices of the start and stop markers
    window: tuple[int, int]


def model_side(trace: Path, *, watch_console: str | None = None,
               config: Path | None = None) -> ModelSide:
    """Replay ``trace`` with the window tally and the watched VAs' timelines."""
    vas: list[int] = []
    if watch_console is not None:
        vas = console_vas(console_text(trace), watch_console, f"{trace} console")
    tally = WindowTally()
    opts = ReplayOptions(trace=trace, config=config, watch=vas)

    def attach(engine: ShadowEngine) -> None:
        engine.on_fault = tally.fault
        engine.on_marker = tally.marker
        tally.counters = lambda: engine.counters

    rep = replay(opts, sinks=[tally], attach=attach)
    if tally.start is None or tally.stop is None:
        raise UsageError(f"{trace}: no start/stop marker pair: nothing to compare")
    return ModelSide(trace, rep, tally, vas, watch_console,
                     (tally.start_event or 0, tally.stop_event or 0))


def check_xen_dir(trace: Path, xen_dir: Path,
                  watch_console: str | None) -> tuple[Path, list[int]]:
    """The checks of a Xen run that need no replay (its files, its vCPUs, the
    watched VAs on its console): its record table and those VAs."""
    table_path, xen_console = xen_files(xen_dir)
    check_vcpus(trace, table_path)
    if watch_console is None:
        return table_path, []
    try:
        xtext = xen_console.read_text(errors="replace")
    except OSError as err:
        raise UsageError(f"{xen_console}: cannot read: {err.strerror}") from None
    return table_path, console_vas(xtext, watch_console, str(xen_console))


def against(model: ModelSide, xen_dir: Path) -> dict[str, Any]:
    """The comparison document of ``model`` and the Xen run in ``xen_dir``
    (schema in ``docs/compare.md``)."""
    table_path, xen_vas = check_xen_dir(model.trace, xen_dir, model.watch_console)
    xen = read_parquet(table_path)
    rep, tally, window = model.rep, model.tally, model.window
    xen = rename_markers(xen, cpuid_markers(rep.stats.markers))
    inside = xen.filter((pl.col("window") == "inside") & pl.col("vcpu").is_not_null())
    answers = []
    for i, mva in enumerate(model.vas):
        m = model_answer(rep, mva, window)
        xva = xen_vas[i] if i < len(xen_vas) else None
        x = xen_answer(inside, xva) if xva is not None else {
            "kind": "none", "symbol": None, "record": None, "guest_faults_before": 0}
        answers.append({
            "va_model": f"{mva:#x}", "va_xen": None if xva is None else f"{xva:#x}",
            "model": m, "xen": x, "agree": agree(m, x),
        })
    metrics: list[dict[str, Any]] = []
    for met in METRICS:
        mv, xv = met.model(tally), met.xen(inside)
        metrics.append({"name": met.name, "model": mv, "xen": xv, "ratio": _ratio(mv, xv)})
    mp, xp = tally.pages, _fault_pages(inside)
    both = len(mp & xp)
    ms = both / len(mp) if mp else 0.0
    xs = both / len(xp) if xp else 0.0
    metrics.append({"name": SHARED, "model": round(ms, 4), "xen": round(xs, 4),
                    "ratio": _ratio(ms, xs)})
    return {"trace": str(model.trace), "xen": str(table_path),
            "start": start_kind(rep.doc["trace"]["header"]), "window_events": list(window),
            "answers": answers, "metrics": metrics}


def compare(
    trace: Path,
    xen_dir: Path,
    *,
    watch_console: str | None = None,
    config: Path | None = None,
) -> dict[str, Any]:
    """The comparison document of ``trace`` and one Xen run (``docs/compare.md``)."""
    check_xen_dir(trace, xen_dir, watch_console)  # before the replay: quick errors
    return against(model_side(trace, watch_console=watch_console, config=config), xen_dir)


#: Markers the plugin writes itself (no CPUID in the guest: Xen has no record).
PLUGIN_MARKERS: tuple[str, ...] = (fmt.MARKER_CONSOLE, fmt.MARKER_DYING)


def cpuid_markers(markers: list[tuple[int, int, list[str]]]) -> list[str]:
    """The texts of a replay's markers that were the guest's CPUIDs, in order."""
    return [" ".join(words) for _, _, words in markers
            if words and words[0] not in PLUGIN_MARKERS]


def start_kind(header: dict[str, Any]) -> str:
    """``warm`` for a whole-run capture (``capture --window all``): the replay
    ran from boot, so the model opens the window with the shadows it built
    before, as Xen does; ``cold`` for a marker-window capture: the replay
    began at the start marker with no shadows."""
    options = header.get("options") or {}
    return "warm" if options.get("window") == "all" else "cold"
