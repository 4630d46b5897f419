"""Configuration of the shadow engine: Xen's optimisation knobs and sizes.

Knob names follow Xen (``xen/arch/x86/mm/shadow/private.h``): each
``SHOPT_*`` bit is one boolean, and the defaults are upstream's
``SHADOW_OPTIMIZATIONS 0x1ff`` (every bit on). A config is read from a dict,
a JSON file or a TOML file with the same keys (lower case, no prefix)::

    writable_heuristic = true       # SHOPT_WRITABLE_HEURISTIC 0x01
    out_of_sync = false             # SHOPT_OUT_OF_SYNC        0x100
    vcpus = 2
    ram_mib = 512
    pool_pages = 2048               # omit for libxl's default
    cr3_targets = ["0x1234000"]     # roots whose CR3 writes do not exit
    cr3_targets_active = "secure"   # listed only while a secure-root is registered
    guest_kind = "unaware"          # a guest that never calls HVMOP_pagetable_dying
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Final

from ..errors import UsageError

#: SHOPT_* bit values, as in Xen's private.h.
SHOPT_BITS: Final[dict[str, int]] = {
    "writable_heuristic": 0x01,
    "early_unshadow": 0x02,
    "fast_fault_path": 0x04,
    "prefetch": 0x08,
    "linux_l3_toplevel": 0x10,
    "skip_verify": 0x20,
    "virtual_tlb": 0x40,
    "fast_emulation": 0x80,
    "out_of_sync": 0x100,
}
#: Upstream default: every optimisation on.
SHADOW_OPTIMIZATIONS: Final = 0x1FF
#: Xen's PREFETCH_DISTANCE (multi.c).
PREFETCH_DISTANCE: Final = 32
#: Xen's SHADOW_OOS_PAGES: out-of-sync slots per vCPU.
SHADOW_OOS_PAGES: Final = 3
#: Xen's SHADOW_OOS_FIXUPS: writable mappings remembered per out-of-sync page.
SHADOW_OOS_FIXUPS: Final = 2
#: Xen's VTLB_ENTRIES.
VTLB_ENTRIES: Final = 13
#: The most CR3-target values VMX hardware offers (we model 4).
CR3_TARGET_MAX: Final = 4
#: When the CR3-target list is in force: from the start, or only between a
#: ``secure-root`` marker and the next ``secure-end`` (a hypervisor that
#: programs the list when the guest registers its secure address space).
CR3_TARGETS_ACTIVE: Final = ("always", "secure")
#: The kind of guest modelled: "xen-aware", a Linux with Xen's HVM/PVH
#: support as Debian ships it (it tells Xen when a page table is dying:
#: HVMOP_pagetable_dying from xen_hvm_exit_mmap, probed at boot by
#: xen_hvm_init_mmu_ops, arch/x86/xen/mmu_hvm.c), or "unaware" (a kernel
#: that never makes that call: Xen guesses with its two-write heuristic).
GUEST_KINDS: Final = ("xen-aware", "unaware")
#: The options whose value is one of a fixed set of names, and those names.
CHOICES: Final[dict[str, tuple[str, ...]]] = {
    "cr3_targets_active": CR3_TARGETS_ACTIVE,
    "guest_kind": GUEST_KINDS,
}
#: Pages of the domain's p2m, which Xen takes from the shadow pool
#: (shadow_alloc_p2m_page; shadow_set_allocation: ``pages -= p2m_pages``).
#: Not in the trace; an estimate for the guests qmp_tools/xen.py runs (PVH,
#: RAM populated with 2 MiB pages, which p2m-pt maps in L2 entries for a
#: shadow domain): L4, L3, the L2 of the RAM's GiB, an L1 for the low 2 MiB,
#: an L2 and an L1 for the special pages below 4 GiB, and the page
#: shadow_enable takes for the 1-to-1 table of a guest with paging off.
P2M_PAGES: Final = 7
#: sh_make_monitor_table: one monitor table (an L4) per vCPU, from the pool.
MONITOR_PAGES_PER_VCPU: Final = 1


def sh_min_allocation(vcpus: int, ram_mib: int) -> int:
    """Xen's floor (common.c sh_min_allocation for an HVM/PVH domain):
    shadow_min_acceptable_pages (128 per vCPU), plus one page per MiB of
    RAM (at least 6), plus one; the p2m term is the larger of that and the
    p2m's pages, which are far fewer here."""
    return 128 * vcpus + max(ram_mib, 6) + 1


def default_pool_pages(vcpus: int, ram_mib: int) -> int:
    """The pool pages left for shadows and out-of-sync snapshots in the
    domains we run (memory = maxmem, no shadow_memory): libxl's
    libxl__get_required_paging_memory, 4 * (256 * vCPUs + 2 * RAM_MiB) KiB
    (libxl_create.c; set with xc_set_paging_mempool_size, libxl_dom.c),
    raised to Xen's floor and less the p2m pages (common.c
    shadow_set_allocation), less one monitor table per vCPU."""
    libxl = (4 * (256 * vcpus + 2 * ram_mib)) // 4
    pages = max(libxl, sh_min_allocation(vcpus, ram_mib)) - P2M_PAGES
    return pages - MONITOR_PAGES_PER_VCPU * vcpus


