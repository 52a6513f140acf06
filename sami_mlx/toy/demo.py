"""`sami-mlx demo`: SAMI on the synthetic principles world, offline, with a before/after table."""

from __future__ import annotations

import itertools
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from sami_mlx import events as ev
from sami_mlx import stats, styleworld
from sami_mlx.config import TrainConfig
from sami_mlx.fileio import atomic_write_json, atomic_write_text
from sami_mlx.inputs.constitution import Constitution, Variant, save_constitution
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.heldout import heldout_perplexity, load_heldout
from sami_mlx.loop.prepare import refuse_existing_run
from sami_mlx.loop.rollout import generate_batch
from sami_mlx.loop.sampling import queries_needed
from sami_mlx.loop.trainer import train
from sami_mlx.presets import load_preset
from sami_mlx.sources import resolve_model
from sami_mlx.toy import world as toyworld
from sami_mlx.toy.pretrain import ensure_toy_model, world_of

Callback = Callable[[ev.Event], None]


@dataclass
class Evaluation:
    """Responses sampled for every (query, variant) and how well each follows its variant."""

    constitution: Constitution
    variants: list[Variant]
    texts: list[str]
    scores: list[dict[str, float]]

    def adherence(self) -> dict[str, float]:
        names = [p.name for p in self.constitution.principles]
        per = {n: sum(s[n] for s in self.scores) / len(self.scores) for n in names}
        return {**per, "overall": sum(per.values()) / len(per)}


def evaluate(
    model,
    tokenizer,
    constitution: Constitution,
    queries: list[str],
    max_tokens: int,
    seed: int,
    world=toyworld,
    stop: Sequence[str] = ("Human:",),
    temperature: float = 1.0,
    batch_size: int = 32,
) -> Evaluation:
    """Sample (at temperature 1 unless told) under every variant of `constitution` and check each reply."""
    pairs = [(q, v) for q in queries for v in variants_of(constitution)]
    prompts = [encode(world, tokenizer, constitution.render(v), q) for q, v in pairs]
    mx.random.seed(seed)
    gens = generate_batch(
        model, tokenizer, prompts, max_tokens, temperature=temperature, stop_strings=list(stop), batch_size=batch_size
    )
    texts = [g.text for g in gens]
    return Evaluation(
        constitution,
        [v for _, v in pairs],
        texts,
        [world.adherence(t, constitution, v) for t, (_, v) in zip(texts, pairs)],
    )


@dataclass
class Measured:
    """What the report shows of one model: its replies at temperature 1 (the adherence table and the
    win rate) and greedy, its replies under the constitution with the held-out principle, and its
    held-out perplexity."""

    sampled: Evaluation
    greedy: Evaluation
    heldout: Evaluation
    ppl: float

    EXAMPLES = 3  # queries whose replies the report shows, base beside SAMI

    def positive_texts(self) -> list[str]:
        """The sampled reply to each evaluation query under the all-positive variant (what the examples
        and the LLM judge compare), whether this rank sampled them all or received just these."""
        e = self.sampled
        if len(e.texts) != len(e.variants):
            return e.texts
        return [t for t, v in zip(e.texts, e.variants) if v.is_positive]

    @classmethod
    def share(
        cls, ranks: Ranks, owner: int, mine: Measured | None, layout: Sequence[tuple[Constitution, int]]
    ) -> Measured:
        """Rank `owner`'s `mine` (None on the others) on every rank, through the ranks' collectives; `layout`
        is each evaluation's constitution and number of queries. Checker scores (0 or 1) travel exactly
        as float32 and the perplexity as two float32 parts (to about 14 digits), so the report is what one
        process computes."""
        evaluations = list(zip(("sampled", "greedy", "heldout"), layout))
        row = [0.0] * (2 + sum(n * len(variants_of(c)) * len(c.principles) for c, n in layout))
        texts: list[list[int]] = []
        if mine is not None:
            high = float(np.float32(mine.ppl))
            row = [high, mine.ppl - high]
            for name, (c, _) in evaluations:
                row += [s[p.name] for s in getattr(mine, name).scores for p in c.principles]
            texts = [list(t.encode()) for t in mine.positive_texts()]
        values = iter(ranks.gather(row, "evaluating")[owner])
        shown = [bytes(t).decode() for t in ranks.gather_lists(texts, "evaluating")[owner]]
        ppl = next(values) + next(values)
        parts = {}
        for name, (c, queries) in evaluations:
            pairs = [v for _ in range(queries) for v in variants_of(c)]
            scores = [{p.name: next(values) for p in c.principles} for _ in pairs]
            parts[name] = Evaluation(c, pairs, shown if name == "sampled" else [], scores)
        return cls(parts["sampled"], parts["greedy"], parts["heldout"], ppl)


