"""Replay results as data: one JSON document (Parquet: :mod:`replay.report.parquet`).

The JSON schema is documented in ``docs/replay.md`` and versioned by
:data:`SCHEMA`; its top-level keys are :data:`TOP_KEYS`, always all present
(``null`` when not applicable). Addresses, frames, PCs, CR3 and entry values
are ``"0x..."`` strings (kernel addresses do not fit a JSON double); event
indexes and counts are integers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ..analysis.episodes import LEVELS, GuestEvent, LevelRecord, PathEpisode, VaTimeline
from ..analysis.timeline import Timeline
from ..driver.replayer import ReplayStats
from ..errors import UsageError
from ..shadow.config import EngineConfig
from ..shadow.engine import ShadowEngine
from ..trace import format as fmt

#: Version of the JSON document's layout (bump on any incompatible change).
SCHEMA = "shadowtrace.replay/1"
#: Top-level keys of the JSON document, in order.
TOP_KEYS: tuple[str, ...] = (
    "schema", "trace", "truncated", "config", "replay", "counters", "shadows",
    "c7", "hazards", "timelines", "findings", "truth",
)
#: Shadow types as reported, top down.
SHADOW_TYPES: tuple[str, ...] = ("l4", "l3", "l2", "l1", "fl1")
#: Samples of lists that could be long (C7 mismatches, hazards).
MAX_SAMPLES = 100

Namer = Callable[[int], str]


def hx(value: int | None) -> str | None:
    """An address as JSON: ``"0x..."`` (None stays None)."""
    return None if value is None else f"{value:#x}"


def _sym(namer: Namer | None, pc: int) -> str | None:
    if namer is None or not pc:
        return None
    name = namer(pc)
    return None if name.startswith("0x") else name  # unknown: the bare address


# ---------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------
def _guest_event(ev: GuestEvent | None, namer: Namer | None) -> dict[str, Any] | None:
    if ev is None:
        return None
    out: dict[str, Any] = {
        "event": ev.event, "kind": ev.kind, "vcpu": ev.vcpu, "cr3": hx(ev.cr3),
        "pc": hx(ev.pc), "symbol": _sym(namer, ev.pc), "va": hx(ev.va), "pa": hx(ev.pa),
    }
    if ev.kind == "TABLE_WRITE":
        out["value"] = hx(ev.val)
        out["level"] = ev.level
        out["effects"] = list(ev.effects)
    return out


def _level(rec: LevelRecord, namer: Namer | None) -> dict[str, Any]:
    b = rec.birth
    return {
        "level": rec.level,
        "frame": hx(rec.frame),
        "type": rec.type,
        "index": rec.index,
        "value": hx(b.value) if rec.index is not None else None,
        "event": b.event,
        "reason": b.reason,
        "shared": rec.shared,
        "vcpu": b.vcpu,
        "cr3": hx(b.cr3),
        "pc": hx(b.pc),
        "symbol": _sym(namer, b.pc),
        "va": hx(b.va),
        "destroyed": None if rec.destroyed is None
        else {"event": rec.destroyed[0], "reason": rec.destroyed[1]},
        "changes": [{"event": e, "reason": r, "value": hx(v)} for e, r, v in rec.changes],
    }


def _episode(ep: PathEpisode, namer: Namer | None) -> dict[str, Any]:
    return {
        "root": hx(ep.root << 12),
        "complete_event": ep.complete_event,
        "vcpu": ep.vcpu,
        "cr3": hx(ep.cr3),
        "levels": [_level(r, namer) for r in ep.levels],
        "ended": None if ep.ended is None
        else {"event": ep.ended[0], "reason": ep.ended[1], "level": ep.ended[2]},
    }


def timeline_json(tl: VaTimeline, namer: Namer | None = None) -> dict[str, Any]:
    """One watched VA as JSON (see docs/replay.md, "timelines")."""
    answer = tl.answer()
    answer["leaf_pc"] = hx(answer["leaf_pc"])
    answer["leaf_symbol"] = _sym(namer, int(answer["leaf_pc"] or "0", 16))
    return {
        "va": hx(tl.va),
        "answer": answer,
        "guest": {
            "first_access": _guest_event(tl.first_access, namer),
            "first_write": _guest_event(tl.first_write, namer),
            "accesses": tl.accesses,
            "table_writes": [_guest_event(e, namer) for e in tl.table_writes],
            "table_writes_total": tl.table_writes_total,
        },
        "episodes": [_episode(e, namer) for e in tl.episodes],
        "episodes_dropped": tl.episodes_dropped,
    }


def shadows_by_type(engine: ShadowEngine) -> dict[str, dict[str, int]]:
    c = engine.counters
    out = {}
    for t in SHADOW_TYPES:
        out[t] = {
            "live": sum(1 for k in engine.shadows if _tname(int(k[1])) == t),
            "created": c[f"shadow_created_{t}"],
            "destroyed": c[f"shadow_destroyed_{t}"],
        }
    out["total"] = {k: sum(v[k] for v in out.values()) for k in ("live", "created", "destroyed")}
    return out


def _tname(t: int) -> str:
    return "fl1" if t == 0 else f"l{t}"


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, (bytes, bytearray)):
        return obj.hex()
    return obj


def build(
    *,
    trace: str | Path,
    header: dict[str, Any],
    footer: dict[str, Any] | None,
    truncated: bool,
    config: EngineConfig,
    engine: ShadowEngine,
    stats: ReplayStats,
    dedup: bool,
    duration: float,
    timeline: Timeline | None = None,
    findings: Sequence[Any] | None = None,
    namer: Namer | None = None,
) -> dict[str, Any]:
    """The whole JSON document (plain data, keys :data:`TOP_KEYS`)."""
    cfg = config.to_dict()
    cfg["cr3_targets"] = [hx(v) for v in config.cr3_targets]
    cfg["opt_flags"] = hx(config.opt_flags)
    cfg["pool"] = config.pool
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "trace": {
            "path": str(trace),
            "header": _jsonable(header),
            "footer": _jsonable(footer),
            "events": stats.events,
            "chunks": stats.chunks,
        },
        "truncated": truncated,
        "config": cfg,
        "replay": {
            "dedup": dedup,
            "events": stats.events,
            "accesses": stats.accesses,
            "deduplicated": stats.deduplicated,
            "duration_s": round(duration, 3),
            "markers": [{"event": e, "vcpu": v, "marker": m}
                        for e, v, m in _guest_markers(stats)[:MAX_SAMPLES]],
        },
        "counters": dict(engine.counters),
        "shadows": shadows_by_type(engine),
        "c7": {
            "checked": stats.translations_checked,
            "unknown": stats.translations_unknown,
            "mismatches": stats.translation_mismatches,
            "samples": [
                {"event": m.event, "vcpu": m.vcpu, "va": hx(m.va), "trace_pa": hx(m.trace_pa),
                 "model_pa": hx(m.model_pa) if m.model_pa >= 0 else "unmapped"}
                for m in stats.mismatches[:MAX_SAMPLES]
            ],
        },
        "hazards": {
            "count": len(engine.hazards),
            "samples": [{"event": h.event, "vcpu": h.vcpu, "kind": h.kind, "root": hx(h.root),
                         "detail": h.detail} for h in engine.hazards[:MAX_SAMPLES]],
        },
        "timelines": None if timeline is None
        else [timeline_json(t, namer) for t in timeline.timelines.values()],
        "findings": None if findings is None else [finding_json(f, namer) for f in findings],
        # the session fills it in when asked (--truth: replay.analysis.truth)
        "truth": None,
    }
    assert tuple(doc) == TOP_KEYS
    return doc


def _guest_markers(stats: ReplayStats) -> list[tuple[int, int, list[str]]]:
    """The trace's markers without the kernel's console text (``console``)."""
    return [m for m in stats.markers if not (m[2] and m[2][0] == fmt.MARKER_CONSOLE)]


def finding_json(f: Any, namer: Namer | None = None) -> dict[str, Any]:
    """A checks Finding (check, severity, event, vcpu, cr3, va, frames, path,
    message, kind, count) as JSON; unknown attributes become null."""
    def get(name: str) -> Any:
        return getattr(f, name, None) if not isinstance(f, dict) else f.get(name)
    frames = get("frames") or []
    path = get("path")
    return {
        "check": get("check"),
        "severity": str(get("severity")) if get("severity") is not None else None,
        "event": get("event"),
        "vcpu": get("vcpu"),
        "cr3": hx(get("cr3")) if isinstance(get("cr3"), int) else get("cr3"),
        "va": hx(get("va")) if isinstance(get("va"), int) else get("va"),
        "frames": [hx(x) if isinstance(x, int) else x for x in frames],
        "path": _jsonable(list(path)) if isinstance(path, (list, tuple)) else path,
        "message": get("message"),
        "kind": get("kind") or "",
        "count": get("count") or 1,
    }


def write_json(path: str | Path, doc: dict[str, Any]) -> None:
    p = Path(path)
    try:
        p.write_text(json.dumps(doc, indent=1) + "\n")
    except OSError as err:
        raise UsageError(f"{p}: cannot write: {err.strerror}") from err


__all__ = [
    "LEVELS",
    "SCHEMA",
    "TOP_KEYS",
    "build",
    "finding_json",
    "hx",
    "timeline_json",
    "write_json",
]
