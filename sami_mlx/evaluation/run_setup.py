"""What an evaluation works on: the run's settings as it trained, the evaluation's own settings, the
checkpoints to judge, and each model's answers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sami_mlx.checkpoints import Checkpoint, find_checkpoint, list_checkpoints
from sami_mlx.config import TrainConfig
from sami_mlx.config_file import load_run_config
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import Constitution, load_constitution
from sami_mlx.inputs.prompts import Template, load_template
from sami_mlx.inputs.queries import load_queries
from sami_mlx.loop.rollout import Generation


@dataclass
class EvalSettings:
    """How responses are generated and judged."""

    queries: list[str]
    max_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 32
    intrinsic: bool = True
    per_principle: bool = False
    queries_source: str = ""


@dataclass
class RunSetup:
    """What a run trained with, read from its config.yaml."""

    run_dir: Path
    config: TrainConfig
    constitution: Constitution
    generation_template: Template
    training_template: Template


@dataclass
class ModelOutputs:
    """One model's answers on the held-out queries: positive-variant responses and the MI metric."""

    checkpoint: str
    responses: list[Generation]
    intrinsic: dict | None = None


# ---- the run ---------------------------------------------------------------------------------


def load_run_setup(run_dir: str | Path, constitution: str | None = None) -> RunSetup:
    """The run's resolved config, constitution (or the one given) and templates; raises SamiError."""
    run = Path(run_dir).expanduser()
    path = run / "config.yaml"
    cfg = load_run_config(run)
    source = constitution or cfg.constitution
    if not constitution and not Path(source).expanduser().exists():
        raise SamiError(f"{path}: the run's constitution {source} is not found; pass --constitution FILE")
    try:
        # load_run_config resolves a template left to auto, so one of each pair is set
        generation = load_template(cfg.generation_template or cfg.template or "")
        training = load_template(cfg.training_template or cfg.template or "")
    except SamiError as e:
        raise SamiError(f"{path}: the run's template cannot be read ({e})") from None
    return RunSetup(run, cfg, load_constitution(source), generation, training)


def choose_checkpoints(run_dir: str | Path, iterations: Sequence[str] | None) -> list[Checkpoint]:
    """The checkpoints to judge: the latest by default, 'all', or iteration numbers / names."""
    available = list_checkpoints(run_dir)[1:]
    if not available:
        raise SamiError(f"--run {run_dir}: no finished iteration (iter-NN/adapters.safetensors) to evaluate")
    if not iterations:
        return [available[-1]]
    if any(str(i).lower() == "all" for i in iterations):
        return available
    chosen: list[Checkpoint] = []
    for it in iterations:
        ckpt = find_checkpoint(run_dir, str(it))
        if ckpt.adapter_path is None:
            raise SamiError(
                "--iterations base: the base model is what checkpoints are compared with; choose iteration numbers"
            )
        if ckpt not in chosen:
            chosen.append(ckpt)
    return chosen


def training_overlap(setup: RunSetup, queries: Sequence[str]) -> int:
    """How many held-out queries the run also trained on (0 when its queries cannot be read)."""
    try:
        trained = set(load_queries(setup.config.queries))
    except SamiError:
        return 0
    return sum(q in trained for q in queries)