def encode(world, tokenizer, constitution_text: str, query: str) -> list[int]:
    """A prompt as training rendered it: the world's own encoding (a chat model's template), else its
    plain template."""
    if hasattr(world, "encode"):
        return world.encode(tokenizer, constitution_text, query)
    return tokenizer.encode(world.TEMPLATE.fill(constitution_text, query))


def pick_queries(world, n: int, seed: int, split: str) -> list[str]:
    """`n` queries for `split` (train or eval): a world of real questions keeps the two apart; a
    synthetic world draws fresh ones, which overlap only by chance."""
    if getattr(world, "SPLITS", False):
        return world.queries(n, seed, split=split)
    return world.queries(n, seed)


def variants_of(constitution: Constitution) -> list[Variant]:
    """Every variant of `constitution`, in the order the evaluation samples them."""
    return [Variant(s) for s in itertools.product((True, False), repeat=len(constitution.principles))]


def win_rate(aligned: Evaluation, base: Evaluation) -> tuple[float | None, list[float] | None]:
    """Share of paired prompts where the aligned reply follows more principles (ties 0.5), with its 95%
    interval (sami_mlx.stats: the same Wilson interval `sami-mlx eval` reports); None, None with no pairs."""
    outcomes = []
    for a, b in zip(aligned.scores, base.scores):
        sa, sb = sum(a.values()), sum(b.values())
        outcomes.append(1.0 if sa > sb else 0.5 if sa == sb else 0.0)
    return stats.win_rate(outcomes)


# The share of sampled groups the demo's worlds keep (measured: 190 of 192 in the toy world); planning
# for fewer leaves room, so that no iteration runs out of queries and repeats a group.
USABLE = 0.9


def enough_queries(sami: dict) -> int:
    """Training queries for SAMI `sami` (TrainConfig's fields) that no iteration runs out of: its
    largest iteration's groups in each query split, with room for dropped groups, and the monitor's."""
    cfg = TrainConfig(**sami)
    groups = max(cfg.steps_in_iteration(i) for i in range(cfg.iterations)) * cfg.queries_per_step
    return queries_needed(groups, USABLE, 2 if cfg.schedule == "paper" else 1, cfg.monitor_queries)


def prepare_world(
    out: Path, settings: dict, seed: int, spec=None, world=toyworld, heldout: list[tuple[str, str]] | None = None
) -> dict[str, str]:
    """Write the demo's constitution, queries, template and held-out text as the user's files would be;
    the held-out plain dialogue comes from the world `spec` the base model was trained on, or is
    `heldout` (a real model's own plain answers). A world of a real instruct model writes no template:
    train's default for the model is what it is measured with."""
    inputs = out / "inputs"
    paths = {
        k: str(inputs / f)
        for k, f in [
            ("constitution", "constitution.yaml"),
            ("queries", "queries.jsonl"),
            ("template", "template.txt"),
            ("heldout", "heldout.jsonl"),
            ("anchor_template", "anchor-template.txt"),
        ]
    }
    save_constitution(world.sub_constitution(settings["train_principles"]), paths["constitution"])
    count = settings.get("train_queries") or enough_queries(settings["sami"])
    queries = pick_queries(world, count, seed, "train")
    atomic_write_text(paths["queries"], "".join(json.dumps({"query": q}) + "\n" for q in queries))
    if hasattr(world, "encode"):
        del paths["template"], paths["anchor_template"]  # train's defaults for an instruct model
    else:
        atomic_write_text(paths["template"], world.TEMPLATE.text + "\n")
        if settings["sami"].get("anchor_beta", TrainConfig.anchor_beta):
            atomic_write_text(paths["anchor_template"], world.PLAIN + "\n")
        else:  # no anchor: no anchor template (the engine refuses one that would do nothing)
            del paths["anchor_template"]
    docs = heldout or world.plain_corpus(settings["heldout_documents"], seed + 7919, spec or world.WorldSpec())
    atomic_write_text(paths["heldout"], "".join(json.dumps({"prompt": p, "completion": r}) + "\n" for p, r in docs))
    return paths


