"""A config file: a YAML mapping whose keys are TrainConfig fields, or a recipe shipped with the package
by name (sami_mlx/data/recipes), read into TrainConfig values; the relative paths in it resolved; and
RUN/config.yaml, the configuration a run ran with, read back."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from sami_mlx.config import FIELDS, OFF, TrainConfig, field_kind
from sami_mlx.data import data_dir
from sami_mlx.errors import SamiError
from sami_mlx.fileio import read_structured
from sami_mlx.instruct import prompts_resolved, resolve_prompts

RECIPE_PACKAGE = "sami_mlx.data.recipes"
AUTO_SETTINGS = ("chat_template", "template")  # None ('auto'): chosen once the model is known


def load_run_config(run_dir: str | Path, flag: str = "--run") -> TrainConfig:
    """The configuration a run ran with, from RUN/config.yaml; a one-line SamiError naming the file and
    the fix when it is missing or damaged. `flag` names where the run directory came from ('' for none)."""
    run = Path(run_dir).expanduser()
    path = run / "config.yaml"
    if not path.is_file():
        fix = "pass" if flag else "choose"
        raise SamiError(
            f"{flag + ' ' if flag else ''}{run}: no config.yaml there; {fix} a run directory made by `sami-mlx train`"
        )
    cfg = TrainConfig(**config_from_file(str(path)))
    if not cfg.model:
        raise SamiError(f"{path}: no 'model' setting; this file is damaged, restore it or start a new run")
    # A run records the prompt settings it chose; a config written by hand may leave them to auto.
    return cfg if prompts_resolved(cfg) else resolve_prompts(cfg)


# Settings that may name a file (or, for `model`, a directory) relative to the config that sets them.
PATH_SETTINGS = "model constitution queries template generation_template training_template anchor_template".split()
PATH_SETTINGS += ["judge_template", "heldout"]


def resolve_paths(values: dict, folder: Path, data_dir: Path | None = None) -> dict:
    """`values` with each relative path in PATH_SETTINGS made absolute where it exists next to the config
    (`folder`), else in the package's data folder (`data_dir`); any other value (a built-in name, a hub
    id or dataset, a path from the working directory) is left as written. A run's config.yaml keeps the
    absolute paths, so the run resumes from any directory."""
    out = dict(values)
    for key in PATH_SETTINGS:
        value = out.get(key)
        if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
            continue
        for base in (folder, data_dir):
            candidate = base / value if base is not None else None
            if candidate is not None and (candidate.is_dir() if key == "model" else candidate.is_file()):
                out[key] = str(candidate.absolute())
                break
    return out


def config_from_file(path: str) -> dict:
    """Read a YAML config whose keys are TrainConfig fields (dashes or underscores), or a recipe
    shipped with the package by name (sami_mlx/data/recipes; see find_recipe). Relative paths in it
    are found next to the file first, then in the package's data folder."""
    recipe = find_recipe(path)
    data = recipe if recipe is not None else read_structured(path, "config file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SamiError(f"{path}: expected a mapping of settings, got {type(data).__name__}")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            raise SamiError(f"{path}: unknown setting '{key}'; see `sami-mlx train --help` for the names")
        out[name] = _coerce(name, value, f"{path}: setting '{key}'")
    folder = recipe_dir() if recipe is not None else Path(path).expanduser().absolute().parent
    return resolve_paths(out, folder, recipe_dir().parent)


def _coerce(name: str, value: Any, where: str) -> Any:
    base, optional = field_kind(FIELDS[name])
    if name in AUTO_SETTINGS and str(value).lower() == "auto":
        return None  # chosen for the model (sami_mlx.instruct)
    if optional and base in ("int", "float") and (value is False or str(value).lower() in OFF):
        return None  # `max_ppl_ratio: off` (YAML reads a bare off as false)
    if value is None:
        if optional:
            return None
        raise SamiError(f"{where} cannot be empty")
    if base == "list[str]":
        if isinstance(value, str):
            return [value]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return value
        raise SamiError(f"{where} must be a list of strings")
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise SamiError(f"{where} must be true or false, got {value!r}")
    if name == "dequantize" and isinstance(value, bool):
        return "yes" if value else "no"  # YAML 1.1 reads a bare yes/no as a boolean
    if base == "str":
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
        raise SamiError(f"{where} must be a string, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SamiError(f"{where} must be a number, got {value!r}")
    if base == "int":
        if isinstance(value, float) and not value.is_integer():
            raise SamiError(f"{where} must be a whole number, got {value!r}")
        return int(value)
    return float(value)


# ---- recipes ---------------------------------------------------------------------------------


def recipe_dir() -> Path:
    """Where the shipped recipe YAML files are."""
    return data_dir(RECIPE_PACKAGE, "data/recipes")


def recipe_names() -> list[str]:
    """The shipped recipes, runnable as `sami-mlx train -c NAME`."""
    return sorted(p.stem for p in recipe_dir().glob("*.yaml"))


def find_recipe(name: str) -> dict | None:
    """The settings of shipped recipe `name`, with its data files resolved; None if `name` is a file.

    Paths in a shipped recipe are relative to the package's data folder (sami_mlx/data), so a
    recipe runs from any working directory (and so does a copy of it: see resolve_paths).
    """
    if Path(name).expanduser().exists():
        return None
    stem = name[: -len(".yaml")] if name.endswith(".yaml") else name
    if stem not in recipe_names():
        if "/" not in name and os.sep not in name and not Path(name).suffix:
            raise SamiError(
                f"-c {name}: config file not found, and no shipped recipe has that name; "
                f"recipes: {', '.join(recipe_names())}"
            )
        return None
    path = recipe_dir() / f"{stem}.yaml"
    data = read_structured(path, "recipe")
    if not isinstance(data, dict):
        raise SamiError(f"{path}: a recipe must be a mapping of settings")
    return resolve_paths(data, recipe_dir(), recipe_dir().parent)
