"""The Run screen's settings form: the TrainConfig fields it shows and how it reads them."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

from rich.text import Text

from sami_mlx.config import FIELDS, TrainConfig
from sami_mlx.errors import SamiError


@dataclass(frozen=True)
class Setting:
    """One field of the settings form: the TrainConfig field it sets and how to read it."""

    field: str
    label: str
    kind: type = str
    placeholder: str = ""

    @property
    def input_type(self) -> Literal["integer", "number", "text"]:
        """The Input's `type`, which restricts what can be typed."""
        return "integer" if self.kind is int else "number" if self.kind is float else "text"


SETTINGS = [
    Setting("model", "Model", str, "hub id or model directory"),
    Setting("constitution", "Constitution", str, "constitution file (.yaml/.json)"),
    Setting("queries", "Queries", str, "dialogue, summarization or a file"),
    Setting("iterations", "Iterations", int),
    Setting("steps", "Steps (first iteration)", int),
    Setting("queries_per_step", "Queries per step", int),
    Setting("variants", "Variants", str, "auto, paper, grid or a number"),
    Setting("temperature", "Temperature", float),
    Setting("learning_rate", "Learning rate", float),
    Setting("lora_rank", "LoRA rank", int),
    Setting("max_tokens", "Max tokens", int),
    Setting("out", "Run directory", str, "blank: a new one in the runs folder"),
]
DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def setting_text(value: object) -> str:
    return "" if value is None else str(value)


def hidden_settings(config: Mapping[str, Any], keep_out: bool) -> dict[str, Any]:
    """The TrainConfig fields of a config file or past run, which ride along with the form."""
    return {k: v for k, v in config.items() if k in FIELDS and (keep_out or k != "out")}


def form_values(base: Mapping[str, Any], typed: Mapping[str, str]) -> dict[str, Any]:
    """The form's fields (as typed, by field name) over `base`, without a run directory unless one
    was typed; raises SamiError naming the field to fix."""
    values = dict(base)
    values.pop("out", None)
    for s in SETTINGS:
        raw = typed[s.field].strip()
        if s.kind is str:
            if raw:
                values[s.field] = raw
            continue
        try:
            values[s.field] = s.kind(raw)
        except ValueError:
            kind = "a whole number" if s.kind is int else "a number"
            raise SamiError(f"{s.label}: {raw!r} is not {kind}") from None
    return values


def plan_text(cfg: TrainConfig) -> Text:
    """What a run with these settings will do, under the form."""
    steps = sum(cfg.steps_in_iteration(t) for t in range(cfg.iterations))
    return Text(
        f"{plural(cfg.iterations, 'iteration')}, {plural(steps, 'optimizer step')}, "
        f"{plural(cfg.queries_per_step, 'query group')} per step",
        style="dim",
    )
