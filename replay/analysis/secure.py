"""The secure specification: which guest frames are secure (S), when, and
which roots form the secure address space (R). See ``shared/LEAK-CHECKS.md``.

Two sources feed it:

* **Spec strings** (command-line style), parsed by :func:`parse_spec`:

  ``frame:0x1234[+N]``
      frame number 0x1234 (and the N-1 following frames) is secure.
  ``frame:pa:0x1234000[+N]`` or ``pa:0x1234000[+N]``
      the same, given as a page-aligned guest-physical address.
  ``root:0x2864000``
      CR3 value of a secure root; PCID (bits 0-11) and bit 63 are stripped.
  ``va:0xffff800040201000[@MARKER][+N]``
      the frame behind the VA (and the N-1 following pages), walked in the
      guest model at the first marker named MARKER (default ``start``, or
      the first access if the trace has no ``start`` marker before it).
  ``console:REGEX``
      every console line that matches REGEX; group 1 is a hex VA. On a
      trace with console events (:data:`~replay.trace.format.OPTION_CONSOLE`
      in its header) the frame behind the VA is registered at the event of
      the line (each matching line starts a registration); on an older
      trace every match in the console log beside it is resolved as
      ``va:VA@start``.

  ``+N`` is decimal, or hex with ``0x``. Spec registrations start at event
  0 (``va``/``console`` ones when resolved); like marker registrations they
  end at the first ``secure-end`` marker after they were made, or earlier
  at their ``@until:`` end.

  Any frame spec (``frame``, ``pa``, ``va``, ``console``) may end with
  ``@until:END`` (:mod:`replay.analysis.until`): ``@until:marker:NAME`` ends the
  registration at the first marker named NAME after it began,
  ``@until:REGEX`` (or ``@until:console:REGEX``) at the first console line
  matching REGEX after it began (if REGEX has a group, group 1 must be the
  registered VA in hex); console lines need console events in the trace.

* **Markers** in the trace (:mod:`replay.trace.format`): ``secure-frame PA [N]``,
  ``secure-root CR3``, ``secure-va VA [N]``, ``secure-end`` (hex numbers,
  ``0x`` optional); see :meth:`SecureRegistry.marker`.

:class:`SecureRegistry` holds the live sets during a replay (``frames``,
``roots``) and the full history of validity intervals afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from ..errors import UsageError
from ..guest.memory import PAGE_SHIFT, cr3_root
from ..trace import format as fmt
from .until import Until, parse_until

#: A VA whose frame cannot be found at its anchor is retried at later
#: accesses to the same page (see :class:`PendingVa`).
DEFAULT_ANCHOR: Final = fmt.MARKER_START
_CANONICAL_HIGH: Final = 0xFFFF_8000_0000_0000


@dataclass(frozen=True)
class FrameSpec:
    """``frame:`` / ``pa:``: frames ``first .. first+count-1``."""

    first: int
    count: int
    text: str
    until: Until | None = None


@dataclass(frozen=True)
class RootSpec:
    """``root:``: one secure root (root frame number)."""

    root: int
    text: str


@dataclass(frozen=True)
class VaSpec:
    """``va:`` / ``console:``: the frames behind ``count`` pages from ``va``,
    walked at the first marker named ``anchor``."""

    va: int
    count: int
    anchor: str
    text: str
    until: Until | None = None


@dataclass(frozen=True)
class ConsoleSpec:
    """``console:`` on a trace with console events: every console line that
    ``pattern`` matches registers the frame behind its group-1 VA there."""

    pattern: re.Pattern[str]
    text: str
    until: Until | None = None


Spec = FrameSpec | RootSpec | VaSpec | ConsoleSpec


def _number(text: str, what: str, spec: str, *, hex_default: bool = False) -> int:
    t = text.strip().lower()
    try:
        value = int(t.removeprefix("0x"), 16) if hex_default else int(t, 0)
    except ValueError:
        raise UsageError(f"secure spec {spec!r}: bad {what} {text!r}") from None
    if value < 0:
        raise UsageError(f"secure spec {spec!r}: {what} must not be negative")
    return value


def _count(text: str | None, spec: str) -> int:
    if text is None:
        return 1
    n = _number(text, "page count", spec)
    if not 1 <= n <= 1 << 20:
        raise UsageError(f"secure spec {spec!r}: page count must be 1..{1 << 20}, not {n}")
    return n


def _split_count(body: str) -> tuple[str, str | None]:
    if "+" in body:
        head, _, tail = body.rpartition("+")
        return head, tail
    return body, None


def _canonical(va: int, spec: str) -> int:
    if va >= 1 << 64:
        raise UsageError(f"secure spec {spec!r}: VA {va:#x} is wider than 64 bits")
    top = va >> 47
    if top not in (0, 0x1FFFF):
        raise UsageError(f"secure spec {spec!r}: VA {va:#x} is not canonical (4-level)")
    return va


def parse_spec(text: str, console: str | None = None, *,
               console_events: bool = False) -> list[Spec]:
    """Parse one spec string (see the module); ``console`` is the guest
    console log, which ``console:`` searches on a trace without console
    events (``console_events`` False). Raises :class:`UsageError`."""
    kind, sep, body = text.partition(":")
    kind = kind.strip().lower()
    if not sep:
        raise UsageError(
            f"secure spec {text!r}: expected KIND:VALUE with KIND one of "
            "frame, pa, root, va, console"
        )
    body, has_until, end = body.partition("@until:")
    until = parse_until(text, end, console_events) if has_until else None
    if until is not None and kind == "root":
        raise UsageError(f"secure spec {text!r}: a root registration has no '@until:'")
    if kind == "console":
        if console_events:
            return [ConsoleSpec(va_pattern(body, f"secure spec {text!r}"), text, until)]
        return _console_specs(text, body, console, until)
    body = body.strip()
    if not body:
        raise UsageError(f"secure spec {text!r}: nothing after {kind!r}")
    if kind == "frame" and body.lower().startswith("pa:"):
        kind, body = "pa", body[3:]
    if kind in ("frame", "pa"):
        value, n = _split_count(body)
        num = _number(value, "frame" if kind == "frame" else "address", text)
        if kind == "pa":
            if num & ((1 << PAGE_SHIFT) - 1):
                raise UsageError(f"secure spec {text!r}: address {num:#x} is not page aligned")
            num >>= PAGE_SHIFT
        if num >= 1 << 40:
            raise UsageError(f"secure spec {text!r}: frame {num:#x} beyond 52-bit addresses")
        return [FrameSpec(num, _count(n, text), text, until)]
    if kind == "root":
        if "+" in body or "@" in body:
            raise UsageError(f"secure spec {text!r}: a root takes one CR3 value")
        cr3 = _number(body, "CR3", text)
        if cr3 >= 1 << 64:
            raise UsageError(f"secure spec {text!r}: CR3 wider than 64 bits")
        return [RootSpec(cr3_root(cr3), text)]
    if kind == "va":
        head, n = _split_count(body)
        value, at, anchor = head.partition("@")
        anchor = anchor.strip()
        if at and not anchor:
            raise UsageError(f"secure spec {text!r}: empty marker name after '@'")
        if anchor and not re.fullmatch(r"[\w.-]+", anchor):
            raise UsageError(f"secure spec {text!r}: bad marker name {anchor!r}")
        va = _canonical(_number(value, "VA", text), text)
        return [VaSpec(va & ~0xFFF, _count(n, text), anchor or DEFAULT_ANCHOR, text, until)]
    raise UsageError(
        f"secure spec {text!r}: unknown kind {kind!r} (frame, pa, root, va, console)"
    )


def va_pattern(pattern: str, what: str) -> re.Pattern[str]:
    """A console regex whose group 1 is a hex VA (``console:`` specs and
    ``--watch-console``); ``what`` names the option in the error."""
    if not pattern:
        raise UsageError(f"{what}: empty regular expression")
    try:
        rx = re.compile(pattern)
    except re.error as err:
        raise UsageError(f"{what}: bad regular expression: {err}") from None
    if rx.groups < 1:
        raise UsageError(f"{what}: the expression needs a group (the hex VA)")
    return rx


def _console_specs(text: str, pattern: str, console: str | None,
                   until: Until | None) -> list[Spec]:
    rx = va_pattern(pattern, f"secure spec {text!r}")
    if console is None:
        raise UsageError(f"secure spec {text!r}: no console log to search")
    out: list[Spec] = []
    seen: set[int] = set()
    for m in rx.finditer(console):
        raw = m.group(1)
        if raw is None:
            continue
        va = _canonical(_number(raw, "VA", text, hex_default=True), text) & ~0xFFF
        if va not in seen:
            seen.add(va)
            out.append(VaSpec(va, 1, DEFAULT_ANCHOR, f"{text} -> {va:#x}", until))
    if not out:
        raise UsageError(f"secure spec {text!r}: no match in the console log")
    return out


def parse_specs(texts: Iterable[str], console: str | None = None, *,
                console_events: bool = False) -> list[Spec]:
    """Parse several spec strings (all errors are :class:`UsageError`)."""
    out: list[Spec] = []
    for t in texts:
        out.extend(parse_spec(t, console, console_events=console_events))
    return out


# ---------------------------------------------------------------------------
# The registry: live sets and validity intervals
# ---------------------------------------------------------------------------
@dataclass
class Interval:
    """One registration of a frame (or a root): secure for events
    ``start <= e < end`` (``end`` None: to the end of the trace)."""

    value: int
    start: int
    end: int | None
    source: str
    #: The VA it was registered at (``va:``/``secure-va``), if any.
    va: int | None = None
    #: Where it ends before ``secure-end``, if anywhere.
    until: Until | None = None

    def covers(self, event: int) -> bool:
        return self.start <= event and (self.end is None or event < self.end)


@dataclass
class PendingVa:
    """A VA registration waiting for its anchor marker, then (if the walk
    there fails or is unknown) for the first access to its page."""

    va: int
    anchor: str
    source: str
    #: True once the anchor passed: resolve at the first access to the page.
    armed: bool = False
    until: Until | None = None


@dataclass
class SecureRegistry:
    """Secure frames and roots, live (``frames``, ``roots``: value ->
    interval) and as history (``history``, ``root_history``)."""

    frames: dict[int, Interval] = field(default_factory=dict)
    roots: dict[int, Interval] = field(default_factory=dict)
    history: dict[int, list[Interval]] = field(default_factory=dict)
    root_history: dict[int, list[Interval]] = field(default_factory=dict)
    pending: list[PendingVa] = field(default_factory=list)
    #: ``console:`` specs matched against the trace's console lines.
    console_specs: list[ConsoleSpec] = field(default_factory=list)
    #: Those of them that matched a line.
    console_matched: set[str] = field(default_factory=set)
    #: Problems with markers in the trace (bad numbers): (event, text).
    warnings: list[tuple[int, str]] = field(default_factory=list)
    #: Bumped whenever the live sets change.
    version: int = 0

    @classmethod
    def from_specs(cls, specs: Iterable[Spec]) -> SecureRegistry:
        reg = cls()
        for s in specs:
            if isinstance(s, FrameSpec):
                for f in range(s.first, s.first + s.count):
                    reg.add_frame(f, 0, s.text, until=s.until)
            elif isinstance(s, RootSpec):
                reg.add_root(s.root, 0, s.text)
            elif isinstance(s, ConsoleSpec):
                reg.console_specs.append(s)
            else:
                for k in range(s.count):
                    reg.pending.append(PendingVa(s.va + (k << PAGE_SHIFT), s.anchor, s.text,
                                                 until=s.until))
        return reg

    @property
    def active(self) -> bool:
        return bool(self.frames or self.roots)

    def add_frame(self, frame: int, event: int, source: str, va: int | None = None,
                  until: Until | None = None) -> bool:
        """Register a frame from ``event`` on; False if it already was (the
        live registration stays, with its own end)."""
        if frame in self.frames:
            if va is not None and self.frames[frame].va is None:
                self.frames[frame].va = va
            return False
        iv = Interval(frame, event, None, source, va, until)
        self.frames[frame] = iv
        self.history.setdefault(frame, []).append(iv)
        self.version += 1
        return True

    def add_root(self, root: int, event: int, source: str) -> bool:
        if root in self.roots:
            return False
        iv = Interval(root, event, None, source)
        self.roots[root] = iv
        self.root_history.setdefault(root, []).append(iv)
        self.version += 1
        return True

    def end_all(self, event: int) -> tuple[list[int], list[int]]:
        """``secure-end``: every live registration ends at ``event``."""
        frames, roots = list(self.frames), list(self.roots)
        for iv in self.frames.values():
            iv.end = event
        for iv in self.roots.values():
            iv.end = event
        self.frames.clear()
        self.roots.clear()
        if frames or roots:
            self.version += 1
        return frames, roots

    def end_frame(self, frame: int, event: int) -> bool:
        """End the live registration of ``frame`` at ``event`` (its ``@until``)."""
        iv = self.frames.pop(frame, None)
        if iv is None:
            return False
        iv.end = event
        self.version += 1
        return True

    def ending_at_marker(self, name: str) -> list[int]:
        """Live frames whose ``@until:marker:NAME`` is ``name``."""
        return [f for f, iv in self.frames.items()
                if iv.until is not None and iv.until.marker == name]

    def ending_at_line(self, line: str) -> list[int]:
        """Live frames whose ``@until:REGEX`` console line this is."""
        return [f for f, iv in self.frames.items()
                if iv.until is not None and iv.until.ends_at_line(line, iv.va)]

    def console_starts(self, line: str, event: int) -> list[tuple[ConsoleSpec, int]]:
        """(spec, VA page) for every ``console:`` spec match in ``line``."""
        out = []
        for spec in self.console_specs:
            for m in spec.pattern.finditer(line):
                raw = m.group(1)
                try:
                    va = int(raw, 16) if raw is not None else None
                except ValueError:
                    va = None
                if va is None or va >> 64 or va >> 47 not in (0, 0x1FFFF):
                    self.warnings.append((event, f"{spec.text}: {m.group(0)!r}: "
                                              "group 1 is not a canonical hex VA"))
                    continue
                self.console_matched.add(spec.text)
                out.append((spec, va & ~0xFFF))
        return out

    def frame_secure_at(self, frame: int, event: int) -> bool:
        return any(iv.covers(event) for iv in self.history.get(frame, ()))

    def root_secure_at(self, root: int, event: int) -> bool:
        return any(iv.covers(event) for iv in self.root_history.get(root, ()))

    def intervals(self) -> list[Interval]:
        """Every frame interval, by frame then start."""
        return [iv for f in sorted(self.history) for iv in self.history[f]]

    # -- markers ---------------------------------------------------------
    def marker(self, event: int, marker: list[str]) -> tuple[str, list[int]] | None:
        """Apply one marker. Returns (what, values) for the checker:
        ("frames", new frames), ("roots", new roots), ("va", VAs to walk now),
        ("end", frames ended); None for other markers or bad ones (a
        warning is kept)."""
        words = marker if len(marker) > 1 else marker[0].split() if marker else []
        if not words:
            return None
        name, args = words[0], words[1:]
        try:
            if name == fmt.MARKER_SECURE_FRAME:
                first = _hex(args, 0, "PA") >> PAGE_SHIFT
                n = _hex(args, 1, "NPAGES") if len(args) > 1 else 1
                new = [f for f in range(first, first + n)
                       if self.add_frame(f, event, f"marker {' '.join(words)}")]
                return "frames", new
            if name == fmt.MARKER_SECURE_ROOT:
                root = cr3_root(_hex(args, 0, "CR3"))
                ok = self.add_root(root, event, f"marker {' '.join(words)}")
                return "roots", [root] if ok else []
            if name == fmt.MARKER_SECURE_VA:
                va = _hex(args, 0, "VA") & ~0xFFF
                n = _hex(args, 1, "NPAGES") if len(args) > 1 else 1
                if va >> 47 not in (0, 0x1FFFF):
                    raise ValueError(f"VA {va:#x} is not canonical")
                return "va", [va + (k << PAGE_SHIFT) for k in range(n)]
            if name == fmt.MARKER_SECURE_END:
                frames, _roots = self.end_all(event)
                return "end", frames
        except ValueError as err:
            self.warnings.append((event, f"marker {' '.join(words)!r}: {err}"))
        return None


def _hex(args: list[str], i: int, what: str) -> int:
    if i >= len(args):
        raise ValueError(f"missing {what}")
    t = args[i].lower().removeprefix("0x")
    value = int(t, 16)
    if what == "NPAGES" and not 1 <= value <= 1 << 20:
        raise ValueError(f"bad page count {value}")
    return value


def canonical_va(va: int) -> int:
    """Sign-extend a 48-bit VA to its canonical 64-bit form."""
    va &= (1 << 48) - 1
    return va | _CANONICAL_HIGH if va & (1 << 47) else va
