"""The configurations of a sweep: ``--set KEY=V1,V2`` options, typed by the engine config.

A key is any field of :class:`~replay.shadow.config.EngineConfig` (but
``record_facts``, which changes what the engine logs, not what it does). A
value is read by the field's type:

==================  ==========================================================
bool                ``true`` / ``false``
int                 a number (``64``, ``0x40``)
int or None         a number, or ``default`` (``pool_pages``: libxl's size)
a name of a set     one of :data:`~replay.shadow.config.CHOICES` (e.g.
                    ``cr3_targets_active=always,secure``)
list of numbers     numbers joined by ``+``, or ``none`` for the empty list
                    (``cr3_targets=none,0x6064000+0x6066000``)
==================  ==========================================================

Every value is then checked by ``EngineConfig.from_dict`` (the same rules
as a config file). Every combination of the values of all ``--set`` options
is one configuration (the first option's key varies slowest). Any mistake
is an :class:`~replay.errors.ArgumentError` naming the key and what it takes.
"""

from __future__ import annotations

import itertools
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

from ..errors import ArgumentError, UsageError
from ..shadow.config import CHOICES, EngineConfig

#: Fields of EngineConfig a sweep cannot vary (instrumentation, not behaviour).
NOT_SWEPT = frozenset({"record_facts"})
#: Keys a ``--set`` can name, in EngineConfig's order.
SWEEP_KEYS: tuple[str, ...] = tuple(f.name for f in fields(EngineConfig)
                                    if f.name not in NOT_SWEPT)
_TYPES = typing.get_type_hints(EngineConfig)


@dataclass(frozen=True)
class Axis:
    """One ``--set``: a key and its values (typed, in the order given)."""

    key: str
    values: tuple[Any, ...]


@dataclass(frozen=True)
class Grid:
    """The axes of a sweep; its configurations are their product."""

    axes: tuple[Axis, ...]

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.axes]

    def combinations(self) -> list[dict[str, Any]]:
        """Every configuration as {key: value}, the first axis varying slowest."""
        return [dict(zip(self.keys, values, strict=True))
                for values in itertools.product(*(a.values for a in self.axes))]

    def __len__(self) -> int:
        n = 1
        for a in self.axes:
            n *= len(a.values)
        return n


def parse_grid(sets: Sequence[str]) -> Grid:
    """The grid of ``--set`` options (at least one; each key once)."""
    if not sets:
        raise ArgumentError("sweep: give at least one --set KEY=V1,V2")
    axes: list[Axis] = []
    for text in sets:
        axis = parse_set(text)
        if axis.key in (a.key for a in axes):
            raise ArgumentError(f"--set {text!r}: key {axis.key!r} is already set by an "
                                "earlier --set (give all its values in one)")
        axes.append(axis)
    return Grid(tuple(axes))


def parse_set(text: str) -> Axis:
    """``KEY=V1,V2,...`` as an :class:`Axis` (values typed and checked)."""
    key, eq, rest = text.partition("=")
    key = key.strip().lower().removeprefix("shopt_")
    if not eq or not key:
        raise ArgumentError(f"--set {text!r}: expected KEY=V1,V2,... (e.g. out_of_sync=true,false)")
    if key not in SWEEP_KEYS:
        raise ArgumentError(f"--set {text!r}: unknown engine option {key!r}; "
                            f"one of: {', '.join(SWEEP_KEYS)}")
    values: list[Any] = []
    for item in rest.split(","):
        item = item.strip()
        if not item:
            raise ArgumentError(f"--set {text!r}: an empty value; {key} takes {takes(key)}")
        value = parse_value(key, item)
        if value in values:
            raise ArgumentError(f"--set {text!r}: value {item!r} given twice")
        values.append(value)
    return Axis(key, tuple(values))


def takes(key: str) -> str:
    """What a key's values are, in words (for error messages and docs)."""
    kind = _TYPES[key]
    if key in CHOICES:
        return "one of " + ", ".join(CHOICES[key])
    if kind is bool:
        return "true or false"
    if kind is int:
        return "a number"
    if _is_optional_int(kind):
        return "a number or 'default'"
    if typing.get_origin(kind) is list:
        return "numbers joined by '+', or 'none'"
    return "a string"


def parse_value(key: str, text: str) -> Any:
    """One value of ``key`` from its text, checked as a config file's value would be."""
    kind = _TYPES[key]
    value: Any
    try:
        if kind is bool:
            value = {"true": True, "false": False}[text.lower()]
        elif kind is int:
            value = int(text, 0)
        elif _is_optional_int(kind):
            value = None if text.lower() == "default" else int(text, 0)
        elif typing.get_origin(kind) is list:
            value = [] if text.lower() == "none" else [int(v, 0) for v in text.split("+")]
        else:
            value = text
    except (KeyError, ValueError):
        raise ArgumentError(f"--set {key}={text}: {key} takes {takes(key)}, "
                            f"not {text!r}") from None
    try:
        EngineConfig.from_dict({key: value})
    except UsageError as err:
        raise ArgumentError(f"--set {key}={text}: {err}") from None
    return value


def value_text(value: Any) -> str:
    """A value as ``--set`` writes it (the inverse of :func:`parse_value`)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "default"
    if isinstance(value, list):
        return "+".join(f"{v:#x}" for v in value) or "none"
    return str(value)


def describe(combo: dict[str, Any]) -> str:
    """``out_of_sync=false virtual_tlb=true``: one configuration in a line."""
    return " ".join(f"{k}={value_text(v)}" for k, v in combo.items())


def column_value(value: Any) -> Any:
    """A value as its table column holds it (lists as their ``--set`` text)."""
    return value_text(value) if isinstance(value, list) else value


def _is_optional_int(kind: Any) -> bool:
    return isinstance(kind, types.UnionType) and set(typing.get_args(kind)) == {int, type(None)}
