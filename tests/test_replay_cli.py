"""``shadowtrace replay``: summary, JSON schema, Parquet, errors.

Runs the command as a user would (a subprocess) on the seed-like synthetic
trace of test_timeline.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from replay.report.results import SCHEMA, TOP_KEYS

from .conftest import run_cli
from .test_timeline import VA, seed_trace

#: The JSON layout docs/replay.md documents; a change here is a schema change.
TRACE_KEYS = {"path", "header", "footer", "events", "chunks"}
REPLAY_KEYS = {"dedup", "events", "accesses", "deduplicated", "duration_s", "markers"}
SHADOW_KEYS = {"l4", "l3", "l2", "l1", "fl1", "total"}
C7_KEYS = {"checked", "unknown", "mismatches", "samples"}
TIMELINE_KEYS = {"va", "answer", "guest", "episodes", "episodes_dropped"}
ANSWER_KEYS = {"when", "leaf_event", "leaf_reason", "leaf_pc", "leaf_symbol",
               "first_access_event"}
GUEST_KEYS = {"first_access", "first_write", "accesses", "table_writes", "table_writes_total"}
GUEST_EVENT_KEYS = {"event", "kind", "vcpu", "cr3", "pc", "symbol", "va", "pa"}
EPISODE_KEYS = {"root", "complete_event", "vcpu", "cr3", "levels", "ended"}
LEVEL_KEYS = {"level", "frame", "type", "index", "value", "event", "reason", "shared", "vcpu",
              "cr3", "pc", "symbol", "va", "destroyed", "changes"}


def one_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("shadowtrace: ")
    return lines[0]


def test_good_run_prints_summary_and_writes_json(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    out = tmp_path / "r.json"
    proc = run_cli("replay", str(s.path), "--watch", f"{VA:x}", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # no progress bar without a terminal
    for text in ("counters", "shadows by type", "C7 translation mismatches: 0",
                 f"watched VA {VA:#x}", "other roots reaching it",
                 "answer: the shadow leaf entry was built by its first access",
                 "findings: none"):
        assert text in proc.stdout, text
    doc = json.loads(out.read_text())
    assert tuple(doc) == TOP_KEYS
    assert doc["schema"] == SCHEMA
    assert set(doc["trace"]) == TRACE_KEYS
    assert set(doc["replay"]) == REPLAY_KEYS
    assert set(doc["shadows"]) == SHADOW_KEYS
    assert set(doc["c7"]) == C7_KEYS
    assert doc["truncated"] is False
    assert doc["findings"] == []  # nothing registered secure: no finding
    assert doc["trace"]["events"] == s.events
    # 8 shadows were made (2 L4, 1 L3, 2 L2, 2 L1, 1 FL1), none destroyed
    assert doc["shadows"]["total"] == {"live": 8, "created": 8, "destroyed": 0}
    assert doc["c7"]["mismatches"] == 0  # the trace's pa agree with its tables
    (tl,) = doc["timelines"]
    assert set(tl) == TIMELINE_KEYS
    assert set(tl["answer"]) == ANSWER_KEYS
    assert set(tl["guest"]) == GUEST_KEYS
    assert set(tl["guest"]["first_access"]) >= GUEST_EVENT_KEYS
    assert tl["va"] == f"{VA:#x}"
    assert tl["answer"]["when"] == "first-access"
    assert tl["answer"]["leaf_event"] == s.deref
    assert len(tl["episodes"]) == 2  # root A, then root B
    for ep in tl["episodes"]:
        assert set(ep) == EPISODE_KEYS
        assert [lv["level"] for lv in ep["levels"]] == [
            "L4", "L4e", "L3", "L3e", "L2", "L2e", "L1", "L1e"]
        for lv in ep["levels"]:
            assert set(lv) == LEVEL_KEYS


def test_watch_console(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    (tmp_path / "seed.console.log").write_text(
        f"[    2.9] The address allocated is {VA:x}\n[    2.9] The value at the address is 0\n")
    out = tmp_path / "r.json"
    proc = run_cli("replay", str(s.path), "--json", str(out), "--watch-console")
    assert proc.returncode == 0, proc.stderr
    assert [t["va"] for t in json.loads(out.read_text())["timelines"]] == [f"{VA:#x}"]


def test_parquet_round_trip(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    proc = run_cli("replay", str(s.path), "--watch", f"{VA:#x}", "--parquet",
                   str(tmp_path / "pq"))
    assert proc.returncode == 0, proc.stderr
    ev = pl.read_parquet(tmp_path / "pq" / "events.parquet")
    # every non-access event (7 snapshots, 2 CR3 writes, 2 table writes), the
    # accesses that faulted (alloc store, dereference, 2 MiB read, read under
    # root B) -- the neighbour's read found its prefetched entry: no fault
    assert ev["kind"].value_counts().sort("kind").rows() == [
        ("CR3_WRITE", 2), ("READ", 3), ("SNAPSHOT", 7), ("TABLE_WRITE", 2), ("WRITE", 1)]
    faulted = ev.filter(pl.col("faulted"))["index"].to_list()
    # faults at the accesses, plus the events whose handling made facts:
    # both CR3 writes (new L4 shadows) and the validated unlink
    assert sorted(faulted) == sorted([s.cr3_a, s.alloc_store, s.deref, s.read_va3, s.cr3_b,
                                      s.deref_b, s.unlink_b])
    deref = ev.filter(pl.col("index") == s.deref).row(0, named=True)
    assert deref["va"] == VA and deref["pc"] == 0xFFFF_FFFF_C000_004A
    sh = pl.read_parquet(tmp_path / "pq" / "shadows.parquet")
    assert sh.height == 8  # the 8 shadows of the run
    assert sh["destroyed"].null_count() == 8  # all alive at the end
    assert set(sh["created_reason"].to_list()) == {"cr3", "demand"}


def test_corrupt_trace_is_one_line(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    data = bytearray(s.path.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff" * 64  # inside the chunk's compressed columns
    s.path.write_bytes(bytes(data))
    proc = run_cli("replay", str(s.path))
    assert proc.returncode == 1
    assert str(s.path) in one_line(proc.stderr)
    junk = tmp_path / "junk.trace"
    junk.write_bytes(b"not a trace at all")
    proc = run_cli("replay", str(junk))
    assert proc.returncode == 1
    assert "not a shadowtrace trace" in one_line(proc.stderr)


def test_truncated_needs_allow_truncated(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "cut.trace", footer=False)
    proc = run_cli("replay", str(s.path))
    assert proc.returncode == 1
    assert "truncated" in one_line(proc.stderr)
    out = tmp_path / "r.json"
    proc = run_cli("replay", str(s.path), "--allow-truncated", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "TRUNCATED" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["truncated"] is True and doc["trace"]["footer"] is None
    assert doc["trace"]["events"] == s.events  # the whole chunk was written


def test_bad_options_are_one_line(tmp_path: Path) -> None:
    s = seed_trace(tmp_path / "seed.trace")
    proc = run_cli("replay", str(s.path), "--watch", "zz")
    assert proc.returncode == 1
    assert "not a hex address" in one_line(proc.stderr)
    proc = run_cli("replay", str(s.path), "--watch-console")  # no console log
    assert proc.returncode == 1
    assert "console log" in one_line(proc.stderr)
    bad = tmp_path / "bad.toml"
    bad.write_text("no_such_knob = true\n")
    proc = run_cli("replay", str(s.path), "--config", str(bad))
    assert proc.returncode == 1
    assert "no_such_knob" in one_line(proc.stderr)


def test_module_names_survive_the_terminal_report() -> None:
    """Symbols like ``f+0x40e [module]`` come from the trace: never rich markup."""
    trace = Path(__file__).resolve().parent.parent / "traces" / "private-root.trace"
    proc = run_cli("replay", str(trace), "--watch", "ffff800040201000")
    assert proc.returncode == 0, proc.stderr[-2000:]
    # the leaf of the private VA is built by the module's first write (its expectation file)
    assert "private_root_init+0x40e [private_root]" in proc.stdout


def test_check_writes_and_compares_expectations(tmp_path: Path) -> None:
    """``shadowtrace check``: --update writes FILE from a replay; a replay
    then matches it; a changed expectation is one difference line, exit 1.
    (The recorded traces' goldens are replayed in-process by
    test_regression, as this command does.)"""
    s = seed_trace(tmp_path / "seed.trace")
    expect = tmp_path / "seed.expected.json"
    proc = run_cli("check", str(s.path), "--expect", str(expect))
    assert proc.returncode == 1
    assert "use --update" in one_line(proc.stderr)
    proc = run_cli("check", str(s.path), "--expect", str(expect), "--update", "--watch",
                   f"{VA:x}")
    assert proc.returncode == 0, proc.stderr
    stored = json.loads(expect.read_text())
    assert stored["options"]["watch"] == [f"{VA:x}"]  # the options it was made with
    assert stored["expected"]["timelines"][0]["answer"]["when"] == "first-access"
    proc = run_cli("check", str(s.path), "--expect", str(expect))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "as expected" in proc.stdout
    stored["expected"]["counters"]["shadow_fault"] += 1
    expect.write_text(json.dumps(stored))
    proc = run_cli("check", str(s.path), "--expect", str(expect))
    assert proc.returncode == 1
    assert "1 difference(s)" in proc.stdout
    assert "counters.shadow_fault: expected" in proc.stdout
    expect.write_text("[]")
    proc = run_cli("check", str(s.path), "--expect", str(expect))
    assert proc.returncode == 1
    assert "not an expectation file" in one_line(proc.stderr)


def test_progress_lines_when_stderr_is_not_a_terminal() -> None:
    # stderr is a pipe here: with SHADOWTRACE_PROGRESS_EVERY=0 a line is due
    # after every chunk, so seed's 67,192 events in chunks of 65,536 give
    # 2 lines (a full chunk and one of 1,656), the last at every event
    trace = Path(__file__).resolve().parent.parent / "traces" / "seed.trace"
    proc = run_cli("replay", str(trace), env={"SHADOWTRACE_PROGRESS_EVERY": "0"})
    assert proc.returncode == 0, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith(f"replay {trace}: ")]
    counts = [int(ln.split(": ")[1].split(" events")[0].replace(",", "")) for ln in lines]
    assert counts == [65_536, 67_192]
    assert all("M events/s" in ln for ln in lines)
    # a bad value is one line, not a traceback
    bad = run_cli("replay", str(trace), env={"SHADOWTRACE_PROGRESS_EVERY": "soon"})
    assert bad.returncode != 0
    assert one_line(bad.stderr).endswith("not a number of seconds >= 0")


def test_truth_walks_the_rebuilt_tables_for_every_page_qemu_maps(tmp_path: Path) -> None:
    """``--truth`` on the recorded seed: QEMU's ``info tlb`` at the pause
    after the stop marker against the tables rebuilt from the trace."""
    from .replays import TRACES

    out = tmp_path / "r.json"
    proc = run_cli("replay", str(TRACES / "seed.trace"), "--truth", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    (truth,) = json.loads(out.read_text())["truth"]  # one vCPU
    assert "ground truth, vCPU 0" in proc.stdout
    # QEMU lists each mapped page of the shell's root (user pages, the
    # kernel image, the direct map's 4 KiB and 2 MiB pages): ~74,000
    assert truth["pages"] > 70_000
    # Every walk ends in frames the trace described (the plugin snapshots
    # each table reachable from a loaded root before the window's first
    # access, and every table linked in since).
    assert truth["unknown"] == 0
    # 2 pages differ: the guest runs on between the stop marker and the
    # pause, and the shell wrote its data page 0x4a7000 (copy on write: a
    # new frame) and mapped one more page (0x3bdd4000). One table the trace failed
    # to rebuild would show as hundreds (an L1 maps 512 pages).
    assert truth["differ"] == 2
    assert {s["va"] for s in truth["samples"]} >= {"0x4a7000"}
    assert truth["agree"] == truth["pages"] - 2
    # the pause came under the root the trace last loaded (the shell's)
    assert truth["trace_cr3"] == truth["cr3"]
    assert "switched address space" not in proc.stdout


def test_truth_says_when_the_guest_switched_before_the_pause(tmp_path: Path) -> None:
    """smp-fork: the tables are walked as at the stop marker (where the
    capture paused the guest, on reading its line), when vCPU 0 ran one
    process (CR3 0x4900000); at the pause it was in another (0x2a10000, a
    root the trace had loaded before): the report says so, and that root's
    pages still all agree."""
    from .replays import TRACES

    out = tmp_path / "r.json"
    proc = run_cli("replay", str(TRACES / "smp-fork.trace"), "--truth", "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(out.read_text())
    v0, v1 = doc["truth"]
    (stop,) = [m["event"] for m in doc["replay"]["markers"] if m["marker"] == ["stop"]]
    assert v0["event"] == v1["event"] == stop
    assert (v0["cr3"], v0["trace_cr3"]) == ("0x2a10000", "0x4900000")
    assert v0["differ"] == 0 and v0["unknown"] == 0
    said = " ".join(proc.stdout.split())
    assert (f"vCPU 0 had CR3 0x4900000 at the stop marker, event {stop:,}: the guest "
            "switched address space before the pause") in said
    assert v1["trace_cr3"] == v1["cr3"]  # vCPU 1 paused in its process at the stop marker
    assert "vCPU 1 had CR3" not in said


def test_truth_is_walked_at_the_stop_marker_not_the_trace_end() -> None:
    """A trace may go on past the stop marker (a whole-run capture records
    until power-off, 1.4 M events more for seed): the capture paused the
    guest at the stop marker, so the walk is made there. On the recorded
    seed: the walk is at the stop marker's event, and a table store after
    it (here: one page QEMU listed unmapped in the model's tables after the
    replay) changes a walk at the end but not the one made at the stop."""
    from replay.analysis.truth import TruthAtStop, check_truth, read_truth
    from replay.driver.replayer import Replayer
    from replay.paths import side_paths
    from replay.shadow.config import EngineConfig
    from replay.shadow.engine import ShadowEngine
    from replay.trace.reader import TraceReader

    from .replays import TRACES

    trace = TRACES / "seed.trace"
    truth = read_truth(side_paths(trace)[1])
    with TraceReader(trace) as reader:
        engine = ShadowEngine(EngineConfig.for_trace(reader.header))
        at_stop = TruthAtStop(engine, truth)
        stats = Replayer(engine, tools=[at_stop]).run(reader)
    (stop,) = [e for e, _v, words in stats.markers if words == ["stop"]]
    (check,) = at_stop.result()
    assert check.event == stop
    assert (check.differ, check.unknown) == (2, 0)  # as the command reports (test above)
    # the first page QEMU listed, mapped alike: clear its leaf entry
    va = int(str(truth["tlb"][0]).split(":", 1)[0], 16)
    walked: list[int] = []
    assert engine.guest.translate(check.cr3, va, walked) >= 0
    leaf = walked[-1]  # GuestMemory.entry_id: frame << 9 | index
    engine.guest.write((leaf >> 9) << 12 | (leaf & 0x1FF) << 3, 0)
    (at_end,) = check_truth(engine.guest, truth, [v.cr3 for v in engine.vcpus])
    assert at_end.differ == check.differ + 1  # the tables at the end are not QEMU's
    assert at_stop.result()[0].differ == check.differ  # the walk at the stop marker stays


def test_truth_without_its_file_is_one_line(tmp_path: Path) -> None:
    from .replays import TRACES

    lonely = tmp_path / "lonely.trace"
    lonely.write_bytes((TRACES / "seed.trace").read_bytes())
    proc = run_cli("replay", str(lonely), "--truth")
    assert proc.returncode == 1
    assert "no ground truth beside the trace" in one_line(proc.stderr)
    (tmp_path / "lonely.truth.json.gz").write_text("not gzip")
    proc = run_cli("replay", str(lonely), "--truth")
    assert proc.returncode == 1
    assert "not a ground-truth file" in one_line(proc.stderr)
