"""The stage-two command lines' one override syntax: ``--preset NAME`` plus ``field=value`` overrides of its
:class:`~finetune.config.FinetuneConfig`, shared by ``python -m finetune``, ``finetune.cv`` and ``tools.bench``.

Every field can be set (``lr_tail=6e-4``, ``crop_scale=(0.2, 1.0)``, ``probe.Cs=(0.01,)``), each value
checked against the field's type and range before any work; the most common ones are also flags
(``--epochs 2`` is ``epochs=2``). A CV candidate is the same thing in one word: ``PRESET:field=value,...``.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterable

from birds_lpft.utils.settings import is_override, overridden, parse_value, split_overrides

from finetune.config import PRESETS, FinetuneConfig, preset

# The common fields, also as flags: --epochs 2 is epochs=2.
ALIASES = ("backbone", "image_size", "views", "epochs", "split", "batch_size", "lr_head", "lr_tail", "seed")


def add_settings(parser: argparse.ArgumentParser, *, preset_flag: bool = True) -> None:
    """``--preset`` (default 'full') and the alias flags."""
    if preset_flag:
        parser.add_argument("--preset", default="full", choices=sorted(PRESETS),
                            help="the recipe to start from (default: full, the shipped one)")
    for name in ALIASES:
        parser.add_argument(f"--{name.replace('_', '-')}", dest=f"alias_{name}", default=None, metavar="VALUE",
                            help=f"the same as {name}=VALUE (full preset: {getattr(PRESETS['full'], name)})")


def split_positionals(tokens: Iterable[str]) -> tuple[list[str], list[str]]:
    """(plain arguments, ``field=value`` overrides) of the positional tokens, in order."""
    tokens = list(tokens)
    return [t for t in tokens if not is_override(t)], [t for t in tokens if is_override(t)]


def alias_changes(args: argparse.Namespace) -> dict[str, object]:
    return {name: parse_value(getattr(args, f"alias_{name}")) for name in ALIASES
            if getattr(args, f"alias_{name}", None) is not None}


def settings(name: str, overrides: Iterable[str] = (), args: argparse.Namespace | None = None) -> FinetuneConfig:
    """Preset ``name`` with the ``field=value`` overrides, then the alias flags of ``args``, applied.

    Raises:
        ConfigError: an unknown preset or field, or a value of the wrong type or out of range.
    """
    changes = split_overrides(overrides)
    if args is not None:
        changes.update(alias_changes(args))
    base = preset(name)
    if changes.get("backbone", base.backbone) != base.backbone and "split" not in changes:
        changes["split"] = None  # a preset's split counts its own backbone's blocks: take the new one's default
    return overridden(base, changes)


def candidate(spec: str) -> FinetuneConfig:
    """``'PRESET[:field=value,...]'`` -> its config; commas inside values such as ``(0.2, 1.0)`` stay."""
    name, _, rest = spec.partition(":")
    return settings(name, [item for item in re.split(r",(?=\s*[\w.]+\s*=)", rest) if item.strip()])
