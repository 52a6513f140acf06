"""The SAMI loop: sample -> score -> train -> checkpoint, reporting only through events."""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import yaml
from mlx.utils import tree_flatten, tree_map

from . import events as ev
from .adapters import (
    adapter_weights,
    adapters_disabled,
    attach_adapters,
    save_adapters,
    set_adapter_weights,
)
from .config import TrainConfig
from .constitution import (
    Constitution,
    Principle,
    load_constitution,
    num_variants,
    principle_order,
    sample_variants,
    variant_strategy,
)
from .errors import RunAborted, SamiError
from .fileio import append_jsonl, atomic_write_json, atomic_write_text, read_text
from .model import load_model
from .objective import accuracies, mi_lower_bound, sami_loss
from .prompts import Template, encode_prompt, load_template
from .queries import load_queries
from .rollout import Group, filter_groups, generate_batch, sample_stats
from .scoring import (
    PairBatch,
    build_pairs,
    diagonal_rows,
    kl_to_base,
    scores_from_logprobs,
    token_logprobs,
)

Callback = Callable[[ev.Event], None]
HELDOUT_TEXTS = 32


@dataclass
class RunInputs:
    """The user's files, validated before any model is loaded (cheap mistakes fail fast)."""

    constitution: Constitution
    queries: list[str]
    generation_template: Template
    training_template: Template
    heldout: list[str]
    num_variants: int


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    tokenizer: object
    iterations: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    reason: str = ""


def prepare_inputs(cfg: TrainConfig) -> RunInputs:
    """Load and validate the constitution, queries, templates and held-out text."""
    constitution = load_constitution(cfg.constitution)
    n = num_variants(variant_strategy(cfg.variants), len(constitution.principles))
    queries = load_queries(cfg.queries)
    heldout = load_heldout(cfg.heldout) if cfg.heldout else queries
    if not heldout:
        raise SamiError(f"{cfg.heldout}: no text found; give plain text paragraphs for the perplexity check")
    return RunInputs(
        constitution,
        queries,
        load_template(cfg.generation_template),
        load_template(cfg.training_template),
        heldout[:HELDOUT_TEXTS],
        n,
    )


def load_heldout(path: str) -> list[str]:
    """Held-out plain text: a .jsonl file with a 'text' field per line, or paragraphs of a text file."""
    text = read_text(path, "held-out text file")
    if not path.endswith(".jsonl"):
        return [p for p in text.split("\n\n") if p.strip()]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
        if line.strip() and not (isinstance(row, dict) and isinstance(row.get("text"), str)):
            raise SamiError(f"{path}: line {n} needs a 'text' string field")
        if row:
            rows.append(row["text"])
    return rows


