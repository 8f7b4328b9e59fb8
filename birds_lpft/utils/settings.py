"""Checked settings: one error type naming the setting, range checks, and ``field=value`` overrides.

Config dataclasses check their fields in ``__post_init__``, so a bad value fails where it is set, before any work.
Command lines change a config only through :func:`overridden`, which checks each value against the field's type
(``lr_tail=6e-4``, ``crop_scale=(0.2, 1.0)``, ``pooling=gem``, ``probe.Cs=(0.01,)`` for a nested config).
"""

from __future__ import annotations

import ast
import dataclasses
import math
import os
import types
import typing
from collections.abc import Iterable


class ConfigError(ValueError):
    """A setting outside its allowed values or of the wrong type; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise ConfigError(field, message)


def check_choice(field: str, value, choices: Iterable) -> None:
    choices = tuple(choices)
    require(value in choices, field, f"must be one of {', '.join(map(repr, choices))}; got {value!r}")


def check_int(field: str, value, low: int, high: int | None = None) -> None:
    """An int (not a bool) in ``low..high``."""
    bounds = f"{low}..{high}" if high is not None else f">= {low}"
    ok = type(value) is int and value >= low and (high is None or value <= high)
    require(ok, field, f"must be an integer {bounds}; got {value!r}")


def check_number(field: str, value, low: float, high: float, *, low_open: bool = False,
                 high_open: bool = False) -> None:
    """A finite number in the interval from ``low`` to ``high`` (each end closed unless said open)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = number and (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    require(ok, field, f"must be a number in {interval}; got {value!r}")


def plain(value):
    """``value`` as JSON holds it: tuples as lists, paths as strings, recursively (dicts keep their keys)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return str(value) if isinstance(value, os.PathLike) else value


def parse_value(text: str):
    """A Python literal (numbers, tuples, None, True), else the text itself (``pooling=gem``)."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def split_overrides(items: Iterable[str]) -> dict[str, object]:
    """``["lr_tail=6e-4", "probe.Cs=(0.01,)"]`` -> {"lr_tail": 6e-4, "probe.Cs": (0.01,)}."""
    changes = {}
    for item in items:
        key, sep, text = item.partition("=")
        require(bool(sep) and key.strip().replace(".", "_").isidentifier(), item, "expected field=value")
        changes[key.strip()] = parse_value(text.strip())
    return changes


def is_override(token: str) -> bool:
    """Whether a command-line token is ``field=value`` (a path such as ``./a=b`` is not)."""
    key, sep, _ = token.partition("=")
    return bool(sep) and key.replace(".", "_").isidentifier()


def overridden(cfg, changes: dict[str, object]):
    """A copy of dataclass ``cfg`` with ``changes`` applied, each checked against its field's type (ints are
    accepted for floats, lists for tuples); dotted keys reach nested dataclass fields."""
    hints = typing.get_type_hints(type(cfg))
    direct = {}
    nested: dict[str, dict[str, object]] = {}
    for key, value in changes.items():
        head, dot, rest = key.partition(".")
        require(head in hints, key, f"unknown setting; {type(cfg).__name__} has {', '.join(sorted(hints))}")
        if dot:
            require(dataclasses.is_dataclass(hints[head]), key, f"{head} has no fields")
            nested.setdefault(head, {})[rest] = value
        else:
            direct[key] = coerce(value, hints[key], key)
    direct.update({head: overridden(getattr(cfg, head), sub) for head, sub in nested.items()})
    return dataclasses.replace(cfg, **direct)


def coerce(value, hint, field: str):
    """``value`` as type ``hint`` (int -> float, list -> tuple), or a ConfigError naming ``field``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(value) in args:  # an exact match first: 8 stays an int in ``float | int``
            return value
        for option in args:
            try:
                return coerce(value, option, field)
            except ConfigError:
                pass
    elif origin is tuple and isinstance(value, (tuple, list)):
        kinds = [args[0]] * len(value) if args[-1] is Ellipsis else list(args)
        if len(kinds) == len(value):
            return tuple(coerce(v, k, field) for v, k in zip(value, kinds, strict=True))
    elif _is_instance(value, hint):
        return float(value) if hint is float else value
    raise ConfigError(field, f"must be {_type_name(hint)}; got {value!r}")


def _is_instance(value, hint) -> bool:
    if hint is type(None):
        return value is None
    if hint in (int, float) and isinstance(value, bool):
        return False
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(hint, type) and isinstance(value, hint)


def _type_name(hint) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
