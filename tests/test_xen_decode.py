"""The xentrace decoder on hand-built binary records (replay.xen.decode / annotate).

Every record is built here from the layouts of Xen 4.17.5's trace helpers
(see replay/xen/records.py for the sources), so each expected value is the
one the test itself put in.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pytest

from replay.errors import TraceFormatError
from replay.xen import records as rec
from replay.xen.annotate import annotate, console_markers, marker_names, rename_markers
from replay.xen.decode import decode, decode_bytes

VA = 0xFFFF888006192000
GL1E = 0x8000000006192063
RIP = 0xFFFFFFFF81A2B3C7
USER_RIP = 0x401234


def record(event: int, data: bytes = b"", tsc: int | None = None) -> bytes:
    """One t_rec: header (event, data word count, TSC flag), TSC, data."""
    assert len(data) % 4 == 0 and len(data) <= 28
    header = event | (len(data) // 4) << 28 | (1 << 31 if tsc is not None else 0)
    out = struct.pack("<I", header)
    if tsc is not None:
        out += struct.pack("<Q", tsc)
    return out + data


def window(cpu: int, *records: bytes) -> bytes:
    """A CPU-change record (as xentrace writes one per buffer window) and the window."""
    body = b"".join(records)
    return record(rec.TRC_TRACE_CPU_CHANGE, struct.pack("<iI", cpu, len(body))) + body


def shadow(number: int, data: bytes) -> bytes:
    levels = 0 if number in rec.SHADOW_NO_LEVELS else rec.LEVEL_BITS[4]
    return record(rec.TRC_SHADOW | levels | number, data)


def vmexit(reason: int, rip: int, tsc: int = 1000) -> bytes:
    return record(rec.TRC_HVM_SVM_EXIT64, struct.pack("<IQ", reason, rip), tsc=tsc)


def vmentry(tsc: int = 2000) -> bytes:
    return record(rec.TRC_HVM_VMENTRY, tsc=tsc)


def fixup(flags: int, va: int = VA, gl1e: int = GL1E) -> bytes:
    return shadow(6, struct.pack("<QQI", gl1e, va, flags))


def cpuid(leaf: int) -> bytes:
    return record(rec.TRC_HVM_CPUID, struct.pack("<6I", leaf, 0, 0, 0, 0, 0))


def bit(name: str) -> int:
    return 1 << rec.PATH_FLAGS.index(name)


# -- every record kind -------------------------------------------------------
def test_fixup_gets_its_exit_instruction_and_flags() -> None:
    flags = bit("l1_get_ref") | bit("unsync")
    got = decode_bytes(window(1, vmexit(0x4E, RIP), fixup(flags), vmentry())).table
    # vmexit, fixup, vmentry: the CPU-change record is no row
    assert got["kind"].to_list() == ["vmexit", "fixup", "vmentry"]
    row = got.row(1, named=True)
    assert (row["va"], row["gl1e"], row["flags"]) == (VA, GL1E, flags)
    assert row["flag_names"] == "l1_get_ref|unsync"  # bit 2 and bit 18, in bit order
    assert (row["exit_reason"], row["exit_name"], row["rip"]) == (0x4E, "page_fault", RIP)
    assert row["levels"] == 4  # the 0x200 level bits of a 4-level guest
    assert row["pcpu"] == 1 and row["tsc"] == 1000  # the TSC of the exit record before it
    # the entry ends the exit: a row after it belongs to no instruction
    assert got.row(2, named=True)["rip"] is None


def test_not_shadow_has_the_fixup_layout() -> None:
    got = decode_bytes(window(0, shadow(1, struct.pack("<QQI", 0, VA, 0)))).table
    assert got.row(0, named=True) | {} == got.row(0, named=True)
    assert got["kind"].to_list() == ["not_shadow"] and got["va"].to_list() == [VA]


def test_emulate_drops_the_emulation_count_bits() -> None:
    flags = bit("early_unshadow") | bit("demote")
    word = flags | 5 << 29  # emulation_count:3 sits above flags:29
    data = struct.pack("<QQQI", GL1E, 0, VA, word)
    row = decode_bytes(window(1, shadow(8, data))).table.row(0, named=True)
    assert row["kind"] == "emulate"
    assert row["flags"] == flags and row["write_val"] == 0 and row["va"] == VA
    assert row["flag_names"] == "demote|early_unshadow"  # bits 8 and 13


@pytest.mark.parametrize("number", [2, 3, 4, 5, 7])
def test_va_only_records(number: int) -> None:
    row = decode_bytes(window(1, shadow(number, struct.pack("<Q", VA)))).table.row(0, named=True)
    assert row["kind"] == rec.SHADOW_KINDS[number] and row["va"] == VA


@pytest.mark.parametrize("number", [9, 10, 11])
def test_emulate_unshadow_records(number: int) -> None:
    data = struct.pack("<QQ", 0x6192, VA)
    row = decode_bytes(window(1, shadow(number, data))).table.row(0, named=True)
    assert (row["kind"], row["gfn"], row["va"]) == (rec.SHADOW_KINDS[number], 0x6192, VA)


@pytest.mark.parametrize("number", [12, 13, 14, 15])
def test_gfn_records_of_common_c_have_no_level_bits(number: int) -> None:
    row = decode_bytes(window(1, shadow(number, struct.pack("<Q", 0x1234)))).table.row(
        0, named=True
    )
    assert (row["kind"], row["gfn"]) == (rec.SHADOW_KINDS[number], 0x1234)


def test_hvm_records() -> None:
    data = window(
        1,
        vmexit(0x13, RIP),
        record(rec.TRC_HVM_CR_WRITE64, struct.pack("<IQ", 3, 0x6064000)),
        record(rec.TRC_HVM_PF_INJECT64, struct.pack("<IQ", 2, VA)),
        record(rec.TRC_HVM_INVLPG64, struct.pack("<IQ", 0, VA)),
        cpuid(rec.MARKER_LEAF),
        record(0x0008207F, b""),  # an HVM handler record this decoder has no layout for
    )
    got = decode_bytes(data).table
    assert got["kind"].to_list() == [
        "vmexit", "cr_write", "pf_inject", "invlpg", "cpuid", "hvm_0x8207f"
    ]
    assert got.row(1, named=True)["cr"] == 3 and got.row(1, named=True)["value"] == 0x6064000
    assert got.row(2, named=True)["va"] == VA and got.row(2, named=True)["error_code"] == 2
    assert got.row(4, named=True)["leaf"] == rec.MARKER_LEAF
    assert got["exit_name"].to_list() == ["cr3_write"] * 6  # all inside the CR3-write exit


def test_lost_and_unknown_records_are_counted_wrap_padding_dropped() -> None:
    lost = record(rec.TRC_LOST_RECORDS, struct.pack("<IHHQ", 7, 1, 0, 5), tsc=9)
    wrap = record(rec.TRC_TRACE_WRAP_BUFFER, b"\0" * 8)
    strange = record(0x0123F456, b"\0" * 4)
    odd_levels = record(rec.TRC_SHADOW | 0x300 | 6, b"\0" * 20)  # no guest has 5 levels
    short = shadow(6, struct.pack("<Q", VA))  # a fixup with too few words
    got = decode_bytes(window(1, lost, wrap, strange, odd_levels, short))
    assert got.lost == 7  # the count in the lost-records record
    assert got.unknown == 3  # strange, odd_levels, short
    assert got.table["kind"].to_list() == ["lost_records", "unknown", "unknown", "unknown"]


def test_two_and_three_level_guest_records() -> None:
    """A PVH guest boots through 32-bit paging: multi.c's smaller types."""
    two = record(rec.TRC_SHADOW | rec.LEVEL_BITS[2] | 6, struct.pack("<III", 0x5063, 0x5000, 4))
    three = record(rec.TRC_SHADOW | rec.LEVEL_BITS[3] | 8,
                   struct.pack("<QQII", 0x5063, 7, 0x5008, 0))
    df = decode_bytes(window(1, two, three)).table
    assert df["kind"].to_list() == ["fixup", "emulate"]
    assert df["levels"].to_list() == [2, 3]
    assert df["va"].to_list() == [0x5000, 0x5008]  # a 32-bit guest_va_t in both
    assert df["write_val"].to_list() == [None, 7]
    assert df.row(0, named=True)["flag_names"] == "l1_get_ref"  # flags 4: bit 2