def check_context(cfg: TrainConfig, inputs: RunInputs, tokenizer, context: int | None) -> None:
    """Refuse queries whose longest prompt plus --max-tokens cannot fit the model's context."""
    if not context:
        return
    c = inputs.constitution
    longest = Constitution(c.name, tuple(
        Principle(p.name, *(2 * [max(p.positive, p.negative, key=len)])) for p in c.principles))
    text = longest.render(longest.positive_variant)
    for template in {inputs.generation_template, inputs.training_template}:
        for n, query in enumerate(inputs.queries, start=1):
            size = len(encode_prompt(tokenizer, template.fill(text, query), cfg.chat_template))
            if size + cfg.max_tokens > context:
                raise SamiError(
                    f"{cfg.queries}: query {n} makes a {size}-token prompt, which with --max-tokens "
                    f"{cfg.max_tokens} exceeds the model's {context}-token context; shorten it or lower --max-tokens"
                )


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run directory, refusing one that already holds a run."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise SamiError(f"--out {out}: is a file; choose a directory for the run")
    if (out / "metrics.jsonl").exists() or (out / "state.json").exists():
        raise SamiError(f"--out {out}: already holds a run; choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = ()) -> TrainResult:
    """Run SAMI as configured; every event goes to metrics.jsonl and then to each callback."""
    cfg = cfg.resolved()
    inputs = prepare_inputs(cfg)
    model, tokenizer, model_config = load_model(cfg.model, cfg.trust_remote_code)
    check_context(cfg, inputs, tokenizer, model_config.get("max_position_embeddings"))
    out = prepare_run_dir(cfg)
    atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    def emit(event: ev.Event) -> None:
        if not isinstance(event, ev.SamplingProgress):
            append_jsonl(out / "metrics.jsonl", event.to_dict())
        for cb in callbacks:
            cb(event)

    return SamiLoop(cfg, inputs, model, tokenizer, out, emit).run()


class SamiLoop:
    """State of one run: the model with its adapters, the optimizer, the schedule position."""

    def __init__(self, cfg: TrainConfig, inputs: RunInputs, model, tokenizer, out: Path, emit: Callback):
        self.cfg, self.inputs, self.model, self.tokenizer, self.out, self.emit = cfg, inputs, model, tokenizer, out, emit
        self.strategy = variant_strategy(cfg.variants)
        mx.random.seed(cfg.seed)
        self.adapter_config = attach_adapters(
            model, cfg.lora_rank, cfg.lora_scale, cfg.lora_dropout, cfg.lora_layers, cfg.lora_keys, cfg.dora
        )
        self.initial_adapters = adapter_weights(model)
        if cfg.grad_checkpoint:
            from mlx_lm.tuner.trainer import grad_checkpoint

            grad_checkpoint(model.layers[0])
        self.loss_and_grad = nn.value_and_grad(model, self._loss)
        self.optimizer = self._make_optimizer()
        self.global_step = 0

    # ---- schedule -------------------------------------------------------------------------

    def run(self) -> TrainResult:
        cfg, start = self.cfg, time.perf_counter()
        model = self.model
        model.eval()
        base_ppl = heldout_perplexity(model, self.tokenizer, self.inputs.heldout)
        total_steps = sum(cfg.steps_in_iteration(t) for t in range(cfg.iterations))
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        self.emit(ev.RunStarted(str(self.out), cfg.to_dict(), cfg.iterations, total_steps,
                                self.inputs.num_variants, trainable, base_ppl))
        result = TrainResult(self.out, model, self.tokenizer)
        for it in range(cfg.iterations):
            summary = self.iteration(it, base_ppl)
            result.iterations.append(summary)
            if cfg.max_ppl_ratio and summary["ppl_ratio"] > cfg.max_ppl_ratio:
                result.stopped_early = True
                result.reason = (
                    f"held-out perplexity reached {summary['ppl_ratio']:.2f}x the base model's "
                    f"(limit {cfg.max_ppl_ratio}); lower --learning-rate or add --kl-beta"
                )
                self.emit(ev.RunWarning(result.reason))
                break
        self.emit(ev.RunCompleted(str(self.out), time.perf_counter() - start, result.stopped_early, result.reason))
        return result

    def iteration(self, it: int, base_ppl: float) -> dict:
        cfg = self.cfg
        steps = cfg.steps_in_iteration(it)
        query_ids = self.queries_for_iteration(it, steps * cfg.queries_per_step)
        self.emit(ev.IterationStarted(it + 1, steps, len(query_ids)))

        # Data comes from the previous iteration's model (adapters as they stand now).
        self.model.eval()
        groups = self.sample(it, query_ids)
        rng = random.Random(f"train-{cfg.seed}-{it}")
        rng.shuffle(groups)

        if cfg.schedule == "paper":  # the paper re-initialises from the base model every iteration
            set_adapter_weights(self.model, self.initial_adapters)
            self.optimizer = self._make_optimizer()
        self.model.train()
        q = cfg.queries_per_step
        totals = {"loss": 0.0, "mi_bound": 0.0, "row_accuracy": 0.0, "column_accuracy": 0.0}
        for step in range(steps):
            batch = [groups[(step * q + n) % len(groups)] for n in range(q)]
            metrics = self.train_step(batch, random.Random(f"step-{cfg.seed}-{it}-{step}"))
            self.global_step += 1
            for k in totals:
                totals[k] += metrics[k] / steps
            self.emit(ev.StepCompleted(iteration=it + 1, step=step + 1, steps=steps,
                                       global_step=self.global_step, **metrics))
        self.model.eval()
        ppl = heldout_perplexity(self.model, self.tokenizer, self.inputs.heldout)
        it_dir = self.out / f"iter-{it + 1:02d}"
        save_adapters(self.model, it_dir, self.adapter_config)
        save_adapters(self.model, self.out, self.adapter_config)
        atomic_write_json(self.out / "state.json", {
            "completed_iterations": it + 1, "iterations": cfg.iterations,
            "global_step": self.global_step, "adapters": str(it_dir.name),
            "finished": it + 1 == cfg.iterations,
        })
        summary = {**totals, "heldout_ppl": ppl, "ppl_ratio": ppl / base_ppl}
        self.emit(ev.IterationCompleted(iteration=it + 1, adapter_dir=str(it_dir), **summary))
        return summary

    def queries_for_iteration(self, it: int, count: int) -> list[int]:
        """The paper alternates two disjoint query splits; `continue` walks through all queries."""
        order = list(range(len(self.inputs.queries)))
        random.Random(f"splits-{self.cfg.seed}").shuffle(order)
        if self.cfg.schedule == "paper" and len(order) >= 2:
            split, offset = order[it % 2 :: 2], (it // 2) * count
        else:
            split, offset = order, it * count
        return [split[(offset + n) % len(split)] for n in range(count)]

    # ---- sampling -------------------------------------------------------------------------

    def sample(self, it: int, query_ids: list[int]) -> list[Group]:
        cfg, inputs = self.cfg, self.inputs
        rng = random.Random(f"variants-{cfg.seed}-{it}")
        k = len(inputs.constitution.principles)
        specs, prompts = [], []
        for qi in query_ids:
            variants = sample_variants(self.strategy, k, rng)
            specs.append((qi, variants))
            for v in variants:
                text = inputs.generation_template.fill(inputs.constitution.render(v), inputs.queries[qi])
                prompts.append(encode_prompt(self.tokenizer, text, cfg.chat_template))
        mx.random.seed(cfg.seed * 1009 + it)
        t0 = time.perf_counter()
        gens = generate_batch(
            self.model, self.tokenizer, prompts, cfg.max_tokens, cfg.temperature, cfg.top_p,
            cfg.stop, cfg.gen_batch_size,
            on_progress=lambda done, total: self.emit(ev.SamplingProgress(it + 1, done, total)),
        )
        seconds = time.perf_counter() - t0
        n = inputs.num_variants
        groups = [Group(qi, inputs.queries[qi], vs, gens[g * n : (g + 1) * n]) for g, (qi, vs) in enumerate(specs)]
        kept, drops = filter_groups(groups, cfg.banned)
        self.write_samples(it, groups, kept)
        stats = sample_stats(groups, seconds)
        self.emit(ev.SamplesReady(
            iteration=it + 1, groups=len(kept), dropped_empty=drops.empty,
            dropped_identical=drops.identical, dropped_banned=drops.banned,
            mean_length=stats.mean_length, no_eos_rate=stats.no_eos_rate, distinct_2=stats.distinct_2,
            tokens_per_sec=stats.tokens / max(seconds, 1e-9),
            examples=[_example(g) for g in kept[:3]],
        ))
        if not kept:
            raise RunAborted(
                f"iteration {it + 1}: all {len(groups)} sampled groups were degenerate "
                f"({drops.empty} empty, {drops.identical} identical, {drops.banned} banned); "
                "try --temperature 0.7, other --stop strings or another template"
            )
        return kept

    def write_samples(self, it: int, groups: list[Group], kept: list[Group]) -> None:
        kept_ids = {id(g) for g in kept}
        lines = []
        for g in groups:
            lines.append(json.dumps({
                **_example(g),
                "query_index": g.query_index,
                "tokens": [gen.tokens for gen in g.generations],
                "finish": [gen.finish for gen in g.generations],
                "kept": id(g) in kept_ids,
            }, ensure_ascii=False))
        atomic_write_text(self.out / f"iter-{it + 1:02d}" / "samples.jsonl", "\n".join(lines) + "\n")

    # ---- training -------------------------------------------------------------------------

    def pair_batch(self, groups: list[Group], rng: random.Random) -> PairBatch:
        """Training prompts for every variant of each group and the sampled response ids."""
        cfg, c = self.cfg, self.inputs.constitution
        eos = self.tokenizer.eos_token_id
        prompts, responses = [], []
        for g in groups:
            # One shuffled order per group, so the rows of S differ only in the wordings.
            order = principle_order(len(c.principles), rng, cfg.shuffle_principles)
            prompts.append([
                encode_prompt(self.tokenizer, self.inputs.training_template.fill(c.render(v, order), g.query),
                              cfg.chat_template)
                for v in g.variants
            ])
            responses.append([
                gen.tokens + ([eos] if cfg.count_eos and gen.finish == "eos" else []) for gen in g.generations
            ])
        return build_pairs(prompts, responses)

    def _loss(self, model, batch: PairBatch):
        logp, logits = token_logprobs(model, batch.inputs, batch.targets)
        S = scores_from_logprobs(logp, batch)
        loss = sami_loss(S)
        kl = mx.array(0.0)
        if self.cfg.kl_beta > 0:
            rows = diagonal_rows(batch)
            with adapters_disabled(model):
                base_logits = mx.stop_gradient(model(batch.inputs[rows]).astype(mx.float32))
            kl = kl_to_base(logits[rows], base_logits, batch.mask[rows])
            loss = loss + self.cfg.kl_beta * kl
        return loss, S, kl

    def train_step(self, groups: list[Group], rng: random.Random) -> dict:
        """One optimizer step over `groups`, in grad_accumulation micro-batches."""
        cfg = self.cfg
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        parts = [groups[i :: cfg.grad_accumulation] for i in range(cfg.grad_accumulation)]
        grads, loss, kl, scores, tokens = None, 0.0, 0.0, [], 0
        for part in parts:
            batch = self.pair_batch(part, rng)
            (part_loss, S, part_kl), g = self.loss_and_grad(self.model, batch)
            w = len(part) / len(groups)
            g = tree_map(lambda x, w=w: x * w, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, part_loss, S, part_kl)
            loss += part_loss.item() * w
            kl += part_kl.item() * w
            scores.append(S)
            tokens += batch.num_tokens
        grad_norm = 0.0
        if cfg.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            grad_norm = norm.item()
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        S = mx.concatenate(scores, axis=0)
        row_acc, col_acc = accuracies(S)
        seconds = time.perf_counter() - t0
        sami = loss - cfg.kl_beta * kl
        if not math.isfinite(loss):
            raise RunAborted("the loss is not finite; lower --learning-rate")
        return {
            "loss": sami, "mi_bound": mi_lower_bound(sami, S.shape[1]), "row_accuracy": row_acc,
            "column_accuracy": col_acc, "kl": kl, "learning_rate": cfg.learning_rate,
            "grad_norm": grad_norm, "tokens_per_sec": tokens / max(seconds, 1e-9),
            "peak_memory_gb": mx.get_peak_memory() / 1e9, "scores": S[0].tolist(),
        }

    def _make_optimizer(self) -> optim.Optimizer:
        if self.cfg.optimizer == "rmsprop":
            return optim.RMSprop(learning_rate=self.cfg.learning_rate)
        return optim.AdamW(learning_rate=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)


def heldout_perplexity(model: nn.Module, tokenizer, texts: list[str], max_len: int = 256, batch: int = 8) -> float:
    """Perplexity of plain text the loss never trains on: the degeneration check."""
    nll, count = 0.0, 0
    seqs = [ids[:max_len] for ids in (tokenizer.encode(t) for t in texts) if len(ids) >= 2]
    for i in range(0, len(seqs), batch):
        chunk = seqs[i : i + batch]
        L = max(len(s) for s in chunk)
        arr = mx.array([s + [0] * (L - len(s)) for s in chunk])
        lengths = mx.array([len(s) for s in chunk])
        mask = mx.arange(1, L)[None, :] < lengths[:, None]
        ce = nn.losses.cross_entropy(model(arr[:, :-1]).astype(mx.float32), arr[:, 1:]) * mask
        nll += ce.sum().item()
        count += int(mask.sum().item())
    return math.exp(nll / max(count, 1))


def _example(g: Group) -> dict:
    return {"query": g.query, "variants": [v.label for v in g.variants],
            "responses": [gen.text for gen in g.generations]}
