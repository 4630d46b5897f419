"""smp-fork under the real Xen with two vCPUs (the scenario's ``vcpus``
file): each vCPU pinned to a pCPU of its own, Xen's records attributed to
the vCPU that made them, and the comparison with the two-vCPU recording."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest

from replay.xen.compare import FAULT_KINDS

from .conftest import XenCliRun, run_cli
from .test_smp import CPU1_PAGES, TRACES, buf_va

pytestmark = pytest.mark.e2e

SMP = TRACES / "smp-fork.trace"
SEED = TRACES / "seed.trace"


def test_two_vcpus_on_their_own_pcpus(xen_smp_run: XenCliRun) -> None:
    # dom0 is on pCPU 0; guest vCPU i on pCPU 1 + i (run_xen checked
    # `xl vcpu-list` says so, else the run would have failed)
    assert xen_smp_run.pcpus == [1, 2]


def test_records_belong_to_the_vcpu_that_made_them(xen_smp_run: XenCliRun) -> None:
    """Xen's fault records on the parent's buffer, on vCPU 1: exactly the
    pages the children pinned to CPU 1 read and write (4-7, 12-15), each of
    them; vCPU 0 faults on the others (the parent, children 0 and 2)."""
    buf = buf_va(xen_smp_run.console_log.read_text(errors="replace"))
    df = pl.read_parquet(xen_smp_run.out / "smp-fork.xen.parquet")
    faults = df.filter(
        (pl.col("window") == "inside") & pl.col("kind").is_in(FAULT_KINDS)
        & (pl.col("va") >= buf) & (pl.col("va") < buf + 16 * 4096)
    )
    pages = {v: sorted({(va - buf) >> 12 for va in faults.filter(pl.col("vcpu") == v)["va"]})
             for v in (0, 1)}
    assert pages[1] == CPU1_PAGES
    assert set(pages[0]) >= {0, 1, 2, 3, 8, 9, 10, 11}


def test_compare_two_vcpu_runs(xen_smp_run: XenCliRun, tmp_path: Path) -> None:
    out = tmp_path / "cmp.json"
    proc = run_cli("compare", "--trace", str(SMP), "--xen", str(xen_smp_run.out),
                   "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    metrics = {m["name"]: m for m in json.loads(out.read_text())["metrics"]}
    # both sides intercept the CR3 writes of both vCPUs: the recording has
    # 33 (22 on vCPU 0, 11 on vCPU 1); Xen's run is another run of the same
    # programs, so within a third of it, and never a single vCPU's share
    assert metrics["cr3_writes"]["model"] == 33
    assert 22 < metrics["cr3_writes"]["xen"] < 44
    # out-of-sync L1s are resynced on both sides
    assert metrics["resyncs"]["model"] > 0 and metrics["resyncs"]["xen"] > 0


def test_xen_syncs_the_other_vcpus_pages(xen_smp_run: XenCliRun) -> None:
    """Xen's shadow_sync_other_vcpus (a CR3 write making another vCPU's
    out-of-sync pages safe; TRC_SHADOW_RESYNC_ONLY records) runs inside the
    window, as the model's shadow_resync_only counts it (test_smp.py): with
    one vCPU there is no other vCPU and no such record."""
    df = pl.read_parquet(xen_smp_run.out / "smp-fork.xen.parquet")
    inside = df.filter((pl.col("window") == "inside") & (pl.col("kind") == "resync_only"))
    assert inside.height > 0


def test_compare_refuses_other_vcpu_counts(xen_smp_run: XenCliRun) -> None:
    # the 1-vCPU seed recording beside a 2-vCPU Xen run: one line, exit 1
    proc = run_cli("compare", "--trace", str(SEED), "--xen", str(xen_smp_run.out))
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "1 vCPU(s)" in lines[0] and "had 2" in lines[0], proc.stderr