def test_windows_of_two_cpus() -> None:
    data = window(0, vmexit(0x72, USER_RIP)) + window(1, fixup(0)) + window(0, fixup(0))
    got = decode_bytes(data)
    assert got.pcpus == [0, 1]
    # CPU 0's second window continues its exit; CPU 1 had none
    assert got.table["rip"].to_list() == [USER_RIP, None, USER_RIP]


# -- bad input: a clear error with the byte offset, never a traceback ---------
def test_truncated_and_broken_files(tmp_path: Path) -> None:
    good = window(1, vmexit(0x4E, RIP), fixup(0))
    cases = {
        "empty": (b"", "empty xentrace file"),
        "header cut": (good + b"\x01\x02", "truncated record header"),
        "record cut": (good[:-3], "runs past the end"),
        "no cpu change": (fixup(0), "no CPU-change record first"),
    }
    for name, (data, message) in cases.items():
        with pytest.raises(TraceFormatError, match=message) as err:
            decode_bytes(data, path=Path(name))
        assert err.value.offset is not None, name
    # a record longer than what its window says
    body = fixup(0)
    bad = record(rec.TRC_TRACE_CPU_CHANGE, struct.pack("<iI", 1, len(body) - 4)) + body
    with pytest.raises(TraceFormatError, match="crosses the end") as err2:
        decode_bytes(bad)
    assert err2.value.offset == 12  # right after the 12-byte CPU-change record
    # a final record cut short where the window would still have room
    cut = record(rec.TRC_TRACE_CPU_CHANGE, struct.pack("<iI", 1, 100)) + body[:-4]
    with pytest.raises(TraceFormatError, match="runs past the end"):
        decode_bytes(cut)
    missing = tmp_path / "none.raw"
    with pytest.raises(TraceFormatError, match="cannot read"):
        decode(missing)