@dataclass
class EngineConfig:
    """Everything the engine's behaviour depends on besides the trace."""

    writable_heuristic: bool = True
    early_unshadow: bool = True
    fast_fault_path: bool = True
    prefetch: bool = True
    linux_l3_toplevel: bool = True
    skip_verify: bool = True
    virtual_tlb: bool = True
    fast_emulation: bool = True
    out_of_sync: bool = True
    vcpus: int = 1
    ram_mib: int = 512
    #: Pool size in pages; None means libxl's default for vcpus and ram_mib.
    pool_pages: int | None = None
    prefetch_distance: int = PREFETCH_DISTANCE
    #: CR3 values (PCID bits ignored) whose writes are not intercepted.
    cr3_targets: list[int] = field(default_factory=list)
    #: One of :data:`CR3_TARGETS_ACTIVE`.
    cr3_targets_active: str = "always"
    #: One of :data:`GUEST_KINDS`: what Xen really runs here is "xen-aware".
    guest_kind: str = "xen-aware"
    #: Keep the structured fact log (turn off for speed when unused).
    record_facts: bool = True

    # -- derived ---------------------------------------------------------
    @property
    def pool(self) -> int:
        if self.pool_pages is not None:
            return self.pool_pages
        return default_pool_pages(self.vcpus, self.ram_mib)

    @property
    def opt_flags(self) -> int:
        """The SHOPT_* bit mask this config amounts to."""
        return sum(bit for name, bit in SHOPT_BITS.items() if getattr(self, name))

    @property
    def ram_frames(self) -> int:
        return self.ram_mib << 8

    def target_roots(self) -> frozenset[int]:
        """Root frame numbers of the CR3-target list."""
        return frozenset((v & 0x000F_FFFF_FFFF_F000) >> 12 for v in self.cr3_targets)

    def validate(self) -> None:
        """Raise UsageError for values that make no sense (the hardware
        limit on CR3 targets is *not* an error here: the engine reports it)."""
        if self.vcpus < 1:
            raise UsageError(f"vcpus must be at least 1, not {self.vcpus}")
        if self.ram_mib < 1:
            raise UsageError(f"ram_mib must be at least 1, not {self.ram_mib}")
        if self.pool_pages is not None and self.pool_pages < 1:
            raise UsageError(f"pool_pages must be positive, not {self.pool_pages}")
        for name, allowed in CHOICES.items():
            value = getattr(self, name)
            if value not in allowed:
                raise UsageError(f"{name} must be one of {', '.join(allowed)}, not {value!r}")
        if not 1 <= self.prefetch_distance <= 512:
            raise UsageError(f"prefetch_distance must be 1..512, not {self.prefetch_distance}")

    # -- construction ----------------------------------------------------
    @classmethod
    def from_opt_flags(cls, flags: int, **kw: Any) -> EngineConfig:
        """A config from a SHOPT_* mask (e.g. 0x1ff) plus other fields."""
        knobs = {name: bool(flags & bit) for name, bit in SHOPT_BITS.items()}
        return cls.from_dict({**knobs, **kw})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EngineConfig:
        """Build from a mapping; unknown keys and bad types are UsageErrors.

        Numbers may be given as ints or strings ("0x..."); an
        ``opt_flags`` key sets every knob from a mask first.
        """
        data = dict(data)
        known = {f.name: f for f in fields(cls)}
        kw: dict[str, Any] = {}
        if "opt_flags" in data:
            flags = _int(data.pop("opt_flags"), "opt_flags")
            kw.update({name: bool(flags & bit) for name, bit in SHOPT_BITS.items()})
        for key, value in data.items():
            name = key.lower().removeprefix("shopt_")
            if name not in known:
                raise UsageError(f"unknown engine option {key!r}")
            if name in SHOPT_BITS or name == "record_facts":
                if not isinstance(value, bool):
                    raise UsageError(f"option {key!r} must be true or false")
                kw[name] = value
            elif name == "cr3_targets":
                if not isinstance(value, list):
                    raise UsageError("cr3_targets must be a list")
                kw[name] = [_int(v, "cr3_targets") for v in value]
            elif name in CHOICES:
                if not isinstance(value, str):
                    raise UsageError(f"option {name!r} must be a string")
                kw[name] = value
            elif name == "pool_pages" and value is None:
                kw[name] = None
            else:
                kw[name] = _int(value, key)
        cfg = cls(**kw)
        cfg.validate()
        return cfg

    @classmethod
    def load(cls, path: str | Path) -> EngineConfig:
        """Read a ``.toml`` or ``.json`` file."""
        return cls.from_dict(read_options(path))

    @classmethod
    def for_trace(
        cls, header: dict[str, Any], path: str | Path | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> EngineConfig:
        """The trace header's vCPUs and RAM, with a config file's options over
        them and ``overrides`` (the same keys, as :meth:`from_dict` takes them)
        over those."""
        base: dict[str, Any] = {
            "vcpus": max(1, int(header.get("vcpus") or 1)),
            "ram_mib": max(1, int(header.get("ram_bytes") or (512 << 20)) >> 20),
        }
        if path is not None:
            base.update(read_options(path))
        if overrides:
            base.update(overrides)
        return cls.from_dict(base)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def engine_config(
    path: Path | None, header: dict[str, Any], overrides: dict[str, Any] | None = None
) -> EngineConfig:
    """The engine config of a replay (``shadowtrace replay``, ``check``, ``plot``,
    ``sweep``): the config file's options over the trace header's vCPUs and
    RAM, and ``overrides`` (one configuration of a sweep) over both."""
    cfg = EngineConfig.for_trace(header, path, overrides)
    # the fact log would grow with the trace: consumers take facts as they come
    cfg.record_facts = False
    return cfg


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool):
        raise UsageError(f"option {key!r} must be a number")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            pass
    raise UsageError(f"option {key!r} must be a number, not {value!r}")


def read_options(path: str | Path) -> dict[str, Any]:
    """The options of a ``.toml`` or ``.json`` config file; UsageError if unreadable."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as err:
        raise UsageError(f"{p}: cannot read: {err.strerror}") from err
    try:
        data = tomllib.loads(text) if p.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as err:
        raise UsageError(f"{p}: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{p}: not a table of options")
    return data
