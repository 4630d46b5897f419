"""Secure-page leak checks C1-C8, the secure spec parser and policy mode.

Every test builds guest tables with :class:`GuestTables`, writes a synthetic
trace with :class:`TraceWriter`, replays it through a :class:`Replayer` with
a :class:`Checker` attached, and asserts the exact findings (check, severity,
event, frames). Each expected number says why.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from replay.analysis.checks.checker import Checker, check_file
from replay.analysis.checks.findings import Finding
from replay.analysis.secure import FrameSpec, RootSpec, VaSpec, parse_spec
from replay.driver.replayer import Replayer
from replay.errors import UsageError
from replay.guest.memory import PTE_A, PTE_D, PTE_P, PTE_RW, GuestMemory, cr3_root, va_index
from replay.shadow.config import EngineConfig
from replay.shadow.engine import ShadowEngine
from replay.shadow.types import Fact
from replay.trace import format as fmt
from replay.trace.reader import read_all
from replay.trace.writer import TraceWriter

from .test_guest import TABLE, GuestTables, dm

K = fmt.Kind
#: Kernel data mapping: present, writable, accessed, dirty, supervisor.
KDATA = PTE_P | PTE_RW | PTE_A | PTE_D
#: The secure page's private VA (PGD slot 256, as in the private-root scenario).
SVA = 0xFFFF_8000_4020_1000
#: A second guard-hole VA (slot 257) for aliases (shared-l1 scenario).
ALIAS = 0xFFFF_8080_4020_1000
#: A user VA.
U = 0x40_0000
#: The secure frame, and an ordinary data frame.
F = 0x5000
D = 0x6000


class Trace:
    """Events with their indexes, written to a trace and replayed."""

    def __init__(self, path: Path, vcpus: int = 1) -> None:
        self.path = path
        self.vcpus = vcpus
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.mem = GuestMemory()
        self.cr3s: dict[int, int] = {}

    def _add(self, what: str, **f: Any) -> int:
        self.events.append((what, f))
        return len(self.events) - 1

    def snap(self, t: GuestTables) -> int:
        """Snapshot every table frame; returns the last event index."""
        for frame, page in t.pages():
            self.mem.snapshot(frame, page)
            last = self._add("snap", pa=frame << 12, page=page)
        return last

    def cr3(self, root: int, vcpu: int = 0) -> int:
        self.cr3s[vcpu] = root << 12
        return self._add("ev", kind=K.CR3_WRITE, vcpu=vcpu, val=root << 12)

    def access(self, kind: K, va: int, vcpu: int = 0, pa: int | None = None) -> int:
        if pa is None:
            pa = self.mem.translate(self.cr3s[vcpu], va)
            assert pa >= 0, f"{va:#x} is not mapped"
        return self._add("ev", kind=kind, vcpu=vcpu, va=va, pa=pa, info=8)

    def read(self, va: int, vcpu: int = 0, pa: int | None = None) -> int:
        return self.access(K.READ, va, vcpu, pa)

    def table_write(self, frame: int, index: int, value: int, vcpu: int = 0) -> int:
        self.mem.write((frame << 12) + 8 * index, value)
        return self._add("ev", kind=K.TABLE_WRITE, vcpu=vcpu, va=dm(frame) + 8 * index,
                         pa=(frame << 12) + 8 * index, val=value)

    def marker(self, name: str, *args: str, vcpu: int = 0) -> int:
        return self._add("marker", name=name, args=args, vcpu=vcpu)

    def console(self, text: str, parts: int = 1, vcpu: int = 0) -> int:
        """The kernel writes ``text`` to its console, recorded as the plugin
        does (``console`` markers), split in ``parts``; returns the last index."""
        data = text.encode()
        step = -(-len(data) // parts)
        for i in range(0, len(data), step):
            last = self.marker(fmt.MARKER_CONSOLE, fmt.console_payload(data[i:i + step]),
                               vcpu=vcpu)
        return last

    def run(self, specs: list[str] | None = None, *, policy: bool = False,
            console: str | None = None, console_events: bool = False,
            **cfg: Any) -> Checker:
        with TraceWriter(self.path, vcpus=self.vcpus) as w:
            for what, f in self.events:
                if what == "snap":
                    w.snapshot(f["pa"], f["page"])
                elif what == "marker":
                    w.marker(f["name"], *f["args"], vcpu=f["vcpu"])
                else:
                    w.event(**f)
        _, chunks, _ = read_all(self.path)
        config = EngineConfig.from_dict({"vcpus": self.vcpus, **cfg})
        engine = ShadowEngine(config)
        # the CLI's way: a checker on the engine, the replayer made after it
        # with the checker as its event tool
        checker = Checker(engine, secure=specs or [], console=console,
                          console_events=console_events, policy=policy)
        replayer = Replayer(engine, tools=[checker])
        replayer.run(chunks)
        checker.finish(replayer.stats)
        return checker


def brief(findings: list[Finding]) -> list[tuple[str, str, int, list[int]]]:
    return [(f.check, f.severity, f.event, f.frames) for f in findings]


def register(tr: Trace, root: int | None, frame: int = F) -> int:
    """secure-root (if any) then secure-frame markers; returns the last index."""
    if root is not None:
        tr.marker(fmt.MARKER_SECURE_ROOT, f"{root << 12:#x}")
    return tr.marker(fmt.MARKER_SECURE_FRAME, f"{frame << 12:#x}", "1")


def private_root(t: GuestTables) -> tuple[int, int, list[int]]:
    """Secure root A mapping SVA -> F privately, and a non-secure root B."""
    a, b = t.new(), t.new()
    chain = t.map(a, SVA, F, KDATA)
    return a, b, chain


# --------------------------------------------------------------------------
# Spec parser
# --------------------------------------------------------------------------
def test_parse_good_specs() -> None:
    assert parse_spec("frame:0x1234") == [FrameSpec(0x1234, 1, "frame:0x1234")]
    assert parse_spec("frame:0x1234+3")[0].count == 3  # type: ignore[union-attr]
    assert parse_spec("frame:pa:0x1234000") == [FrameSpec(0x1234, 1, "frame:pa:0x1234000")]
    assert parse_spec("pa:0x1234000+0x10")[0] == FrameSpec(0x1234, 16, "pa:0x1234000+0x10")
    # PCID (0x5a) and the no-flush bit 63 are stripped from a root
    assert parse_spec(f"root:{(1 << 63) | 0x2864000 | 0x5A:#x}")[0] == RootSpec(
        0x2864, f"root:{(1 << 63) | 0x2864000 | 0x5A:#x}")
    s = parse_spec("va:0xffff800040201abc@secure-go+2")[0]
    assert s == VaSpec(0xFFFF_8000_4020_1000, 2, "secure-go", "va:0xffff800040201abc@secure-go+2")
    assert parse_spec("va:0x400000")[0] == VaSpec(U, 1, "start", "va:0x400000")
    log = ("x: page va=0x7fc41fc73000 pa=0x10\nx: page va=0x7fc41fc74000\n"
           "x: page va=0x7fc41fc73000\n")
    got = parse_spec(r"console:page va=(0x[0-9a-f]+)", log)
    # two distinct VAs (the repeat is dropped), anchored at start
    assert [(v.va, v.anchor) for v in got] == [  # type: ignore[union-attr]
        (0x7FC41FC73000, "start"), (0x7FC41FC74000, "start")]


@pytest.mark.parametrize(("text", "needle"), [
    ("frame", "expected KIND:VALUE"),
    ("frame:", "nothing after"),
    ("frame:xyz", "bad frame"),
    ("frame:0x10+0", "page count must be"),
    ("pa:0x1234001", "not page aligned"),
    ("root:", "nothing after"),
    ("root:0x1000+2", "one CR3 value"),
    ("va:0x1000@", "empty marker name"),
    ("va:0x0000900000000000", "not canonical"),
    ("bogus:1", "unknown kind"),
    ("console:(", "bad regular expression"),
    ("console:abc", "needs a group"),
    ("console:va=(0x[0-9a-f]+)", "no console log"),
])
def test_parse_bad_specs(text: str, needle: str) -> None:
    with pytest.raises(UsageError, match=needle.replace("(", r"\(")):
        parse_spec(text)


def test_console_spec_without_match() -> None:
    with pytest.raises(UsageError, match="no match"):
        parse_spec("console:secure va=(0x[0-9a-f]+)", "nothing here\n")


# --------------------------------------------------------------------------
# C2: secure access from a non-secure vCPU
# --------------------------------------------------------------------------
def test_c2_fires_for_access_from_nonsecure_root(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, _ = private_root(t)
    t.map(b, U, F, KDATA)  # B also reaches F (at U)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(a)
    register(tr, a)
    tr.cr3(b)
    e = tr.read(U)
    tr.read(U + 8)  # same page again: dropped by the replayer's dedup
    ck = tr.run()
    # one finding at the read from B, frames [F], counted once (dedup)
    assert brief(ck.by_check("C2")) == [("C2", "critical", e, [F])]
    f = ck.by_check("C2")[0]
    assert (f.cr3, f.va, f.vcpu) == (b << 12, U, 0)
    assert f.path[0] == b and len(f.path) == 4  # L4..L1 of the guest walk


def test_c2_silent_for_secure_root_and_outside_interval(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, _ = private_root(t)
    t.map(b, U, F, KDATA)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(b)
    tr.read(U)  # before registration: F is not secure yet
    tr.cr3(a)
    start = register(tr, a)
    tr.read(SVA)  # the secure root itself
    end = tr.marker(fmt.MARKER_SECURE_END)
    tr.cr3(b)
    tr.read(U)  # after secure-end: the registration is over
    ck = tr.run()
    assert ck.by_check("C2") == []
    iv = ck.registry.history[F][0]
    assert (iv.start, iv.end) == (start, end)  # secure from its marker to secure-end


# --------------------------------------------------------------------------
# C1: secure leaf reachable from a non-secure root
# --------------------------------------------------------------------------
def test_c1_high_in_guest_tables_then_critical_in_shadow(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, _ = private_root(t)
    bchain = t.map(b, U, F, KDATA)
    tr = Trace(tmp_path / "t", vcpus=2)
    tr.snap(t)
    tr.cr3(a, vcpu=0)
    tr.cr3(b, vcpu=1)
    reg = register(tr, a)
    e_read = tr.read(U, vcpu=1)
    ck = tr.run()
    assert brief(ck.by_check("C1")) == [
        # at the registration B (held by vCPU 1) maps F in its guest tables only
        ("C1", "high", reg, [F]),
        # vCPU 1's read builds the shadow leaf: now the hardware can reach it
        ("C1", "critical", e_read, [F]),
    ]
    high, crit = ck.by_check("C1")
    assert (high.cr3, high.va, high.path) == (b << 12, U, [b, *bchain])
    assert (crit.cr3, crit.va, crit.path) == (b << 12, U, [b, *bchain])


def test_c1_silent_when_only_secure_root_maps_it(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, _ = private_root(t)
    t.map(b, U, D, KDATA)  # B maps other data only
    tr = Trace(tmp_path / "t", vcpus=2)
    tr.snap(t)
    tr.cr3(a, vcpu=0)
    tr.cr3(b, vcpu=1)
    register(tr, a)
    tr.read(SVA, vcpu=0)
    tr.read(U, vcpu=1)
    ck = tr.run()
    assert ck.findings == []  # nothing at all: the private-root ideal


# --------------------------------------------------------------------------
# C3: table frames shared between a secure and a non-secure root
# --------------------------------------------------------------------------
def test_c3_shared_l1_critical_and_shared_kernel_l3_info(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, (l3, l2, l1) = private_root(t)
    # B links A's L1 through its own L3/L2 at ALIAS (the shared-l1 scenario)
    l3b = t.table_for(b, va_index(ALIAS, 4))
    l2b = t.table_for(l3b, va_index(ALIAS, 3))
    t.set(l2b, va_index(ALIAS, 2), (l1 << 12) | TABLE)
    # and both share an (empty) kernel L3 in slot 511
    kern = t.new()
    t.set(a, 511, (kern << 12) | TABLE)
    t.set(b, 511, (kern << 12) | TABLE)
    tr = Trace(tmp_path / "t", vcpus=2)
    tr.snap(t)
    tr.cr3(a, vcpu=0)
    tr.cr3(b, vcpu=1)
    # frame first: C3 needs a secure root, so it is judged at the root marker
    # (with the root first, the L1 would be "info" until F is registered)
    tr.marker(fmt.MARKER_SECURE_FRAME, f"{F << 12:#x}", "1")
    reg = tr.marker(fmt.MARKER_SECURE_ROOT, f"{a << 12:#x}")
    ck = tr.run()
    assert sorted(brief(ck.by_check("C3"))) == [
        # the shared L1 maps F: critical, naming the L1 and F
        ("C3", "critical", reg, [l1, F]),
        # the shared kernel L3 maps nothing secure: info
        ("C3", "info", reg, [kern]),
    ]
    crit = next(f for f in ck.by_check("C3") if f.severity == "critical")
    assert crit.path == [b, l3b, l2b, l1]  # how B reaches the shared frame


def test_c3_silent_without_sharing(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, _ = private_root(t)
    t.map(b, U, D, KDATA)
    tr = Trace(tmp_path / "t", vcpus=2)
    tr.snap(t)
    tr.cr3(a, vcpu=0)
    tr.cr3(b, vcpu=1)
    register(tr, a)
    assert tr.run().by_check("C3") == []


# --------------------------------------------------------------------------
# C4: secure frame at a second VA / outside its registered VA
# --------------------------------------------------------------------------
def test_c4_direct_map_alias(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, _ = private_root(t)
    dmap = t.map(a, dm(F), F, KDATA)  # F also in the direct map of A
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(a)
    reg = register(tr, a)
    ck = tr.run()
    # SVA is the lower VA found first in the secure root: the direct map is the alias
    assert brief(ck.by_check("C4")) == [("C4", "high", reg, [F])]
    f = ck.by_check("C4")[0]
    assert (f.va, f.cr3, f.path) == (dm(F), a << 12, [a, *dmap])


def test_c4_outside_registered_va(tmp_path: Path) -> None:
    t = GuestTables()
    b = t.new()
    t.map(b, U, F, KDATA)
    t.map(b, dm(F), F, KDATA)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(b)
    e = tr.marker(fmt.MARKER_SECURE_VA, f"{U:#x}", "1")  # walked here: F
    ck = tr.run()
    assert ck.registry.history[F][0].va == U
    # the direct-map VA is outside the registered VA
    assert brief(ck.by_check("C4")) == [("C4", "high", e, [F])]
    assert ck.by_check("C4")[0].va == dm(F)


def test_c4_silent_single_mapping(tmp_path: Path) -> None:
    t = GuestTables()
    b = t.new()
    t.map(b, U, F, KDATA)  # the secretmem positive control: one mapping
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(b)
    reg = tr.marker(fmt.MARKER_SECURE_VA, f"{U:#x}", "1")
    e = tr.read(U)
    ck = tr.run()
    assert ck.by_check("C4") == []
    # but the owner's root is not secure: C1 (its own tables) and C2 fire
    assert brief(ck.findings) == [
        ("C1", "high", reg, [F]),  # in B's guest tables at the registration
        ("C1", "critical", e, [F]),  # the read builds B's shadow leaf
        ("C2", "critical", e, [F]),  # and the read itself
    ]


# --------------------------------------------------------------------------
# C5: secure tables exposed
# --------------------------------------------------------------------------
def test_c5_writable_written_and_secure_frame_as_table(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, (l3, l2, l1) = private_root(t)
    t.map(b, dm(l1), l1, KDATA)  # B maps A's private L1 writable (direct map)
    tr = Trace(tmp_path / "t", vcpus=2)
    tr.snap(t)
    tr.cr3(a, vcpu=0)
    tr.cr3(b, vcpu=1)
    tr.marker(fmt.MARKER_SECURE_ROOT, f"{a << 12:#x}")
    reg = tr.marker(fmt.MARKER_SECURE_FRAME, f"{l1 << 12:#x}", "1")  # a table frame in S
    w = tr.table_write(l2, 7, 0, vcpu=1)  # B's vCPU writes A's private L2
    ck = tr.run()
    got = sorted((f.kind, *brief([f])[0]) for f in ck.by_check("C5"))
    assert got == [
        # l1 registered as secure is a table of root A (and B reaches it as data)
        ("as-table", "C5", "critical", reg, [l1]),
        # A's private L1 is writable through B at dm(l1); found at the first marker
        ("writable", "C5", "critical", reg - 1, [l1]),
        # the non-secure vCPU 1 writes the private L2
        ("written", "C5", "critical", w, [l2]),
    ]


def test_c5_silent_private_tables(tmp_path: Path) -> None:
    t = GuestTables()
    a, b, (l3, l2, l1) = private_root(t)
    t.map(b, U, D, KDATA)
    tr = Trace(tmp_path / "t", vcpus=2)
    tr.snap(t)
    tr.cr3(a, vcpu=0)
    tr.cr3(b, vcpu=1)
    register(tr, a)
    tr.table_write(l2, 7, 0, vcpu=0)  # written by the secure vCPU: fine
    assert tr.run().by_check("C5") == []


# --------------------------------------------------------------------------
# C6: exit-less CR3 switches
# --------------------------------------------------------------------------
def test_c6_exitless_switch_hazards_and_too_many_targets(tmp_path: Path) -> None:
    t = GuestTables()
    a, b = t.new(), t.new()
    t.map(a, U, D, KDATA)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(a)  # intercepted: A's L4 shadow made and pinned
    tr.read(U)  # a shadow fault fills one vTLB entry
    e = tr.cr3(b)  # B is listed: no exit
    targets = [b << 12, 0x7000, 0x8000, 0x9000, 0xA000]  # five: more than 4
    ck = tr.run(cr3_targets=targets)
    assert sorted((f.severity, f.kind, f.event, f.frames) for f in ck.by_check("C6")) == [
        ("config-error", "too-many-cr3-targets", -1, []),  # at configuration
        ("high", "no-shadow-for-target", e, [b]),  # B was never intercepted
        ("high", "vtlb-live", e, [b]),  # the read's vTLB entry survives
        ("info", "ref-on-old-root", e, [b]),  # the slot still holds A
        ("info", "root-not-write-protected", e, [b]),  # B is not a shadowed table
    ]


def test_c6_silent_without_targets(tmp_path: Path) -> None:
    t = GuestTables()
    a, b = t.new(), t.new()
    t.map(a, U, D, KDATA)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(a)
    tr.read(U)
    tr.cr3(b)
    assert tr.run().by_check("C6") == []


# --------------------------------------------------------------------------
# C7: translation mismatch
# --------------------------------------------------------------------------
def test_c7_medium_and_high(tmp_path: Path) -> None:
    t = GuestTables()
    a = t.new()
    t.map(a, U, D, KDATA)
    t.map(a, U + 0x1000, D + 1, KDATA)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(a)
    reg = tr.marker(fmt.MARKER_SECURE_FRAME, f"{F << 12:#x}", "1")
    e1 = tr.read(U, pa=0x9000 << 12)  # the guest reached 0x9000, the model says D
    e2 = tr.read(U + 0x1000, pa=F << 12)  # the guest reached secure F
    ck = tr.run()
    assert reg < e1
    assert brief(ck.by_check("C7")) == [
        ("C7", "medium", e1, [0x9000, D]),  # neither frame secure
        ("C7", "high", e2, [F, D + 1]),  # the trace's frame is in S
    ]
    assert ck.by_check("C7")[1].cr3 == a << 12


def test_c7_silent_when_walks_agree(tmp_path: Path) -> None:
    t = GuestTables()
    a = t.new()
    t.map(a, U, D, KDATA)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(a)
    tr.read(U)
    assert tr.run().by_check("C7") == []


# --------------------------------------------------------------------------
# C8: prefetch of a secure leaf
# --------------------------------------------------------------------------
def test_c8_prefetch_of_secure_neighbour(tmp_path: Path) -> None:
    t = GuestTables()
    b = t.new()
    t.map(b, U, D, KDATA)  # L1 index 0
    t.map(b, U + 0x1000, F, KDATA)  # L1 index 1: F, accessed and dirty
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(b)
    tr.marker(fmt.MARKER_SECURE_FRAME, f"{F << 12:#x}", "1")
    e = tr.read(U)  # demand fault at index 0, prefetch fills index 1
    ck = tr.run()
    assert brief(ck.by_check("C8")) == [("C8", "high", e, [F])]
    assert ck.by_check("C8")[0].va == U + 0x1000


def test_c8_silent_beyond_prefetch_distance(tmp_path: Path) -> None:
    t = GuestTables()
    b = t.new()
    t.map(b, U, D, KDATA)
    t.map(b, U + (40 << 12), F, KDATA)  # index 40: beyond the 31 prefetched
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(b)
    tr.marker(fmt.MARKER_SECURE_FRAME, f"{F << 12:#x}", "1")
    tr.read(U)
    assert tr.run().by_check("C8") == []


# --------------------------------------------------------------------------
# Spec sources end to end, policy mode, summary
# --------------------------------------------------------------------------
def test_spec_strings_and_console_resolve(tmp_path: Path) -> None:
    t = GuestTables()
    b = t.new()
    t.map(b, U, F, KDATA)
    t.map(b, U + 0x1000, D, KDATA)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(b)
    first = tr.read(U + 0x1000)
    ck = tr.run(["console:secret at (0x[0-9a-f]+)", "root:0x7000"],
                console=f"demo: secret at {U:#x}\n")
    # no start marker: the console VA is walked at the first access
    iv = ck.registry.history[F][0]
    assert (iv.start, iv.va) == (first, U)
    assert ck.registry.root_history[7][0].start == 0  # spec roots start at event 0
    s = ck.summary()
    # B maps F and is not the secure root 0x7000: one C1 high
    assert s["by_check_severity"] == {"C1": {"high": 1}}
    assert s["unresolved"] == []


def test_policy_mode_refuses_nonsecure_leaf(tmp_path: Path) -> None:
    def trace(path: Path) -> tuple[Trace, int, int]:
        t = GuestTables()
        a, b, _ = private_root(t)
        t.map(b, U, F, KDATA)
        tr = Trace(path, vcpus=2)
        tr.snap(t)
        tr.cr3(a, vcpu=0)
        tr.cr3(b, vcpu=1)
        register(tr, a)
        e_ns = tr.read(U, vcpu=1)
        tr.read(SVA, vcpu=0)
        return tr, e_ns, b

    tr, e_ns, b = trace(tmp_path / "p")
    ck = tr.run(policy=True)
    # only vCPU 1's demand fault is refused; vCPU 0 is secure
    assert ck.policy_refused_demand == 1
    assert [(p.event, p.vcpu, p.cr3, p.va, p.frame) for p in ck.policy_faults] == [
        (e_ns, 1, b << 12, U, F)]
    # so the shadow never maps F for B: C1 stays at high
    assert [f.severity for f in ck.by_check("C1")] == ["high"]
    assert ck.summary()["policy"]["refused_demand"] == 1

    tr2, e2, _ = trace(tmp_path / "n")
    ck2 = tr2.run()
    # without the policy, the same read puts F into B's shadow
    assert [(f.severity, f.event) for f in ck2.by_check("C1")][-1] == ("critical", e2)
    assert ck2.policy_faults == []


def test_root_marker_strips_pcid(tmp_path: Path) -> None:
    t = GuestTables()
    a, _, _ = private_root(t)
    tr = Trace(tmp_path / "t")
    tr.snap(t)
    tr.cr3(a)
    tr.marker(fmt.MARKER_SECURE_ROOT, f"{(a << 12) | 0x5A:x}")  # no 0x, PCID bits
    tr.marker(fmt.MARKER_SECURE_FRAME, "zz")  # bad: kept as a warning
    ck = tr.run()
    assert list(ck.registry.root_history) == [cr3_root(a << 12)]
    assert len(ck.registry.warnings) == 1


class FactHub:
    """A fact fan-out like the CLI's (replay.driver.hub.FactHub)."""

    def __init__(self) -> None:
        self.sinks: list[Any] = []

    def add(self, sink: Any) -> None:
        self.sinks.append(sink)

    def __call__(self, fact: Fact) -> None:
        for sink in self.sinks:
            sink(fact)