# -- annotation: vCPUs, markers, windows, symbols ------------------------------
def _run() -> bytes:
    """kernel marker, start, a fix inside, a kernel-module marker, stop, one after."""
    return window(
        1,
        vmexit(0x72, USER_RIP, tsc=10), cpuid(rec.MARKER_LEAF), vmentry(11),
        vmexit(0x4E, RIP, tsc=12), fixup(bit("l1_get_ref")), vmentry(13),
        vmexit(0x72, USER_RIP, tsc=20), cpuid(rec.MARKER_LEAF), vmentry(21),
        vmexit(0x4E, RIP, tsc=30), fixup(bit("l1_get_ref")), vmentry(31),
        vmexit(0x72, RIP, tsc=35), cpuid(rec.MARKER_LEAF), vmentry(36),
        vmexit(0x72, USER_RIP, tsc=40), cpuid(rec.MARKER_LEAF), vmentry(41),
        vmexit(0x4E, RIP, tsc=50), fixup(0), vmentry(51),
    )


CONSOLE = "boot\nstmark: kernel _text ffffffff81000000\r\nstmark: start\nstmark: stop\n"


def test_console_markers() -> None:
    assert console_markers(CONSOLE) == ["kernel _text ffffffff81000000", "start", "stop"]


def test_marker_names_take_a_full_list_only_when_it_fits() -> None:
    kernel = [False, True, False]
    assert marker_names(kernel, ["a", "b"]) == ["a", "kernel-marker", "b"]
    assert marker_names(kernel, ["a", "b"], ["x", "y", "z"]) == ["x", "y", "z"]
    assert marker_names(kernel, ["a"], ["x", "y"]) == ["a", "kernel-marker", "marker#2"]


