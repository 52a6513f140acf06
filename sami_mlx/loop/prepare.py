"""Before any model work: the user's files read and validated, the context and memory checked, the run
directory made (cheap mistakes fail fast)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from pathlib import Path

from sami_mlx.config import TrainConfig
from sami_mlx.errors import SamiError
from sami_mlx.inputs.constitution import Constitution, Principle, load_constitution, num_variants, variant_strategy
from sami_mlx.inputs.prompts import Template, encode_prompt, load_template
from sami_mlx.inputs.queries import load_queries
from sami_mlx.instruct import prompts_resolved, resolve_prompts
from sami_mlx.loop.heldout import load_heldout

HELDOUT_TEXTS = 32


@dataclass
class RunInputs:
    """The user's files, validated before any model is loaded (cheap mistakes fail fast)."""

    constitution: Constitution
    queries: list[str]
    generation_template: Template
    training_template: Template
    heldout: list[tuple[str, str]]
    num_variants: int
    anchor_template: Template | None = None  # prompts with no constitution, for --anchor-beta
    monitor_ids: list[int] = field(default_factory=list)  # queries held out for the degeneration monitor
    train_ids: list[int] = field(default_factory=list)  # the rest, in the order the splits take them


def prepare_inputs(cfg: TrainConfig) -> RunInputs:
    """Load and validate the constitution, queries, templates and held-out text (prompt settings left to
    auto are taken as the model's preset or name suggests; `with_templates` replaces them once it is loaded)."""
    constitution = load_constitution(cfg.constitution)
    n = num_variants(variant_strategy(cfg.variants), len(constitution.principles))
    queries = load_queries(cfg.queries)
    heldout = load_heldout(cfg.heldout) if cfg.heldout else []
    if cfg.heldout and not heldout:
        raise SamiError(f"{cfg.heldout}: no text found; give plain text paragraphs for the perplexity check")
    order = list(range(len(queries)))
    random.Random(f"splits-{cfg.seed}").shuffle(order)
    held = min(cfg.monitor_queries, len(queries) // 4)  # three in four queries at least stay for training
    generation, training, anchor = prompt_templates(cfg if prompts_resolved(cfg) else resolve_prompts(cfg))
    return RunInputs(
        constitution, queries, generation, training, heldout[:HELDOUT_TEXTS], n, anchor, order[:held], order[held:]
    )


def prompt_templates(cfg: TrainConfig) -> tuple[Template, Template, Template | None]:
    """The generation, training and anchor templates of `cfg` (its prompt settings resolved)."""
    training = load_template(cfg.training_template or cfg.template or "")
    anchor = None
    if cfg.anchor_beta > 0:  # filled with an empty constitution, so the training template serves too
        anchor = load_template(cfg.anchor_template, required=("{query}",)) if cfg.anchor_template else training
    generation = load_template(cfg.generation_template or cfg.template or "")
    return generation, training, anchor


def with_templates(inputs: RunInputs, cfg: TrainConfig) -> RunInputs:
    """`inputs` with the templates of `cfg`, once its prompt settings are resolved for the loaded model."""
    generation, training, anchor = prompt_templates(cfg)
    return replace(inputs, generation_template=generation, training_template=training, anchor_template=anchor)


def check_context(cfg: TrainConfig, inputs: RunInputs, tokenizer, context: int | None) -> int:
    """Refuse queries whose longest prompt plus --max-tokens cannot fit the model's context;
    returns the longest prompt's length in tokens."""
    c = inputs.constitution
    longest = Constitution(
        c.name, tuple(Principle(p.name, *(2 * [max(p.positive, p.negative, key=len)])) for p in c.principles)
    )
    text = longest.render(longest.positive_variant)
    biggest = 0
    templates = (inputs.generation_template, inputs.training_template, inputs.anchor_template)
    for template in {t for t in templates if t is not None}:
        for n, query in enumerate(inputs.queries, start=1):
            size = len(encode_prompt(tokenizer, template.fill(text, query), cfg.chat_template))
            biggest = max(biggest, size)
            if context and size + cfg.max_tokens > context:
                raise SamiError(
                    f"{cfg.queries}: query {n} makes a {size}-token prompt, which with --max-tokens "
                    f"{cfg.max_tokens} exceeds the model's {context}-token context; shorten it or lower --max-tokens"
                )
    return biggest


def model_memory_shape(model_config: dict, float_bytes: int | None = None):
    """The memory estimate's ModelShape of a loaded model (its float width as loaded: fp32 on the CPU
    backend after `upcast_for_cpu`); None for an architecture the estimate does not know."""
    from sami_mlx.memory import ModelShape

    try:
        shape = ModelShape.from_config(model_config)
    except Exception:  # an architecture the estimate does not know: no estimate, no refusal
        return None
    return shape.in_float_bytes(float_bytes) if float_bytes else shape


def choose_micro_batches(
    cfg: TrainConfig, inputs: RunInputs, model_config: dict, prompt_tokens: int, float_bytes: int | None = None
) -> TrainConfig:
    """`cfg` with --grad-accumulation auto resolved for this machine (sami_mlx.machine.auto_micro_batches):
    chosen once, before training, and written to the run's config.yaml so that a resume repeats it."""
    from sami_mlx.machine import machine_memory, resolve_micro_batches

    shape = model_memory_shape(model_config, float_bytes)
    return resolve_micro_batches(cfg, shape, inputs.num_variants, prompt_tokens, machine_memory())


def check_memory(
    cfg: TrainConfig, inputs: RunInputs, model_config: dict, prompt_tokens: int, float_bytes: int | None = None
) -> float | None:
    """Estimated peak memory in GiB; refuses a run that cannot fit this machine unless --force.

    `float_bytes`: the loaded model's float width (fp32 on the CPU backend after `upcast_for_cpu`).
    """
    from sami_mlx.machine import fit, machine_memory
    from sami_mlx.memory import GiB, RunShape, estimate_memory

    shape = model_memory_shape(model_config, float_bytes)
    if shape is None:
        return None
    est = estimate_memory(shape, RunShape.from_config(cfg, inputs.num_variants, prompt_tokens))
    machine = machine_memory()
    if fit(est.peak, machine) == "no" and not cfg.force:
        fix = (
            "even one query group per micro-batch does not fit; lower --max-tokens or --lora-layers, add "
            "--grad-checkpoint, choose a smaller model"
            if cfg.micro_batches >= cfg.queries_per_step
            else "lower --queries-per-step or --max-tokens, raise --grad-accumulation (or leave it auto)"
        )
        raise SamiError(
            f"--model {cfg.model}: this run needs about {est.peak / GiB:.1f} GiB ({est.summary()}) but this machine "
            f"has {machine.total / GiB:.1f} GiB; {fix}, or pass --force to try anyway"
        )
    return est.peak / GiB


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run directory, refusing one that already holds a run."""
    out = Path(cfg.out).expanduser()
    refuse_existing_run(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def refuse_existing_run(out: Path) -> None:
    """A one-line error if `out` is a file or already holds a run (nothing there gets overwritten)."""
    if out.exists() and not out.is_dir():
        raise SamiError(f"--out {out}: is a file; choose a directory for the run")
    if (out / "metrics.jsonl").exists() or (out / "state.json").exists():
        raise SamiError(f"--out {out}: already holds a run; choose a new --out directory")