def run_demo(
    out: str | Path,
    preset: dict | None = None,
    emit: Callback = lambda e: None,
    seed: int = 0,
    overrides: dict | None = None,
    ranks: Ranks | None = None,
) -> dict | None:
    """Build or load the world's base model, run SAMI with the engine (`overrides` on top of the preset's
    settings), evaluate before/after; returns demo.json's content with where the model and the run lie
    (`model`, `run`) and the `seconds` it took.

    Started as one of several ranks (`ranks`, by default the launcher's group), the ranks build the
    model and train together, then rank 1 measures the base model while rank 0 measures the trained
    one and writes the report; the others return None."""
    from sami_mlx.model import load_model

    start = time.perf_counter()
    ranks = ranks or Ranks.world(advice="start the demo again (it does not resume)")
    if not ranks.primary:
        emit = _quiet
    preset = preset or load_preset("toy-world")
    settings = preset["demo"]
    out = Path(out)
    refuse_existing_run(out)  # before the demo writes its inputs there
    budget = demo_budget(preset)
    sami = {**settings["sami"], **budget.settings, **(overrides or {})}
    heldout = None
    if "recipe" in preset:  # a synthetic world: its base model is built from the recipe
        model_dir = ensure_toy_model(
            preset["recipe"],
            lambda n, total, loss: emit(ev.StageProgress("building toy model", n, total, f"loss {loss:.3f}")),
            ranks,
        )
        world = world_of(preset["recipe"])
        spec = world.WorldSpec(**preset["recipe"].get("world", {}))
    else:  # a real model (fetched before the ranks start): its held-out text is its own plain answers
        model_dir, world, spec = resolve_model(preset["name"]), styleworld, None
        emit(ev.StageProgress("writing the base model's plain answers", 0, 1))
        base_model, base_tokenizer = load_model(str(model_dir), dequantize=sami.get("dequantize", "auto"))[:2]
        heldout = styleworld.plain_answers(
            base_model, base_tokenizer, settings["heldout_documents"], seed + 7919, sami.get("max_tokens", 128), ranks
        )
        del base_model
    paths: dict[str, Any] = prepare_world(  # TrainConfig's file fields
        out, {**settings, "sami": sami}, seed, spec, world, heldout
    )
    ranks.barrier("writing the demo's inputs")  # each rank wrote the same files; all are there now
    # A real model goes by its preset's name, so that train picks what it picks for that model (an
    # instruct model's chat template) and the run records where it came from.
    model_name = str(model_dir) if "recipe" in preset else preset["name"]
    cfg = TrainConfig(model=model_name, out=str(out), seed=seed, **paths, **sami)
    result = train(cfg, callbacks=[emit], ranks=ranks)

    emit(ev.StageProgress("evaluating", 0, 2))
    trained = world.sub_constitution(settings["train_principles"])
    # The held-out principle never appeared in training prompts; it is shown only at evaluation.
    h = settings["heldout_principle"]
    full = world.sub_constitution([*settings["train_principles"], h])
    eval_queries = pick_queries(world, settings["eval_queries"], seed + 104729, "eval")
    h_queries = pick_queries(world, settings["heldout_eval_queries"], seed + 1299709, "eval")
    max_tokens, stop = cfg.max_tokens, cfg.stop  # as training sampled
    # Greedy replies as well (demo.json's greedy_adherence), unless the preset skips them to save time.
    greedy_queries = eval_queries if settings.get("greedy_eval", True) else []
    texts = load_heldout(paths["heldout"])

    def measure(model, tokenizer) -> Measured:
        def sample(constitution, queries, seed, temperature=1.0):
            return evaluate(
                model, tokenizer, constitution, queries, max_tokens, seed, world, stop, temperature, cfg.gen_batch_size
            )

        return Measured(
            sample(trained, eval_queries, seed),
            sample(trained, greedy_queries, seed, temperature=0.0)
            if greedy_queries
            else Evaluation(trained, [], [], []),
            sample(full, h_queries, seed + 1),
            heldout_perplexity(model, tokenizer, texts),
        )

    # Each evaluation seeds its own sampling, so who runs it does not change it: with several ranks
    # rank 1 measures the base model while rank 0 measures the trained one.
    layout = [(trained, len(eval_queries)), (trained, len(greedy_queries)), (full, len(h_queries))]
    measurer, base = min(1, ranks.size - 1), None
    if ranks.rank == measurer:
        base = measure(*load_model(str(model_dir), dequantize=cfg.dequantize)[:2])
        emit(ev.StageProgress("evaluating", 1, 2))
    if not ranks.primary:
        base = Measured.share(ranks, measurer, base, layout)
        if settings.get("llm_judge"):  # this rank judges its share of the pairs rank 0 sends
            sami_texts = [bytes(t).decode() for t in ranks.gather_lists([], "sharing the SAMI replies")[0]]
            pairs = list(zip(eval_queries, base.positive_texts(), sami_texts))
            llm_judge(str(model_dir), trained, pairs, seed, settings["llm_judge"]["max_tokens"], ranks)
        return None
    after = measure(result.model, result.tokenizer)
    if ranks.size > 1:
        emit(ev.StageProgress("evaluating", 1, 2))
        base = Measured.share(ranks, measurer, None, layout)
    assert base is not None
    emit(ev.StageProgress("evaluating", 2, 2))
    before = base.sampled
    wr, ci = win_rate(after.sampled, before)
    pairs = list(zip(eval_queries, base.positive_texts(), after.positive_texts()))
    judged = None
    if settings.get("llm_judge"):  # the model itself as eval's local judge, on the same replies
        emit(ev.StageProgress("judging with the model itself", 0, 1))
        if ranks.size > 1:
            ranks.gather_lists([list(t.encode()) for t in after.positive_texts()], "sharing the SAMI replies")
        judged = llm_judge(str(model_dir), trained, pairs, seed, settings["llm_judge"]["max_tokens"], ranks)
    report = {
        "base_adherence": before.adherence(),
        "sami_adherence": after.sampled.adherence(),
        "greedy_adherence": {
            "base": base.greedy.adherence()["overall"],
            "sami": after.greedy.adherence()["overall"],
        }
        if greedy_queries
        else None,
        "kept": result.kept,
        "stopped": result.reason if result.stopped_early else "",
        "win_rate": wr,
        "win_rate_ci": ci,
        "mi_bound": [it["mi_bound"] for it in result.iterations if "mi_bound" in it],  # not a rolled-back step's
        "ppl_base": base.ppl,
        "ppl_sami": after.ppl,
        "ppl_ratio": after.ppl / base.ppl,
        "heldout": {
            "principle": h,
            "base_adherence": base.heldout.adherence()[h],
            "sami_adherence": after.heldout.adherence()[h],
        },
        "n_eval": len(after.sampled.scores),
        "examples": [{"query": q, "base": b, "sami": a} for q, b, a in pairs[: Measured.EXAMPLES]],
        "llm_judge": judged,
        "budget": {"name": budget.name, "why": budget.why, "settings": budget.settings},
        "world": world.NAME,
        "preset": preset.get("name"),
        "base_model": model_dir.name,  # the recipe's cache key: two demos on one base model name the same
    }
    # demo.json holds what the seed determines, so that two runs with one seed write the same bytes;
    # where the model and the run lie and how long it took are returned (and printed) only.
    atomic_write_json(out / "demo.json", report)
    return {**report, "model": str(model_dir), "run": str(out), "seconds": time.perf_counter() - start}