def test_annotate_windows_and_symbols() -> None:
    names = {RIP: "clear_page_erms+0x7", USER_RIP: "0x401234"}
    df = annotate(decode_bytes(_run()), pcpus=[1], console=CONSOLE, name_pc=names.__getitem__)
    fixes = df.filter(df["kind"] == "fixup")
    # one fix before start, one inside (after start, before stop), one after stop
    assert fixes["window"].to_list() == ["before", "inside", "after"]
    assert fixes["symbol"].to_list() == ["clear_page_erms+0x7"] * 3
    assert fixes["vcpu"].to_list() == [0, 0, 0]  # pCPU 1 is vCPU 0
    marks = df.filter(df["marker"].is_not_null())
    # user markers named from the console in order; the kernel-mode one has no text
    assert marks["marker"].to_list() == [
        "kernel _text ffffffff81000000", "start", "kernel-marker", "stop"
    ]
    assert marks["window"].to_list() == ["before", "marker", "inside", "marker"]
    assert fixes["after_marker"].to_list() == [
        "kernel _text ffffffff81000000", "start", "stop"
    ]


def test_annotate_merges_two_guest_cpus_by_tsc() -> None:
    data = window(1, vmexit(0x4E, RIP, tsc=30), fixup(0, va=0x3000)) + window(
        2, vmexit(0x4E, RIP, tsc=20), fixup(0, va=0x2000)
    )
    df = annotate(decode_bytes(data), pcpus=[1, 2], console="")
    fixes = df.filter(df["kind"] == "fixup")
    assert fixes["va"].to_list() == [0x2000, 0x3000]  # vCPU 1's fix came first (TSC 20 < 30)
    assert fixes["vcpu"].to_list() == [1, 0]
    assert fixes["window"].to_list() == ["before", "before"]  # no start marker at all


def test_every_compare_metric_is_documented() -> None:
    from replay.xen.compare import METRICS, SHARED

    doc = (Path(__file__).resolve().parent.parent / "docs" / "compare.md").read_text()
    for name in [m.name for m in METRICS] + [SHARED]:
        assert f"| `{name}` |" in doc, name


def test_rename_markers_names_the_records_and_cuts_the_window_again() -> None:
    df = annotate(decode_bytes(_run()), pcpus=[1], console=CONSOLE)
    # the capture says the second marker record was not the start: the window
    # opens at the third and closes at the fourth, so the fix between the 2nd
    # and 3rd records (inside by the console's names) is before it
    again = rename_markers(df, ["kernel _text", "secure-va 0x1", "start", "stop"])
    fixes = again.filter(again["kind"] == "fixup")
    assert fixes["window"].to_list() == ["before", "before", "after"]
    marks = again.filter(again["marker"].is_not_null())
    assert marks["marker"].to_list() == ["kernel _text", "secure-va 0x1", "start", "stop"]
    assert marks["window"].to_list() == ["before", "before", "marker", "marker"]
    assert fixes["after_marker"].to_list() == ["kernel _text", "secure-va 0x1", "stop"]
    # a list of another length (3 names for 4 records) leaves the table as it is
    same = rename_markers(df, ["a", "start", "stop"])
    assert same["window"].to_list() == df["window"].to_list()


def test_xen_answer_skips_the_faults_xen_passed_to_the_guest() -> None:
    """secretmem's page under Xen: the guest's own demand fault on the first
    write (``not_shadow``: Xen passes it on, the shadows unchanged), then the
    retry's ``fixup`` building the L1 entry. The answer is the fixup, with
    the guest fault counted; a record on another page does not count."""
    import polars as pl

    from replay.xen.compare import xen_answer

    va = 0x7F9C_2E21_7000
    inside = pl.DataFrame({
        "record": [10, 11, 12, 13],
        "kind": ["fixup", "not_shadow", "fixup", "fixup"],
        "va": [0x40_0000, va + 0x18, va + 0x18, va + 0x20],
        "flag_names": ["l1_get_ref", None, "l1_get_ref|unsync", "l1_get_ref"],
        "symbol": ["other", "0x4015fb", "0x4015fb", "0x401600"],
    })
    got = xen_answer(inside, va)
    # record 12: the first one on the page that is not a guest fault; one
    # guest fault (record 11) before it
    assert got == {"kind": "fixup+new-l1e", "symbol": "0x4015fb", "record": 12,
                   "guest_faults_before": 1}
    # only guest faults on the page: the first of them is the answer
    only = inside.filter(pl.col("record") <= 11)
    assert xen_answer(only, va) == {"kind": "not_shadow", "symbol": "0x4015fb",
                                    "record": 11, "guest_faults_before": 0}