def test_check_file_and_fact_hub(tmp_path: Path) -> None:
    """check_file (attach to a replayer) and a checker fed by a fact hub
    that also gets it added a second time give the same findings."""
    t = GuestTables()
    a, b, _ = private_root(t)
    t.map(b, U, F, KDATA)
    tr = Trace(tmp_path / "t", vcpus=2)
    tr.snap(t)
    tr.cr3(a, vcpu=0)
    tr.cr3(b, vcpu=1)
    register(tr, a)
    tr.read(U, vcpu=1)
    direct = tr.run()
    ck, _, stats = check_file(tr.path)
    assert stats.events == len(tr.events)
    assert brief(ck.findings) == brief(direct.findings)
    hub = FactHub()
    engine = ShadowEngine(EngineConfig(vcpus=2), on_fact=hub)
    hubbed = Checker(engine)  # adds itself to the hub ...
    hub.add(hubbed)  # ... and the caller adds it again: facts still count once
    Replayer(engine, tools=[hubbed]).run(read_all(tr.path)[1])
    assert brief(hubbed.finish()) == brief(direct.findings)


@pytest.mark.parametrize("name", ["seed", "secretmem"])
def test_propagated_facts_skipped_only_while_no_sink_takes_them(
        name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no sink taking "propagated" facts (lifetimes, a checker with no
    frame registered yet) the engine makes none; once a console spec
    registers a frame it makes them again: the findings are those of a
    replay that made every fact."""
    from replay.analysis.golden import read_expectation, stored_options
    from replay.analysis.lifetimes import ShadowLifetimes
    from replay.driver.hub import FactHub
    from replay.session import console_text, has_console_events
    from replay.shadow.config import engine_config
    from replay.trace.reader import TraceReader

    traces = Path(__file__).resolve().parent.parent / "traces"
    options, _ = read_expectation(traces / f"{name}.expected.json")
    spec = f"console:{stored_options(options)['watch_console']}"
    trace = traces / f"{name}.trace"

    def run() -> tuple[list[Any], list[bool]]:
        with TraceReader(trace) as reader:
            hub = FactHub(ShadowLifetimes())
            engine = ShadowEngine(engine_config(None, reader.header), on_fact=hub)
            events = has_console_events(reader.header)
            checker = Checker(engine, secure=[spec], console_events=events,
                              console=None if events else console_text(trace))
            seen: list[bool] = []
            asked = ShadowEngine.facts_wanted

            def note(self: ShadowEngine) -> None:
                asked(self)
                seen.append(self._props_on)

            with monkeypatch.context() as m:
                m.setattr(ShadowEngine, "facts_wanted", note)
                Replayer(engine, tools=[checker]).run(reader)
            return brief(checker.finish()), seen

    skipped, seen = run()
    # off at first, on once a frame is registered
    assert False in seen and True in seen[seen.index(False) + 1:]
    monkeypatch.setattr(ShadowEngine, "facts_wanted", lambda self: None)  # all made
    every, _ = run()
    assert every and skipped == every