@dataclass(frozen=True)
class Budget:
    """The settings a demo run puts over train's defaults for this machine, and why in words."""

    name: str
    why: str
    settings: dict


def demo_budget(preset: dict) -> Budget:
    """Train's defaults, except on a CPU for a preset that names a `cpu_budget` (a real model there
    trains at tens of tokens a second, so the defaults would take hours)."""
    cpu = preset["demo"].get("cpu_budget")
    if not cpu:
        return Budget("train's defaults", "this world's model is small enough for them on any machine", {})
    if mx.default_device().type == mx.cpu:
        return Budget("CPU budget", "MLX computes on the CPU here, so the demo trains less", dict(cpu))
    return Budget("train's defaults", "MLX computes on the GPU here", {})


def llm_judge(
    model: str,
    constitution: Constitution,
    pairs: Sequence[tuple[str, str, str]],
    seed: int,
    max_tokens: int,
    ranks: Ranks | None = None,
) -> dict:
    """Win rate of the SAMI replies over the base replies in `pairs` (query, base, SAMI), judged by
    `sami-mlx eval`'s local judge with its default prompt; each pair's sides drawn with `seed`, an
    unparsable verdict counts 0.5 as in eval, and the parse rate says how often the judge answered.
    The judge answers greedily, so each of `ranks` judges its share of the pairs and they share the
    verdicts' texts."""
    from sami_mlx.evaluation.judge import load_judge_template
    from sami_mlx.evaluation.judge_backends import LocalJudge
    from sami_mlx.evaluation.verdicts import parse_verdict

    template = load_judge_template(None)
    rng = random.Random(f"demo-judge-{seed}")
    sides = ["A" if rng.random() < 0.5 else "B" for _ in pairs]
    principles = constitution.render(constitution.positive_variant)
    prompts = [
        template.fill(principles, q, *((a, b) if side == "A" else (b, a))) for (q, b, a), side in zip(pairs, sides)
    ]
    ranks = ranks or Ranks()
    judge = LocalJudge(model, max_tokens=max_tokens)
    mine = [r.text for r in judge([prompts[i] for i in ranks.shard(len(prompts))])]
    judge.close()
    verdicts = [parse_verdict(text) for text in ranks.gather_texts(mine, len(prompts), "judging")]
    scores = [0.5 if v is None else float(v == side) for v, side in zip(verdicts, sides)]
    wr, ci = stats.win_rate(scores)
    parsed = sum(v is not None for v in verdicts)
    return {
        "win_rate": wr,
        "win_rate_ci": ci,
        "parsed": parsed,
        "n": len(pairs),
        "parse_rate": parsed / max(len(pairs), 1),
    }