def test_fidelity_table_names_the_guest_faults_before_xens_answer() -> None:
    from replay.xen.fidelity import markdown

    answer = {"va_model": "0x1000", "va_xen": "0x2000", "agree": True,
              "model": {"kind": "demand-write", "symbol": "0x4015fb", "event": 5},
              "xen": {"kind": "fixup+new-l1e", "symbol": "0x4015fb", "record": 12,
                      "guest_faults_before": 1}}
    doc = {"answers": [answer], "start": "warm",
           "metrics": [{"name": "faults_fixed", "model": 3, "xen": 2}]}
    lines = markdown({"secretmem": [doc]}).splitlines()
    # one answer row, its Xen cell naming the skipped guest fault
    assert lines[2] == ("| secretmem | `0x1000` / `0x2000` | demand-write `0x4015fb` | "
                        "fixup+new-l1e `0x4015fb` (after 1 guest fault) | yes |")
    assert "| `faults_fixed` | 3 / 2 |" in lines
    assert "Model replays: warm start. Xen: 1 run per scenario." in lines


def test_fidelity_table_gives_the_range_of_several_xen_runs() -> None:
    """Three Xen runs of one scenario beside one model replay: each metric's
    Xen cell is lowest-highest, a Xen answer that differs between runs is
    shown once per kind, and the verdict says in how many runs it agreed."""
    from replay.xen.fidelity import markdown

    def doc(xen_faults: int, shared: float, xen_kind: str, agreed: bool,
            xen_va: str, xen_shared: float = 0.5) -> dict[str, Any]:
        answer = {"va_model": "0x1000", "va_xen": xen_va, "agree": agreed,
                  "model": {"kind": "demand-write", "symbol": "clear_page_erms+0x7",
                            "event": 5},
                  "xen": {"kind": xen_kind, "symbol": "clear_page_erms+0x7", "record": 9,
                          "guest_faults_before": 0}}
        return {"answers": [answer], "start": "warm",
                "metrics": [{"name": "faults_fixed", "model": 244, "xen": xen_faults},
                            {"name": "cr3_writes", "model": 10, "xen": 12},
                            {"name": "faulted_pages_shared", "model": shared,
                             "xen": xen_shared}]}

    runs = [doc(240, 0.55, "fixup+new-l1e", True, "0x2000"),
            doc(236, 0.54, "fixup+new-l1e", True, "0x3000"),
            doc(241, 0.55, "fixup", False, "0x2000", xen_shared=0.5012)]
    lines = markdown({"seed": runs}).splitlines()
    assert lines[2] == ("| seed | `0x1000` / `0x2000`; `0x3000` | demand-write "
                        "`clear_page_erms+0x7` | fixup+new-l1e `clear_page_erms+0x7`; "
                        "fixup `clear_page_erms+0x7` | 2 of 3 runs |")
    assert "| `faults_fixed` | 244 / 236-241 |" in lines  # the model's is one replay
    assert "| `cr3_writes` | 10 / 12 |" in lines  # alike in every run: one number
    # the model's share depends on the pages Xen faulted on: a range too
    # (Xen's 0.5 and 0.5012 print alike: one number, not 0.50-0.50)
    assert "| `faulted_pages_shared` | 0.54-0.55 / 0.50 |" in lines
    assert ("Model replays: warm start. Xen: 3 runs per scenario "
            "(lowest-highest where the runs differ).") in lines


