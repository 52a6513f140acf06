"""The Run screen's settings form: which TrainConfig fields it shows, how it writes and reads them,
and the YAML file it saves (the same names `sami-mlx train -c FILE` reads)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import MISSING, dataclass
from typing import Any, Literal

from rich.text import Text

from sami_mlx.config import FIELDS, OFF, TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.fileio import dump_yaml

# Settings with a fixed set of values (TrainConfig.resolved checks them): a Select, not an Input.
CHOICES = {
    "schedule": ("paper", "continue"),
    "optimizer": ("adamw", "rmsprop"),
    "scoring": ("shared", "naive"),
    "keep": ("best", "last"),
    "sentence_end": ("off", "positive", "all"),
    "chat_template": ("auto", "on", "off"),  # a switch left to auto (None) until the model is known
}
SWITCH = {"auto": None, "on": True, "off": False}  # a three-way switch's choices and values


@dataclass(frozen=True)
class Setting:
    """One field of the settings form: the TrainConfig field it sets, its label and placeholder."""

    field: str
    label: str = ""
    placeholder: str = ""

    @property
    def kind(self) -> str:
        """The field's base type: 'str', 'int', 'float', 'bool' or 'list[str]'."""
        return str(FIELDS[self.field].type).split("|")[0].strip()

    @property
    def optional(self) -> bool:
        """None is allowed (shown as a blank field, or 'off' for a number)."""
        return "None" in str(FIELDS[self.field].type)

    @property
    def help(self) -> str:
        return str(FIELDS[self.field].metadata["help"])

    @property
    def default(self) -> Any:
        f = FIELDS[self.field]
        return f.default_factory() if f.default is MISSING else f.default  # type: ignore[operator]

    @property
    def choices(self) -> tuple[str, ...] | None:
        return CHOICES.get(self.field)

    @property
    def switch(self) -> bool:
        """A bool that may be left to auto (None): a choice of auto, on and off, not a checkbox."""
        return self.kind == "bool" and self.optional

    @property
    def input_type(self) -> Literal["integer", "number", "text"]:
        """The Input's `type`, which restricts what can be typed ('off' needs text)."""
        if self.optional or self.kind not in ("int", "float"):
            return "text"
        return "integer" if self.kind == "int" else "number"


# The settings every run needs, always on screen; the rest of TrainConfig under "more settings".
MAIN = [
    Setting("model", "Model", "hub id or model directory"),
    Setting("constitution", "Constitution", "constitution file (.yaml/.json)"),
    Setting("queries", "Queries", "dialogue, summarization or a file"),
    Setting("template", "Template", "blank: auto"),
    Setting("generation_template", "↳ generation", "blank: the template"),
    Setting("training_template", "↳ training", "blank: the template"),
    Setting("variants", "Variants", "auto, paper, grid or a number"),
    Setting("schedule", "Schedule"),
    Setting("iterations", "Iterations"),
    Setting("steps", "Steps (1st iter.)"),
    Setting("queries_per_step", "Queries per step"),
    Setting("kl_beta", "KL β"),
    Setting("anchor_beta", "Anchor β"),
    Setting("stop", "Stop strings", 'comma-separated, or ["a", "b"]'),
    Setting("temperature", "Temperature"),
    Setting("max_tokens", "Max tokens"),
    Setting("learning_rate", "Learning rate"),
    Setting("lora_rank", "LoRA rank"),
    Setting("out", "Run directory", "blank: a new one in the runs folder"),
]
_shown = {s.field for s in MAIN}
MORE = [Setting(name, name.replace("_", " "), "blank: none" if FIELDS[name].default is None else "") for name in FIELDS]
MORE = [s for s in MORE if s.field not in _shown]
SETTINGS = MAIN + MORE
BY_FIELD = {s.field: s for s in SETTINGS}
DEFAULTS = {s.field: s.default for s in SETTINGS}


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def setting_text(s: Setting, value: object) -> str:
    """A value as its Input shows it: lists as JSON, a guard turned off as 'off', None as blank."""
    if s.switch:
        return next(k for k, v in SWITCH.items() if v is value)
    if value is None:
        return "off" if s.optional and s.kind in ("int", "float") else ""
    if s.kind == "list[str]":
        return json.dumps(list(value), ensure_ascii=False) if value else ""  # type: ignore[call-overload]
    return str(value)


def parse_setting(s: Setting, raw: str | bool) -> Any:
    """A field's value from its widget (text, a choice or a checkbox); raises SamiError naming the field."""
    if s.switch and isinstance(raw, str):
        return SWITCH[raw]
    if s.kind == "bool" or isinstance(raw, bool):
        return bool(raw)
    text = raw.strip()
    if s.kind == "list[str]":
        if not text:
            return None if s.optional else []
        if text.startswith("["):
            try:
                items = json.loads(text)
            except json.JSONDecodeError:
                items = None
            if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
                raise SamiError(f'{s.label}: {text} is not a list of strings; write a, b or ["a", "b"]')
            return items
        return [part.strip() for part in text.split(",") if part.strip()]
    if s.kind in ("int", "float"):
        if s.optional and (not text or text.lower() in OFF):
            return None
        try:
            return int(text) if s.kind == "int" else float(text)
        except ValueError:
            kind = "a whole number" if s.kind == "int" else "a number"
            raise SamiError(f"{s.label}: {text!r} is not {kind}" + (" (or off)" if s.optional else "")) from None
    if not text:
        return None if s.optional else s.default
    return raw if s.field == "response_prefix" else text  # a prefix's leading space counts


def form_values(typed: Mapping[str, str | bool]) -> dict[str, Any]:
    """Every TrainConfig field from the form's widgets (by field name), without a run directory unless
    one was typed; raises SamiError naming the field to fix."""
    values = {s.field: parse_setting(s, typed[s.field]) for s in SETTINGS if s.field in typed}
    if not values.get("out"):
        values.pop("out", None)
    return values


def config_yaml(values: Mapping[str, Any]) -> str:
    """The settings as a YAML config with TrainConfig's names, in its order (`sami-mlx train -c FILE`)."""
    data = {name: values[name] for name in FIELDS if name in values}
    head = "# sami-mlx training settings: sami-mlx train -c THIS_FILE (flags override them)\n"
    return head + dump_yaml(data)


def check_choices(values: Mapping[str, Any], where: str) -> None:
    """Values a Select cannot show are refused with the choices."""
    for name, choices in CHOICES.items():
        if name in values and BY_FIELD[name].switch:
            continue  # any bool or None fits a switch
        if name in values and values[name] not in choices:
            raise SamiError(f"{where}: setting '{name}' is {values[name]!r}; use one of {', '.join(choices)}")


def plan_text(cfg: TrainConfig) -> Text:
    """What a run with these settings will do, under the form."""
    steps = sum(cfg.steps_in_iteration(t) for t in range(cfg.iterations))
    return Text(
        f"{plural(cfg.iterations, 'iteration')}, {plural(steps, 'optimizer step')}, "
        f"{plural(cfg.queries_per_step, 'query group')} per step",
        style="dim",
    )
