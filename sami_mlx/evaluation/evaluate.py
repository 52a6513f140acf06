"""Judging a run: win rates of its checkpoints against the base model, and the intrinsic MI metric.

For every held-out query, the base model and each chosen checkpoint answer under the
constitution's all-positive variant; a judge compares the two answers (A/B order randomised
with a seed) and says which better follows the principles. The intrinsic metric is the
training objective's MI lower bound, log N - sami_loss(S), on the same held-out queries: each
model answers under N variants and scores its own answers.

The pieces: run_setup (the run, the settings, the checkpoints), comparisons (judge prompts and
scored replies), win_rates (the statistics), report (result files and the summary table); the
judges are in judge and judge_backends, the verdict parser in verdicts.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from pathlib import Path

import mlx.core as mx

from sami_mlx import events as ev
from sami_mlx.checkpoints import Checkpoint, load_checkpoint_model
from sami_mlx.errors import SamiError
from sami_mlx.evaluation.comparisons import judge_tasks, outcome
from sami_mlx.evaluation.judge import Judge, JudgeTemplate
from sami_mlx.evaluation.report import HEADLINE_KEYS, checkpoint_result, markdown_table, unparsable_warning
from sami_mlx.evaluation.run_setup import EvalSettings, ModelOutputs, RunSetup, load_run_setup, training_overlap
from sami_mlx.fileio import atomic_write_json, atomic_write_text
from sami_mlx.inputs.constitution import (
    Variant,
    num_variants,
    principle_order,
    sample_variants,
    variant_strategy,
)
from sami_mlx.inputs.prompts import encode_with_prefix
from sami_mlx.loop.rollout import Generation, generate_batch
from sami_mlx.loop.scoring import ScoringBatch, score_micro_batches
from sami_mlx.objective import accuracies, mi_lower_bound, sami_loss

Emit = Callable[[ev.Event], None]


# ---- generation and the intrinsic metric -------------------------------------------------------


def variant_plan(setup: RunSetup, n_queries: int, seed: int, intrinsic: bool) -> list[list[Variant]]:
    """Per query, the variants the intrinsic metric samples (the run's --variants strategy); empty if off."""
    if not intrinsic:
        return [[] for _ in range(n_queries)]
    k = len(setup.constitution.principles)
    strategy = variant_strategy(setup.config.variants)
    num_variants(strategy, k)  # raises if the constitution cannot supply them
    rng = random.Random(f"eval-variants-{seed}")
    return [sample_variants(strategy, k, rng) for _ in range(n_queries)]


def generation_orders(setup: RunSetup, settings: EvalSettings, plan: list[list[Variant]]) -> list[dict]:
    """Per query, the principle order of each variant's generation prompt. The judged (all-positive)
    response is asked for under a shuffled order, as the reference's evaluation does, one draw per
    query shared by every model; the MI metric's other variants share it under the run's
    --shuffle-generation (as in training) and keep file order otherwise."""
    cfg, k = setup.config, len(setup.constitution.principles)
    rng = random.Random(f"eval-generation-order-{settings.seed}")
    positive = setup.constitution.positive_variant
    orders = []
    for variants in plan:
        judged = principle_order(k, rng, cfg.shuffle_principles)
        others = judged if cfg.shuffle_generation else list(range(k))
        orders.append({v: judged if v == positive else others for v in [positive, *variants]})
    return orders


def generate_outputs(
    model, tokenizer, setup: RunSetup, settings: EvalSettings, plan: list[list[Variant]], name: str, emit: Emit
) -> ModelOutputs:
    """Responses under the positive variant for every query, plus the variants the MI metric needs."""
    cfg, c = setup.config, setup.constitution
    positive = c.positive_variant
    orders = generation_orders(setup, settings, plan)
    specs = []  # (query index, variant), positive first for every query, no duplicates
    for q, variants in enumerate(plan):
        specs.append((q, positive))
        specs.extend((q, v) for v in variants if v != positive)
    prompts, prefixes = [], []
    for q, v in specs:
        text = setup.generation_template.fill(c.render(v, orders[q][v]), settings.queries[q])
        ids, prefix = encode_with_prefix(tokenizer, text, cfg.response_prefix, cfg.chat_template)
        prompts.append(ids + prefix)
        prefixes.append(prefix)
    progress = _Stage(emit, f"generate {name}", len(prompts))
    mx.random.seed(settings.seed)  # the same draws for every model when sampling
    gens = generate_batch(
        model,
        tokenizer,
        prompts,
        settings.max_tokens,
        settings.temperature,
        settings.top_p,
        cfg.stop,
        settings.batch_size,
        on_progress=progress,
    )
    progress.finish()
    if cfg.response_prefix:  # the forced start is part of the response, as in training
        gens = [Generation(p + g.tokens, tokenizer.decode(p + g.tokens), g.finish) for p, g in zip(prefixes, gens)]
    by_spec = {(q, v): g for (q, v), g in zip(specs, gens)}
    responses = [by_spec[(q, positive)] for q in range(len(plan))]
    intrinsic = None
    if any(plan):
        groups = [(settings.queries[q], vs, [by_spec[(q, v)] for v in vs]) for q, vs in enumerate(plan)]
        intrinsic = intrinsic_metric(model, tokenizer, setup, groups, settings.seed, name, emit)
    return ModelOutputs(name, responses, intrinsic)


def intrinsic_metric(
    model,
    tokenizer,
    setup: RunSetup,
    groups: list[tuple[str, list[Variant], list[Generation]]],
    seed: int,
    name: str = "",
    emit: Emit | None = None,
) -> dict:
    """log N - sami_loss(S) over held-out groups, S scored as in training (same template, each
    constitution in its own shuffled order).

    Groups with an empty response have nothing to score and are counted as skipped.
    """
    from sami_mlx.loop.batches import scoring_batch  # the prompts and response ids, built as in training
    from sami_mlx.loop.rollout import Group

    cfg, c = setup.config, setup.constitution
    rng = random.Random(f"eval-order-{seed}")
    scored = [Group(i, query, vs, gens) for i, (query, vs, gens) in enumerate(groups) if all(g.tokens for g in gens)]
    skipped = len(groups) - len(scored)
    identical = sum(len({tuple(g.tokens) for g in s.generations}) < len(s.generations) for s in scored)
    # Each constitution in its own order, drawn in turn from one seeded stream.
    orders = [[principle_order(len(c.principles), rng, cfg.shuffle_principles) for _ in s.variants] for s in scored]
    batch = scoring_batch(tokenizer, cfg, c, setup.training_template, scored, orders)
    prompts, responses = batch.prompts, batch.responses
    n = len(groups[0][1]) if groups else 0
    result: dict[str, float | int | None] = {
        "mi_bound": None,
        "loss": None,
        "row_accuracy": None,
        "column_accuracy": None,
        "groups": len(prompts),
        "skipped_empty": skipped,
        "identical": identical,
        "num_variants": n,
    }
    if not prompts:
        return result
    progress = _Stage(emit or (lambda e: None), f"score {name}".strip(), len(prompts))
    # The run's micro-batches (its config.yaml holds the number --grad-accumulation auto chose), so that
    # the memory estimate that chose them covers this pass too.
    S = score_micro_batches(
        model, ScoringBatch(prompts, responses), cfg.groups_per_micro_batch, cfg.scoring == "shared", progress
    )
    loss = float(sami_loss(S))
    row, col = accuracies(S)
    result.update(mi_bound=mi_lower_bound(loss, n), loss=loss, row_accuracy=row, column_accuracy=col)
    return result


class _Stage:
    """Progress of one stage as StageProgress events: opened at 0, closed exactly once at the total."""

    def __init__(self, emit: Emit, name: str, total: int):
        self.emit, self.name, self.total, self.done = emit, name, total, 0
        emit(ev.StageProgress(name, 0, total))

    def __call__(self, done: int, total: int) -> None:
        if done > self.done:
            self.done = done
            self.emit(ev.StageProgress(self.name, done, self.total))

    def finish(self) -> None:
        self(self.total, self.total)


# ---- the whole evaluation ------------------------------------------------------------------------


def evaluate(
    run_dir: str | Path,
    checkpoints: Sequence[Checkpoint],
    judge: Judge,
    settings: EvalSettings,
    template: JudgeTemplate,
    out_dir: str | Path | None = None,
    constitution: str | None = None,
    emit: Emit | None = None,
    model: str | None = None,
) -> list[dict]:
    """Generate, judge and write RUN/eval/<checkpoint>.json plus summary.json and summary.md.

    `model` replaces the run's base model path (a run moved to another machine or folder)."""
    emit = emit or (lambda e: None)
    setup = load_run_setup(run_dir, constitution)
    if not settings.queries:
        raise SamiError("--queries: no held-out queries to evaluate on")
    overlap = training_overlap(setup, settings.queries)
    if overlap:
        emit(
            ev.RunWarning(
                f"{overlap} of the {len(settings.queries)} evaluation queries are also in the "
                f"run's training queries ({setup.config.queries}); win rates on them are not held-out"
            )
        )
    plan = variant_plan(setup, len(settings.queries), settings.seed, settings.intrinsic)
    trust = setup.config.trust_remote_code
    outputs: dict[str, ModelOutputs] = {}
    for ckpt in [Checkpoint("base", None), *checkpoints]:
        policy, tokenizer = load_checkpoint_model(model or setup.config.model, ckpt, trust, setup.config.dequantize)
        policy.eval()
        outputs[ckpt.name] = generate_outputs(policy, tokenizer, setup, settings, plan, ckpt.name, emit)
        del policy, tokenizer
        mx.clear_cache()  # the judge may be a second model in the same memory

    template_tasks = {
        c.name: judge_tasks(setup, settings, outputs["base"], outputs[c.name], template) for c in checkpoints
    }
    tasks = [t for ts in template_tasks.values() for t in ts]
    progress = _Stage(emit, "judge", len(tasks))
    replies = judge([t.prompt for t in tasks], on_progress=progress)
    progress.finish()
    if tasks and all(r.error for r in replies):
        raise SamiError(f"the judge answered none of the {len(tasks)} comparisons (last error: {replies[-1].error})")
    judged = iter(zip(tasks, replies))
    out = Path(out_dir).expanduser() if out_dir else setup.run_dir / "eval"
    results, all_outcomes = [], []
    for ckpt in checkpoints:
        outcomes = [outcome(t, r) for t, r in (next(judged) for _ in template_tasks[ckpt.name])]
        all_outcomes += outcomes
        result = checkpoint_result(
            setup, settings, template, judge, outputs["base"], outputs[ckpt.name], outcomes, overlap
        )
        atomic_write_json(out / f"{ckpt.name}.json", result)
        results.append(result)
    warning = unparsable_warning(all_outcomes, template, out)
    if warning:
        emit(ev.RunWarning(warning))
    headline = [{k: r[k] for k in HEADLINE_KEYS} for r in results]
    atomic_write_json(out / "summary.json", headline)
    atomic_write_text(out / "summary.md", markdown_table(results))
    return results
