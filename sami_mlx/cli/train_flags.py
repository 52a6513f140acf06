"""`sami-mlx train`'s flags: one per TrainConfig field, over a YAML config file (-c), as in mlx-lm."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from sami_mlx.config import FIELDS, OFF, TrainConfig, field_kind
from sami_mlx.config_file import config_from_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, defaults suppressed so that only given flags override."""
    parser.add_argument("-c", "--config", help="YAML config file; flags override its settings.")
    parser.add_argument("--dry-run", action="store_true", help="Print the resolved configuration and exit.")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        base, optional = field_kind(f)
        default = f.default_factory() if callable(f.default_factory) else f.default
        help_text = f.metadata["help"] + (f" (default: {default})" if default not in ("", None, []) else "")
        if base == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_text)
        elif base == "list[str]":
            parser.add_argument(flag, nargs="*", default=argparse.SUPPRESS, help=help_text)
        else:
            convert: type = {"int": int, "float": float}.get(base, str)
            kind = _or_off(convert) if optional and base in ("int", "float") else convert
            parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, help=help_text)


def _or_off(kind: type) -> Callable[[str], Any]:
    """A number, or 'off' for None (a guard turned off)."""

    def parse(text: str) -> Any:
        return None if text.lower() in OFF else kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error message
    return parse


def build_config(args: argparse.Namespace) -> TrainConfig:
    """Dataclass defaults, then the YAML file, then the flags that were given."""
    values: dict[str, Any] = {}
    if getattr(args, "config", None):
        values.update(config_from_file(args.config))
    values.update({k: v for k, v in vars(args).items() if k in FIELDS})
    return TrainConfig(**values).resolved()
