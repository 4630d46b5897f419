"""Symbols a trace carries: the covering entries name the trace's PCs exactly
as the whole table does, and never name another PC wrongly; a recorded trace
copied away from the checkout names its PCs as it does at home; a replay
without any symbols says so once."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from replay.guest.symbols import MAX_OFFSET, Symbols

from .conftest import run_cli
from .test_timeline import VA, seed_trace

#: a, b: kernel functions 0x100 apart; c: a module function, the last symbol.
TABLE = [(0xFFFF_FFFF_8100_1000, "a", ""), (0xFFFF_FFFF_8100_1100, "b", ""),
         (0xFFFF_FFFF_C020_6000, "c", "mod")]


def full() -> Symbols:
    syms = Symbols()
    syms.add_all(TABLE)
    return syms


def test_covering_keeps_what_names_the_pcs() -> None:
    pcs = [0xFFFF_FFFF_8100_1004, 0xFFFF_FFFF_C020_6010, 0x400000,
           0xFFFF_FFFF_C020_6000 + MAX_OFFSET + 1]
    entries = full().covering(pcs)
    # a is cut at b (0x100 bytes); c, the last, names up to MAX_OFFSET past
    # it; the user PC and the one too far past c are named by nothing
    assert entries == [(0xFFFF_FFFF_8100_1000, 0x100, "a", ""),
                       (0xFFFF_FFFF_C020_6000, MAX_OFFSET + 1, "c", "mod")]
    kept = Symbols.from_entries(entries)
    for pc in pcs:
        assert kept.name(pc) == full().name(pc)
    assert kept.name(0xFFFF_FFFF_C020_6010) == "c+0x10 [mod]"


def test_kept_entries_name_other_pcs_rightly_or_not_at_all() -> None:
    kept = Symbols.from_entries(full().covering([0xFFFF_FFFF_8100_1004]))
    assert kept.name(0xFFFF_FFFF_8100_10FF) == "a+0xff"  # still inside a
    # b was not kept: its PCs are addresses, not "a+0x150"
    assert kept.name(0xFFFF_FFFF_8100_1150) == "0xffffffff81001150"
    assert full().name(0xFFFF_FFFF_8100_1150) == "b+0x50"


# -- a recorded trace replayed away from the checkout ---------------------------
TOP = Path(__file__).resolve().parent.parent


def symbols_in(doc: Any) -> list[str]:
    """Every ``symbol`` / ``leaf_symbol`` value of a results document."""
    if isinstance(doc, dict):
        found = [v for k, v in doc.items() if k in ("symbol", "leaf_symbol") and v]
        return found + [s for v in doc.values() for s in symbols_in(v)]
    if isinstance(doc, list):
        return [s for v in doc for s in symbols_in(v)]
    return []


def _replay_here_and_away(tmp_path: Path, name: str, *args: str) -> tuple[Any, Any, str]:
    """traces/NAME.trace (and its console log) replayed in the checkout and
    from a copy in an empty folder with build/ out of reach
    (SHADOWTRACE_BUILD: an empty folder); (here JSON, away JSON, away stdout)."""
    copy = tmp_path / f"away-{name}"
    copy.mkdir()
    for f in (f"{name}.trace", f"{name}.console.log"):
        shutil.copy(TOP / "traces" / f, copy / f)
    empty = tmp_path / f"no-build-{name}"
    empty.mkdir()
    here_json, away_json = tmp_path / f"{name}-here.json", tmp_path / f"{name}-away.json"
    here = run_cli("replay", str(TOP / "traces" / f"{name}.trace"), *args,
                   "--json", str(here_json))
    away = run_cli("replay", str(copy / f"{name}.trace"), *args,
                   "--json", str(away_json), env={"SHADOWTRACE_BUILD": str(empty)})
    assert here.returncode == 0 and away.returncode == 0, here.stderr + away.stderr
    assert away.stderr == ""  # no "no symbols" line: the trace has them
    a, b = (json.loads(f.read_text()) for f in (here_json, away_json))
    return a, b, away.stdout


def test_copied_trace_names_its_pcs_without_build(tmp_path: Path) -> None:
    """A recorded trace copied to an empty folder, replayed without build/,
    names every PC of its timeline and findings as a replay in the checkout
    does: the names travel in the trace's symbols map."""
    # private-root, watching its module's private page: the module's own
    # functions (its first write builds the leaf)
    a, b, out = _replay_here_and_away(tmp_path, "private-root", "--watch", "ffff800040201000")
    assert a["timelines"] == b["timelines"] and a["findings"] == b["findings"]
    names = symbols_in(b["timelines"]) + symbols_in(b["findings"])
    assert any(n.endswith(" [private_root]") for n in names), names
    # the terminal report shows the module's name in brackets (not rich markup)
    assert "private_root_init+0x40e [private_root]" in out
    # seed, watching its printed page: kernel functions (clear_page_erms
    # builds the leaf), named with the KASLR-free kernel's symbols
    a, b, out = _replay_here_and_away(tmp_path, "seed", "--watch-console")
    assert a["timelines"] == b["timelines"] and a["findings"] == b["findings"]
    names = symbols_in(b["timelines"])
    assert any(n.startswith("clear_page_erms+") for n in names), names
    assert all(not n.startswith("0x") for n in names), names


def test_no_symbols_anywhere_is_said_once(tmp_path: Path) -> None:
    """A trace without a symbols map (the synthetic seed, as traces captured
    before symbols travelled) and no build/: the replay still runs, PCs are
    addresses, and stderr says so in one line."""
    s = seed_trace(tmp_path / "seed.trace")
    empty = tmp_path / "no-build"
    empty.mkdir()
    out = tmp_path / "r.json"
    proc = run_cli("replay", str(s.path), "--watch", f"{VA:x}", "--json", str(out),
                   env={"SHADOWTRACE_BUILD": str(empty)})
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == [
        "no symbols: PCs shown as addresses (trace has none and "
        f"{empty / 'guest' / 'kallsyms'} is missing)"]
    # unknown PCs are null in the JSON: no name at all
    assert symbols_in(json.loads(out.read_text())["timelines"]) == []
    # the same replay in the checkout names them from build/, silently
    home = run_cli("replay", str(s.path), "--watch", f"{VA:x}", "--json", str(out))
    assert home.returncode == 0 and home.stderr == "", home.stderr
    assert symbols_in(json.loads(out.read_text())["timelines"])
