"""What the recorded traces' replays must show, beyond matching their goldens.

Each test reads the replay of a golden file's trace (the ``goldens``
fixture, tests/replays.py: the replay test_regression compares), in the
form the file stores: so these fail when the engine or the checks change
what they conclude, and they guard an ``--update-golden`` rewrite, which
would otherwise take any new result as the truth.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from .replays import Goldens

#: A golden's replayed expectation by name.
Results = Callable[[str], dict[str, Any]]


@pytest.fixture
def expected(goldens: Goldens) -> Results:
    """``expected(name)``: the replayed expectation of traces/NAME.expected.json."""
    return lambda name: goldens(name).got


@pytest.fixture
def variant(goldens: Goldens) -> Results:
    """``variant(name)``: the same for traces/variants/NAME.expected.json."""
    return lambda name: goldens(name).got


def test_seed_answer(expected: Results) -> None:
    """The seed question: when was the shadow of the allocated page built?"""
    (timeline,) = expected("seed")["timelines"]
    answer = timeline["answer"]
    # Not at page_address (it only computes an address) and not by the
    # module's dereference: Debian's kernel zeroes pages on allocation
    # (init_on_alloc), so alloc_pages' own clear_page writes the page first,
    # and that write's shadow fault builds the leaf entry.
    assert answer["when"] == "first-access"
    assert answer["leaf_reason"] == "demand"
    assert answer["leaf_symbol"].startswith("clear_page")
    assert answer["leaf_event"] == answer["first_access_event"]


def test_seed_page_reachable_from_every_root(expected: Results) -> None:
    findings = expected("seed")["findings"]
    # the page is in the direct map, which every root shares: its leaf is in
    # the shadows of non-secure roots (C1 critical) and was accessed from them
    # (C2: the module's read and alloc's zeroing run on non-secure roots)
    assert findings.get("C1/critical", 0) >= 1
    assert findings.get("C2/critical", 0) >= 1
    assert expected("seed")["c7_mismatches"] == 0
    # no secure root is registered (C3 needs one) and the page has no VA
    # besides its direct-map one (C4 needs a second): neither can fire
    assert not any(k.startswith(("C3/", "C4/")) for k in findings)


def test_private_root_shares_kernel_half(expected: Results) -> None:
    findings = expected("private-root")["findings"]
    # the private root copies the kernel half: its kernel L3 frames are shared
    # with every other root (C3 info), and the one whose subtree reaches the
    # secure page through the direct map is critical
    assert findings.get("C3/info", 0) >= 1 and findings.get("C3/critical", 0) >= 1
    # the secure page keeps its direct-map alias (C4)
    assert findings.get("C4/high", 0) >= 1


def test_shared_l1_is_critical(expected: Results) -> None:
    findings = expected("shared-l1")["findings"]
    # the secure page's L1 frame is linked from a non-secure root too: C3
    # critical beyond what private-root shows, and the alias read is C2
    assert findings.get("C3/critical", 0) > expected("private-root")["findings"].get(
        "C3/critical", 0
    )
    assert findings.get("C2/critical", 0) >= 1


def test_secretmem_page_has_no_alias(expected: Results) -> None:
    findings = expected("secretmem")["findings"]
    # memfd_secret removes the page from the direct map: no second mapping
    # (C4) of it anywhere. The program cannot name its own root as secure, so
    # its own mapping still counts as non-secure (C1, C2): the positive
    # control is the absence of C4.
    assert "C4/high" not in findings
    assert findings.get("C1/critical", 0) >= 1


def test_vmalloc_builds_and_destroys_shadows(expected: Results) -> None:
    exp = expected("vmalloc")
    counters = exp["counters"]
    # vmalloc/vfree write kernel tables: emulated, re-validated table writes
    assert counters["shadow_emulate"] > 0
    # and shadows come and go within the window
    assert exp["shadows"]["total"]["destroyed"] > 0
    (timeline,) = exp["timelines"]
    # the module's first write to the area builds its leaf by demand
    assert timeline["answer"]["leaf_symbol"].startswith("st_vmalloc_init")


def test_fork_unsyncs_user_l1s(expected: Results) -> None:
    counters = expected("fork")["counters"]
    # children write their copy-on-write pages: user L1s go out of sync and
    # are resynced at later CR3 writes (SHOPT_OUT_OF_SYNC is on by default)
    assert counters["shadow_unsync"] > 0 and counters["shadow_resync"] > 0
    # four children, the parent and the shell: more CR3 writes than seed's
    assert counters["cr3_write_intercepted"] > expected("seed")["counters"][
        "cr3_write_intercepted"
    ]


def c6(exp: dict) -> dict[str, int]:
    """C6 findings by 'severity/hazard kind'."""
    return {k.removeprefix("C6/"): v for k, v in exp["findings"].items() if k.startswith("C6/")}


#: private-root with the CR3-target list (both roots, in force from the
#: secure-root marker to secure-end) and which of OOS / vTLB are on.
TARGET_CONFIGS = {
    "targets": (True, True),
    "targets-no-oos": (False, True),
    "targets-no-vtlb": (True, False),
    "targets-no-oos-no-vtlb": (False, False),
}


def test_private_root_default_config_has_no_exitless_switch(expected: Results) -> None:
    base = expected("private-root")
    # no CR3-target list: Xen intercepts every CR3 write, nothing is stale
    assert base["counters"]["cr3_write_not_intercepted"] == 0
    assert c6(base) == {}


@pytest.mark.parametrize("name", TARGET_CONFIGS)
def test_private_root_c6_per_configuration(name: str, expected: Results, variant: Results) -> None:
    oos, vtlb = TARGET_CONFIGS[name]
    base = expected("private-root")
    exp = variant(f"private-root+{name}")
    found = c6(exp)
    # 4 passes, each a switch to the private root and one back, all while
    # the list is in force: 8 exit-less writes, every other one intercepted
    assert exp["counters"]["cr3_write_not_intercepted"] == 8
    assert (
        exp["counters"]["cr3_write_intercepted"]
        == base["counters"]["cr3_write_intercepted"] - 8
    )
    # Xen never saw the private root loaded, so it has no shadow for it:
    # the first switch runs on nothing Xen built (high), and the module's
    # first access faults into a Xen that walks the normal root instead
    assert found["high/no-shadow-for-target"] == 1
    assert found["info/fault-on-stale-root"] == 1
    # ... where the private VA is unmapped: each of the module's 8 accesses
    # to it (a write and a read per pass) is a fault Xen would reflect to
    # the guest, and the VA's shadow is never built (base: 0 such faults)
    assert base["counters"]["shadow_fault_bail_real_fault"] == 0
    assert exp["counters"]["shadow_fault_bail_real_fault"] == 8
    (timeline,) = exp["timelines"]
    assert timeline["answer"]["when"] == "never"
    # OOS L1s left stale by the switch (there and back: 2 roots) only with
    # SHOPT_OUT_OF_SYNC; live vTLB entries only with SHOPT_VIRTUAL_TLB
    assert found.get("high/oos-stale", 0) == (2 if oos else 0)
    assert found.get("high/vtlb-live", 0) == (2 if vtlb else 0)
    # C5 (the private tables are writable through every root's direct map)
    # is a property of the guest, not of Xen's configuration
    assert exp["findings"]["C5/critical"] == base["findings"]["C5/critical"]
    assert exp["c7_mismatches"] == 0


def test_private_root_targets_listed_from_the_start(variant: Results) -> None:
    exp = variant("private-root+targets-always")
    # listed from the window's start, the normal root's writes outside the
    # module exit-lessly too (exec, context switches): more than the 8
    assert exp["counters"]["cr3_write_not_intercepted"] > 8
    # and the normal root itself is first loaded before Xen shadowed it
    assert c6(exp)["high/no-shadow-for-target"] == 2


def test_fork_pool_pressure(expected: Results, variant: Results) -> None:
    base = expected("fork")["counters"]
    p64 = variant("fork+pool-64")["counters"]
    p48 = variant("fork+pool-48")["counters"]
    # the default pool (libxl's size for the guest) never runs short
    assert base["shadow_evicted"] == 0 and base["shadow_prealloc_1"] == 0
    # 64 pages < 70 live shadows + 3 OOS snapshot pages (3 per vCPU, the
    # trace has 1): unpinning least recently pinned shadows is enough
    assert p64["shadow_evicted"] > 0
    assert p64["shadow_prealloc_1"] > 0 and p64["shadow_prealloc_2"] == 0
    # 48 pages: unpinning is not enough, the current roots' shadows are
    # unhooked too, and the same tables are shadowed again and again
    assert p48["shadow_prealloc_2"] > 0
    assert p48["shadow_created"] > 10 * base["shadow_created"]
    for name in ("fork+pool-64", "fork+pool-48"):
        exp = variant(name)
        assert exp["c7_mismatches"] == 0  # the guest's own walks do not change
        # the pool holds the live shadows and the 3 OOS snapshot pages
        assert exp["shadows"]["total"]["live"] <= int(name.split("-")[-1]) - 3


def test_reserved_root_is_clean(expected: Results) -> None:
    exp = expected("reserved-root")
    # secure page and private tables live in memmap-reserved memory, outside
    # the direct map; the temporary window was removed and flushed before
    # registration. What is left is the copied kernel half: kernel L3 frames
    # shared with every other root, none of whose subtrees reaches the
    # secure page (C3 info). No C1, C2, C4, C5, C6, C8.
    assert set(exp["findings"]) == {"C3/info"}
    assert exp["c7_mismatches"] == 0
    # and the secure page's shadow is built under the private root by the
    # module's first write, as in private-root
    (timeline,) = exp["timelines"]
    assert timeline["answer"]["when"] == "first-access"
    assert timeline["answer"]["leaf_symbol"].startswith("reserved_root_init")


def test_reserved_root_lazy_flush_leaves_stale_shadows(expected: Results, variant: Results) -> None:
    lazy = expected("reserved-root-lazy")
    # without the flush, the window's L1 is out of sync when its PTEs are
    # cleared: the shadows of the roots sharing the kernel half still map
    # the secure page when it is registered (C1 critical: in the shadow)
    assert lazy["findings"].get("C1/critical", 0) >= 1
    assert set(lazy["findings"]) == {"C1/critical", "C3/info"}
    # the same trace with SHOPT_OUT_OF_SYNC off: each PTE clear traps and is
    # validated at once, nothing stale: as clean as reserved-root
    assert set(variant("reserved-root-lazy+no-oos")["findings"]) == {"C3/info"}
