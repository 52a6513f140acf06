"""Judging a run: win rates of its checkpoints against the base model, and the intrinsic MI metric.

For every held-out query, the base model and each chosen checkpoint answer under the
constitution's all-positive variant; a judge compares the two answers (A/B order randomised
with a seed) and says which better follows the principles. The intrinsic metric is the
training objective's MI lower bound, log N - sami_loss(S), on the same held-out queries: each
model answers under N variants and scores its own answers.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx

from sami_mlx import events as ev
from sami_mlx.checkpoints import (
    Checkpoint,
    find_checkpoint,
    list_checkpoints,
    load_checkpoint_model,
)
from sami_mlx.config import TrainConfig, config_from_file
from sami_mlx.errors import SamiError
from sami_mlx.evaluation.judge import JudgeReply, JudgeTemplate, parse_verdict
from sami_mlx.fileio import atomic_write_json, atomic_write_text
from sami_mlx.inputs.constitution import (
    Constitution,
    Variant,
    load_constitution,
    num_variants,
    principle_order,
    sample_variants,
    variant_strategy,
)
from sami_mlx.inputs.prompts import Template, encode_with_prefix, load_template
from sami_mlx.inputs.queries import load_queries
from sami_mlx.loop.rollout import Generation, generate_batch
from sami_mlx.loop.scoring import ScoringBatch, score_matrix
from sami_mlx.objective import accuracies, mi_lower_bound, sami_loss

Emit = Callable[[ev.Event], None]
Judge = Callable[..., list[JudgeReply]]
Z95 = 1.959963984540054
SCORING_BATCH = 8
MAX_JUDGE_TEXT = 4000


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


@dataclass
class Outcome:
    """One judged comparison: where the checkpoint's response stood, the verdict, and its score."""

    query_index: int
    checkpoint_position: str  # "A" or "B"
    verdict: str | None  # "A", "B" or None when unparsable
    score: float | None  # 1 checkpoint won, 0 base won, 0.5 unparsable, None for a judge error
    judge_output: str = ""
    error: str | None = None


@dataclass
class JudgeTask:
    checkpoint: str
    principle: str | None  # None: the whole constitution
    query_index: int
    checkpoint_position: str
    prompt: str


# ---- the run ---------------------------------------------------------------------------------