def test_unnamed_pcs_agree_only_at_the_same_address() -> None:
    from replay.xen.compare import agree

    model = {"kind": "demand-write", "symbol": "0x4015fb", "event": 5}

    def xen(symbol: str) -> dict[str, object]:
        return {"kind": "fixup+new-l1e", "symbol": symbol, "record": 12,
                "guest_faults_before": 1}

    # secretmem's program (static, linked at 0x400000): the same instruction
    assert agree(model, xen("0x4015fb"))
    assert not agree(model, xen("0x401600"))  # another instruction
    # named PCs: the same function is enough (the offsets may differ)
    named = {**model, "symbol": "clear_page_erms+0x7"}
    assert agree(named, xen("clear_page_erms+0xa"))
    assert not agree(named, xen("copy_page+0x7"))


def test_flag_metrics_leave_out_the_stale_flags_of_guest_faults() -> None:
    """A not_shadow record of a failed guest walk repeats the flags of the
    fault before it (sh_page_fault clears them only after a successful
    walk): the flag metrics count fixup and emulate records only."""
    import polars as pl

    from replay.xen.compare import METRICS

    inside = pl.DataFrame({
        "kind": ["fixup", "not_shadow", "fixup", "emulate"],
        "flag_names": ["promote|wrmap", "promote|wrmap", "unsync", "wrmap"],
    })
    by = {m.name: m for m in METRICS}
    # the first fixup and the emulate: 2 (the not_shadow copy is not one)
    assert by["write_access_removals"].xen(inside) == 2
    assert by["unsyncs"].xen(inside) == 1  # the second fixup


def test_a_held_leaf_says_how_it_was_built_before_the_window() -> None:
    """A warm start can open the window on a leaf the model built earlier
    (``held``): the answer names that birth, so a reader sees the frame's
    history (a user module's page on a frame the boot had used). The
    recorded seed, its page's leaf built by clear_page_erms' write at event
    E, counted from a window opening just after E: held, built at E."""
    import json

    from replay.paths import TOP
    from replay.report.console import answer_label
    from replay.session import ReplayOptions, replay
    from replay.xen.compare import model_answer

    golden = json.loads((TOP / "traces" / "seed.expected.json").read_text())
    leaf = golden["expected"]["timelines"][0]["answer"]
    va = int(golden["expected"]["timelines"][0]["va"], 16)
    rep = replay(ReplayOptions(trace=TOP / "traces" / "seed.trace", watch=[va]))
    event = int(leaf["leaf_event"])
    inside = model_answer(rep, va, (event, 1 << 62))
    assert inside == {"kind": "demand-write", "symbol": leaf["leaf_symbol"], "event": event}
    held = model_answer(rep, va, (event + 1, 1 << 62))
    assert held == {"kind": "held", "symbol": "clear_page_erms+0x7", "event": event,
                    "built": "demand-write"}
    assert answer_label(held) == f"held (built by demand-write at event {event:,})"
    # a window before the leaf existed: nothing held, nothing built in it
    assert model_answer(rep, va, (0, event))["kind"] == "none"


def test_early_unshadows_count_shadows_of_guest_tables_only() -> None:
    """The model's early_unshadows (Xen's demote flag): an emulated write
    counts when a shadow of a guest table is destroyed at its store or its
    TABLE_WRITEs, not when only an FL1 is (a splintered superpage has no
    guest table: sh_destroy_l1_shadow drops it without shadow_demote)."""
    from replay.shadow.types import Fact, ShadowType
    from replay.xen.compare import WindowTally

    tally = WindowTally()
    tally.marker(0, ["start"])

    def emulate_then_destroy(event: int, stype: ShadowType) -> None:
        tally.fault(event, 0, 0x1000, True, "emulate", False)
        tally(Fact(event + 1, "destroyed", 0, 0x6000, int(stype), -1, 0, 0, "refcount"))

    emulate_then_destroy(10, ShadowType.FL1)  # a 2 MiB page split: native_set_pte
    emulate_then_destroy(20, ShadowType.L1)   # a freed table's last reference
    emulate_then_destroy(30, ShadowType.L4)   # a dying PGD
    tally.marker(40, ["stop"])
    emulate_then_destroy(50, ShadowType.L1)   # after the window: not counted
    assert tally.destroying_emulates() == 2  # events 20 and 30