def _quiet(event: ev.Event) -> None:
    """Ranks other than 0 show no progress."""


WORLD_TITLES = {
    "toy-world": "the toy principles world",
    "marker-world": "the marker world",
    styleworld.NAME: "a real model (program-checked principles over held-out questions)",
}


def format_report(r: dict) -> str:
    """The before/after table the demo prints."""
    names = [k for k in r["base_adherence"] if k != "overall"]
    title = WORLD_TITLES.get(r.get("world", "toy-world"), r.get("world", ""))
    lines = [
        "",
        f"SAMI on {title} (adherence: share of replies doing what the stated wording says,",
        f"sampled at temperature 1 over every variant; n = {r['n_eval']})",
        "",
        f"  {'principle':<22}{'base':>8}{'SAMI':>8}",
    ]
    for n in [*names, "overall"]:
        lines.append(f"  {n:<22}{r['base_adherence'][n]:>8.2f}{r['sami_adherence'][n]:>8.2f}")
    h = r["heldout"]
    lines.append(f"  {h['principle'] + ' (held out)':<22}{h['base_adherence']:>8.2f}{h['sami_adherence']:>8.2f}")
    lo, hi = r["win_rate_ci"]
    lines += [
        "",
        f"  win rate vs base (checker-judged, ties 0.5): {r['win_rate']:.0%}  (95% CI {lo:.0%}–{hi:.0%})",
    ]
    j = r.get("llm_judge")
    if j:
        lo, hi = j["win_rate_ci"]
        lines.append(
            f"  win rate vs base (the model itself as judge, unparsed 0.5): {j['win_rate']:.0%}  (95% CI"
            f" {lo:.0%}–{hi:.0%}; verdicts parsed {j['parsed']}/{j['n']})"
        )
    lines += [
        "  MI lower bound per iteration (nats): " + ", ".join(f"{m:+.3f}" for m in r["mi_bound"]),
        f"  held-out perplexity: base {r['ppl_base']:.2f}, SAMI {r['ppl_sami']:.2f} ({r['ppl_ratio']:.2f}x)",
    ]
    if r.get("kept"):
        stopped = r.get("stopped")
        why = stopped.split(": ", 1)[-1].split("; RUN/")[0] if stopped else ""
        lines.append(
            f"  adapters: {r['kept']['name']}" + (f" (the degeneration monitor stopped the run: {why})" if why else "")
        )
    b = r.get("budget")
    if b and b["settings"]:
        shown = ", ".join(f"{k} {v}" for k, v in b["settings"].items())
        lines.append(f"  settings: train's defaults with the {b['name']} ({b['why']}): {shown}")
    if r.get("world") == styleworld.NAME:
        lines += ["", *side_by_side(r["examples"])]
    lines.append(f"  took {r['seconds']:.0f}s; numbers in {r['run']}/demo.json")
    return "\n".join(lines)


def side_by_side(examples: Sequence[dict], width: int = 38) -> list[str]:
    """Replies before and after, in two columns under each query (all-positive constitution)."""
    import textwrap

    lines = ["  Replies to held-out questions under the whole constitution (base | SAMI):"]
    for e in examples:
        lines += ["", "  Q: " + e["query"]]
        left = textwrap.wrap(" ".join(e["base"].split()), width) or ["(empty)"]
        right = textwrap.wrap(" ".join(e["sami"].split()), width) or ["(empty)"]
        for a, b in itertools.zip_longest(left, right, fillvalue=""):
            lines.append(f"    {a:<{width}} | {b}")
    return lines