def load_run_setup(run_dir: str | Path, constitution: str | None = None) -> RunSetup:
    """The run's resolved config, constitution (or the one given) and templates; raises SamiError."""
    run = Path(run_dir).expanduser()
    path = run / "config.yaml"
    if not path.is_file():
        raise SamiError(f"--run {run}: no config.yaml there; pass a run directory made by `sami-mlx train`")
    cfg = TrainConfig(**config_from_file(str(path)))
    source = constitution or cfg.constitution
    if not constitution and not Path(source).expanduser().exists():
        raise SamiError(f"{path}: the run's constitution {source} is not found; pass --constitution FILE")
    try:
        generation = load_template(cfg.generation_template or cfg.template)
        training = load_template(cfg.training_template or cfg.template)
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
    result = {
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
    scores = []
    for i in range(0, len(prompts), SCORING_BATCH):
        S = score_matrix(
            model,
            ScoringBatch(prompts[i : i + SCORING_BATCH], responses[i : i + SCORING_BATCH]),
            shared=cfg.scoring == "shared",
        )
        mx.eval(S)
        scores.append(S)
        progress(min(i + SCORING_BATCH, len(prompts)), len(prompts))
    S = mx.concatenate(scores, axis=0)
    loss = sami_loss(S).item()
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


# ---- judging -----------------------------------------------------------------------------------


def judge_tasks(
    setup: RunSetup, settings: EvalSettings, base: ModelOutputs, checkpoint: ModelOutputs, template: JudgeTemplate
) -> list[JudgeTask]:
    """One prompt per query (and per principle when asked), the checkpoint's side drawn with the seed.

    The constitution's principles appear in an order shuffled for each query (one draw per query, the
    same for every checkpoint), as the reference's judge prompts do, so no principle gains weight
    from always coming first.
    """
    c = setup.constitution
    order_rng = random.Random(f"judge-principles-{settings.seed}")
    orders = [principle_order(len(c.principles), order_rng, setup.config.shuffle_principles) for _ in settings.queries]
    whole = [c.render(c.positive_variant, order) for order in orders]
    scopes: list[tuple[str | None, list[str]]] = [(None, whole)]
    if settings.per_principle:
        scopes += [(p.name, [f"1. {p.positive}"] * len(settings.queries)) for p in c.principles]
    tasks = []
    for principle, principles_texts in scopes:
        rng = random.Random(f"judge-order-{settings.seed}-{checkpoint.checkpoint}-{principle or ''}")
        for q, query in enumerate(settings.queries):
            position = "A" if rng.random() < 0.5 else "B"
            ours, theirs = checkpoint.responses[q].text.strip(), base.responses[q].text.strip()
            a, b = (ours, theirs) if position == "A" else (theirs, ours)
            tasks.append(
                JudgeTask(
                    checkpoint.checkpoint, principle, q, position, template.fill(principles_texts[q], query, a, b)
                )
            )
    return tasks


def outcome(task: JudgeTask, reply: JudgeReply) -> Outcome:
    """Score a reply: 1 if it picked the checkpoint, 0 if the base, 0.5 if unparsable; None on error."""
    text = reply.text[:MAX_JUDGE_TEXT]
    if reply.error:
        return Outcome(task.query_index, task.checkpoint_position, None, None, text, reply.error)
    verdict = parse_verdict(reply.text)
    score = 0.5 if verdict is None else float(verdict == task.checkpoint_position)
    return Outcome(task.query_index, task.checkpoint_position, verdict, score, text)


# ---- statistics --------------------------------------------------------------------------------


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def wilson_interval(p: float | None, n: int, z: float = Z95) -> list[float] | None:
    """The Wilson score interval for a win rate p over n comparisons (ties count half)."""
    if p is None or n == 0:
        return None
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(max(p * (1 - p), 0.0) / n + z * z / (4 * n * n))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def length_controlled_win_rate(
    scores: Sequence[float], checkpoint_lengths: Sequence[int], base_lengths: Sequence[int]
) -> tuple[float | None, dict]:
    """The paper's balanced strata: the mean of the win rate where the checkpoint's response is longer
    than the base's and the win rate where it is shorter, so neither length direction dominates.

    Equal-length pairs carry no length effect and sit in their own stratum; when every pair is equal
    the plain win rate is the answer. When only one direction occurs the value is None: length
    cannot be controlled for.
    """
    strata: dict[str, list[float]] = {"longer": [], "shorter": [], "equal": []}
    for s, mine, theirs in zip(scores, checkpoint_lengths, base_lengths):
        strata["longer" if mine > theirs else "shorter" if mine < theirs else "equal"].append(s)
    summary = {k: {"n": len(v), "win_rate": mean(v)} for k, v in strata.items()}
    if strata["longer"] and strata["shorter"]:
        return 0.5 * (mean(strata["longer"]) + mean(strata["shorter"])), summary
    if not strata["longer"] and not strata["shorter"]:
        return mean(strata["equal"]), summary
    return None, summary


def length_controlled_interval(strata: dict, z: float = Z95) -> list[float] | None:
    """A 95% interval for the length-controlled win rate, the mean of the 'longer' and 'shorter'
    strata's win rates: a Wald interval on each stratum's rate with one win and one loss added
    (Agresti and Caffo's adjustment, which keeps a stratum of all wins from claiming zero width),
    the two variances halved and added. With every pair of equal length it is the plain rate's
    Wilson interval; with one direction only there is no length-controlled rate, and no interval."""
    longer, shorter, equal = strata["longer"], strata["shorter"], strata["equal"]
    if not longer["n"] and not shorter["n"]:
        return wilson_interval(equal["win_rate"], equal["n"], z)
    if not longer["n"] or not shorter["n"]:
        return None
    adjusted = [((s["win_rate"] * s["n"] + 1) / (s["n"] + 2), s["n"] + 2) for s in (longer, shorter)]
    centre = 0.5 * sum(p for p, _ in adjusted)
    half = z * 0.5 * math.sqrt(sum(p * (1 - p) / n for p, n in adjusted))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def summarize(outcomes: Sequence[Outcome], checkpoint_lengths: Sequence[int], base_lengths: Sequence[int]) -> dict:
    """Win rate with its 95% interval, the length-controlled win rate with its interval and the
    equal-length pairs it left out, and the counts behind them."""
    scored = [o for o in outcomes if o.score is not None]
    scores = [o.score for o in scored]
    rate = mean(scores)
    lc, strata = length_controlled_win_rate(
        scores, [checkpoint_lengths[o.query_index] for o in scored], [base_lengths[o.query_index] for o in scored]
    )
    parsed = [o for o in scored if o.verdict is not None]
    both_directions = strata["longer"]["n"] > 0 and strata["shorter"]["n"] > 0
    return {
        "win_rate": rate,
        "win_rate_ci": wilson_interval(rate, len(scores)),
        "length_controlled_win_rate": lc,
        "length_controlled_ci": length_controlled_interval(strata),
        # Pairs of equal length carry no length effect; the balanced estimate leaves them out.
        "length_controlled_left_out": strata["equal"]["n"] if both_directions else 0,
        "length_strata": strata,
        "n": len(scores),
        "wins": sum(o.score == 1.0 and o.verdict is not None for o in scored),
        "losses": sum(o.score == 0.0 for o in scored),
        "unparsable": sum(o.verdict is None for o in scored),
        "judge_errors": len(outcomes) - len(scored),
        "position_a_rate": mean([float(o.verdict == "A") for o in parsed]),
    }


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
        policy, tokenizer = load_checkpoint_model(model or setup.config.model, ckpt, trust)
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


UNPARSABLE_WARN = 0.10


def unparsable_warning(outcomes: Sequence[Outcome], template: JudgeTemplate, out: Path) -> str | None:
    """One line when more than 10% of the judge's answers named no verdict (each counted as 0.5)."""
    answered = [o for o in outcomes if o.error is None]
    bad = sum(o.verdict is None for o in answered)
    if not answered or bad <= UNPARSABLE_WARN * len(answered):
        return None
    return (
        f"{bad} of {len(answered)} judge answers ({100 * bad / len(answered):.0f}%) named no verdict and "
        f"count as ties (judge prompt: {template.source}); read judge_output in {out}/, then pass "
        "--judge-template with a prompt whose last line asks for 'Final Response: A' or 'B' "
        "(built-in: dialogue, summarization), or raise --judge-max-tokens if answers were cut off"
    )


HEADLINE_KEYS = (
    "checkpoint",
    "win_rate",
    "win_rate_ci",
    "length_controlled_win_rate",
    "length_controlled_ci",
    "length_controlled_left_out",
    "n",
    "unparsable",
    "judge_errors",
    "intrinsic",
    "per_principle",
)


def checkpoint_result(
    setup: RunSetup,
    settings: EvalSettings,
    template: JudgeTemplate,
    judge: Judge,
    base: ModelOutputs,
    mine: ModelOutputs,
    outcomes: list[Outcome],
    overlap: int,
) -> dict:
    """Everything one checkpoint's eval file holds: headline numbers, settings and every comparison."""
    base_len = [len(g.tokens) for g in base.responses]
    mine_len = [len(g.tokens) for g in mine.responses]
    overall = outcomes[: len(settings.queries)]
    result = {
        "checkpoint": mine.checkpoint,
        "run": str(setup.run_dir.resolve()),
        **summarize(overall, mine_len, base_len),
    }
    if settings.per_principle:
        result["per_principle"] = {}
        for k, p in enumerate(setup.constitution.principles, start=1):
            part = outcomes[k * len(settings.queries) : (k + 1) * len(settings.queries)]
            result["per_principle"][p.name] = summarize(part, mine_len, base_len)
    else:
        result["per_principle"] = None
    result["intrinsic"] = {"base": base.intrinsic, "checkpoint": mine.intrinsic} if mine.intrinsic else None
    result["mean_length"] = {"base": mean(base_len), "checkpoint": mean(mine_len)}
    describe = getattr(judge, "describe", None)
    result["judge"] = describe() if describe else {"kind": type(judge).__name__}
    result["settings"] = {
        "queries": settings.queries_source,
        "num_queries": len(settings.queries),
        "training_overlap": overlap,
        "max_tokens": settings.max_tokens,
        "temperature": settings.temperature,
        "top_p": settings.top_p,
        "seed": settings.seed,
        "judge_template": template.source,
        "constitution": setup.constitution.name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    result["items"] = [
        {
            "query": settings.queries[o.query_index],
            "base": base.responses[o.query_index].text,
            "checkpoint": mine.responses[o.query_index].text,
            "base_tokens": base_len[o.query_index],
            "checkpoint_tokens": mine_len[o.query_index],
            "checkpoint_position": o.checkpoint_position,
            "verdict": o.verdict,
            "score": o.score,
            "judge_output": o.judge_output,
            "error": o.error,
        }
        for o in overall
    ]
    return result


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _mi(intrinsic: dict | None) -> str:
    if not intrinsic:
        return "—"
    b, c = intrinsic["base"]["mi_bound"], intrinsic["checkpoint"]["mi_bound"]
    if b is None or c is None:
        return "—"
    return f"{round(b, 3) + 0.0:+.3f} → {round(c, 3) + 0.0:+.3f}"  # + 0.0 turns -0.000 into +0.000


def _ci(ci: list[float] | None) -> str:
    return "—" if ci is None else f"{_pct(ci[0])}–{_pct(ci[1])}"


def _lc(r: dict) -> str:
    """The length-controlled rate with its interval, e.g. '61.0% (52.3%–69.4%)'."""
    if r["length_controlled_win_rate"] is None:
        return "—"
    return f"{_pct(r['length_controlled_win_rate'])} ({_ci(r.get('length_controlled_ci'))})"


def markdown_table(results: Sequence[dict]) -> str:
    """The headline numbers as a Markdown table (and one per principle when judged per principle)."""
    lines = [
        "| checkpoint | n | win rate | 95% CI | length-controlled (95% CI) | equal length, left out | unparsable "
        "| judge errors | MI bound base → checkpoint (nats) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['checkpoint']} | {r['n']} | {_pct(r['win_rate'])} | {_ci(r['win_rate_ci'])} | "
            f"{_lc(r)} | {r.get('length_controlled_left_out', 0)} | {r['unparsable']} | "
            f"{r['judge_errors']} | {_mi(r['intrinsic'])} |"
        )
    for r in results:
        if r.get("per_principle"):
            lines += [
                "",
                f"Per principle, {r['checkpoint']}:",
                "",
                "| principle | n | win rate | 95% CI | length-controlled (95% CI) | equal length, left out "
                "| unparsable |",
                "|---|---:|---:|---|---:|---:|---:|",
            ]
            for name, p in r["per_principle"].items():
                lines.append(
                    f"| {name} | {p['n']} | {_pct(p['win_rate'])} | {_ci(p['win_rate_ci'])} | "
                    f"{_lc(p)} | {p.get('length_controlled_left_out', 0)} | {p['unparsable']} |"
                )
    return "\n".join(lines) + "\n"
