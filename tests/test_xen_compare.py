"""The real Xen as the oracle, end to end: ``shadowtrace xen`` boots Xen 4.17
(shadow paging) under QEMU TCG and runs the unchanged ``seed`` scenario;
``shadowtrace compare`` puts the recorded ``traces/seed.trace`` beside it.

What is asserted comes from Xen's own records of that run; the seed page is
found on each side by its own console line (the Xen guest places it
elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from replay.session import DEFAULT_CONSOLE_REGEX, console_vas
from replay.xen.compare import METRICS, SHARED

from .conftest import XenCliRun, run_cli

TOP = Path(__file__).resolve().parent.parent
SEED = TOP / "traces" / "seed.trace"

pytestmark = pytest.mark.e2e


def _table(run: XenCliRun) -> pl.DataFrame:
    return pl.read_parquet(run.out / "seed.xen.parquet")


def _seed_va(run: XenCliRun) -> int:
    text = (run.out / "seed.xen.console.log").read_text()
    return console_vas(text, DEFAULT_CONSOLE_REGEX, "xen console")[0]


def test_xen_first_record_of_the_seed_page_is_a_new_l1_entry_from_clear_page(
    xen_seed_run: XenCliRun,
) -> None:
    df = _table(xen_seed_run)
    page = _seed_va(xen_seed_run) >> 12
    inside = df.filter(
        (pl.col("window") == "inside") & pl.col("va").is_not_null()
        & ((pl.col("va") // 4096) == page) & pl.col("kind").is_in(["fixup", "not_shadow",
                                                                  "emulate", "mmio"])
    )
    assert inside.height >= 1, "Xen has no record of the seed page inside the window"
    first = inside.row(0, named=True)
    # Xen fixed a fault, with TRCE_SFLAG_SHADOW_L1_GET_REF: it built a new
    # shadow L1 entry for the page ...
    assert first["kind"] == "fixup"
    assert "l1_get_ref" in first["flag_names"].split("|")
    # ... from a #PF exit at clear_page_erms, alloc_pages' zeroing (rep stosb: a write)
    assert first["exit_name"] == "page_fault"
    assert first["symbol"].startswith("clear_page_erms+")


def test_xen_window_holds_an_early_unshadow(xen_seed_run: XenCliRun) -> None:
    df = _table(xen_seed_run)
    inside = df.filter(pl.col("window") == "inside")
    pattern = "(^|\\|)(early_unshadow|demote)(\\||$)"
    dropped = inside.filter(
        (pl.col("kind") == "emulate") & pl.col("flag_names").fill_null("").str.contains(pattern)
    )
    # a freed page table being cleared by clear_page is unshadowed at the first
    # emulated write (the emulation's path flags say the frame was demoted)
    assert dropped.height >= 1
    assert "clear_page_erms" in {s.split("+")[0] for s in dropped["symbol"].to_list()}


def test_xen_summary_and_files(xen_seed_run: XenCliRun) -> None:
    df = _table(xen_seed_run)
    # the marker window exists: the start and the stop marker records
    assert df.filter(pl.col("window") == "marker").height == 2
    assert df.filter(pl.col("window") == "inside").height > 0
    raw = xen_seed_run.out / "seed.xen.trace.raw"
    assert raw.stat().st_size > 0
    # the summary table names the kinds with their counts inside the window
    n_fix = df.filter((pl.col("window") == "inside") & (pl.col("kind") == "fixup")
                      & pl.col("vcpu").is_not_null()).height
    line = next(ln for ln in xen_seed_run.stdout.splitlines() if ln.strip().startswith("│ fixup")
                or ln.strip().startswith("fixup"))
    assert f"{n_fix:,}" in line


def test_compare_seed_agrees_on_the_page(xen_seed_run: XenCliRun, tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    proc = run_cli("compare", "--trace", str(SEED), "--xen", str(xen_seed_run.out),
                   "--watch-console", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert len(doc["answers"]) == 1  # the seed module prints one page
    ans = doc["answers"][0]
    # the recorded trace's answer, as its expectation file (checked against a
    # replay by test_regression) holds it: the leaf built by clear_page_erms' write
    golden = json.loads((TOP / "traces" / "seed.expected.json").read_text())
    leaf = golden["expected"]["timelines"][0]["answer"]
    assert ans["model"] == {"kind": "demand-write", "symbol": leaf["leaf_symbol"],
                            "event": leaf["leaf_event"]}
    assert leaf["leaf_symbol"] == "clear_page_erms+0x7"
    assert ans["xen"]["kind"] == "fixup+new-l1e"
    assert ans["agree"] is True
    assert int(ans["va_model"], 16) == 0xFFFF888006192000  # the trace's console line
    assert int(ans["va_xen"], 16) == _seed_va(xen_seed_run)
    names = [m["name"] for m in doc["metrics"]]
    assert names == [m.name for m in METRICS] + [SHARED]
    by = {m["name"]: m for m in doc["metrics"]}
    # the Xen column is counted from the same table the test reads
    df = _table(xen_seed_run)
    inside = df.filter((pl.col("window") == "inside") & pl.col("vcpu").is_not_null())
    assert by["faults_fixed"]["xen"] == inside.filter(pl.col("kind") == "fixup").height
    assert by["emulated_writes"]["xen"] == inside.filter(pl.col("kind") == "emulate").height
    # both sides fault on pages in the window, and the model's counts are its own
    assert by["faults_fixed"]["model"] > 0 and by["faulted_pages"]["xen"] > 0


def test_compare_bad_input(tmp_path: Path) -> None:
    proc = run_cli("compare", "--trace", str(SEED), "--xen", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0  # one line
    assert "no *.xen.parquet" in proc.stderr
    bad = tmp_path / "seed.xen.parquet"
    bad.write_bytes(b"not parquet")
    proc = run_cli("compare", "--trace", str(SEED), "--xen", str(tmp_path))
    assert proc.returncode == 1 and "not a Xen record table" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_xen_unknown_scenario_is_one_line(tmp_path: Path) -> None:
    proc = run_cli("xen", "--scenario", "no-such", "--out", str(tmp_path))
    assert proc.returncode == 1
    assert proc.stderr.startswith("shadowtrace: unknown scenario 'no-such'")
    assert "Traceback" not in proc.stderr


def test_readme_model_column_is_what_compare_gives(xen_seed_run: XenCliRun, tmp_path: Path) -> None:
    """The model half of the README's "Model vs real Xen" seed column comes from
    this replay (Xen's half is one measured run and varies between runs)."""
    out = tmp_path / "cmp.json"
    proc = run_cli("compare", "--trace", str(SEED), "--xen", str(xen_seed_run.out),
                   "--watch-console", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    readme = (TOP / "README.md").read_text()
    section = readme[readme.index("## Model vs real Xen"):]
    header = next(ln for ln in section.splitlines() if ln.startswith("| metric |"))
    col = [c.strip() for c in header.strip("|").split("|")].index("seed")
    rows = {}
    for ln in section.splitlines():
        if ln.startswith("| `"):
            cells = [c.strip() for c in ln.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[col].split(" / ")[0]
    for m in doc["metrics"]:
        model = m["model"]
        text = f"{model:.2f}" if isinstance(model, float) else f"{model:,}"
        assert rows[m["name"]] == text, m["name"]
