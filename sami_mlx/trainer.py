"""The SAMI loop: sample -> score -> train -> checkpoint, reporting only through events."""

from __future__ import annotations

import contextlib
import hashlib
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
from .config import TrainConfig, config_from_file
from .constitution import (
    Constitution,
    Principle,
    Variant,
    load_constitution,
    num_variants,
    principle_order,
    sample_variants,
    variant_strategy,
)
from .distributed import Ranks
from .errors import RunAborted, SamiError
from .faults import fault_point
from .fileio import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, read_text
from .model import float_bytes, load_model
from .objective import accuracies, mi_lower_bound, sami_loss
from .prompts import Template, encode_prompt, load_template
from .queries import load_queries
from .rollout import Generation, Group, filter_groups, generate_batch, sample_stats
from .runstate import RunLock, RunState, load_checkpoint, save_checkpoint
from .scoring import (
    PairBatch,
    ScoringBatch,
    kl_to_base,
    scores_from_inputs,
    scoring_inputs,
    shared_scoring_supported,
    token_logprobs,
)

Callback = Callable[[ev.Event], None]
StopCheck = Callable[[], bool]
HELDOUT_TEXTS = 32
MAX_BAD_STEPS = 3


def _derived_seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


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
    heldout = load_heldout(cfg.heldout) if cfg.heldout else [("", q) for q in queries]
    if not heldout:
        raise SamiError(f"{cfg.heldout}: no text found; give plain text paragraphs for the perplexity check")
    training = load_template(cfg.training_template)
    anchor = None
    if cfg.anchor_beta > 0:  # filled with an empty constitution, so the training template serves too
        anchor = load_template(cfg.anchor_template, required=("{query}",)) if cfg.anchor_template else training
    return RunInputs(
        constitution,
        queries,
        load_template(cfg.generation_template),
        training,
        heldout[:HELDOUT_TEXTS],
        n,
        anchor,
    )


def load_heldout(path: str) -> list[tuple[str, str]]:
    """Held-out (prompt, text) pairs: .jsonl rows with 'text' (or 'prompt' + 'completion'), else paragraphs."""
    text = read_text(path, "held-out text file")
    if not path.endswith(".jsonl"):
        return [("", p) for p in text.split("\n\n") if p.strip()]
    rows = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("text"), str):
            rows.append(("", row["text"]))
        elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("completion"), str):
            rows.append((row["prompt"], row["completion"]))
        else:
            raise SamiError(f"{path}: line {n} needs a 'text' string field (or 'prompt' and 'completion')")
    return rows


def check_context(cfg: TrainConfig, inputs: RunInputs, tokenizer, context: int | None) -> int:
    """Refuse queries whose longest prompt plus --max-tokens cannot fit the model's context;
    returns the longest prompt's length in tokens."""
    c = inputs.constitution
    longest = Constitution(c.name, tuple(
        Principle(p.name, *(2 * [max(p.positive, p.negative, key=len)])) for p in c.principles))
    text = longest.render(longest.positive_variant)
    biggest = 0
    for template in {inputs.generation_template, inputs.training_template, inputs.anchor_template} - {None}:
        for n, query in enumerate(inputs.queries, start=1):
            size = len(encode_prompt(tokenizer, template.fill(text, query), cfg.chat_template))
            biggest = max(biggest, size)
            if context and size + cfg.max_tokens > context:
                raise SamiError(
                    f"{cfg.queries}: query {n} makes a {size}-token prompt, which with --max-tokens "
                    f"{cfg.max_tokens} exceeds the model's {context}-token context; shorten it or lower --max-tokens"
                )
    return biggest


def check_memory(cfg: TrainConfig, inputs: RunInputs, model_config: dict, prompt_tokens: int,
                 float_bytes: int | None = None) -> float | None:
    """Estimated peak memory in GiB; refuses a run that cannot fit this machine unless --force.

    `float_bytes`: the loaded model's float width (fp32 on the CPU backend after `upcast_for_cpu`).
    """
    from .presets import GiB, ModelShape, RunShape, estimate_memory, fit, machine_memory

    try:
        shape = ModelShape.from_config(model_config)
    except Exception:  # an architecture the estimate does not know: no estimate, no refusal
        return None
    if shape is None:
        return None
    if float_bytes:
        shape = shape.in_float_bytes(float_bytes)
    est = estimate_memory(shape, RunShape.from_config(cfg, inputs.num_variants, prompt_tokens))
    machine = machine_memory()
    if fit(est.peak, machine) == "no" and not cfg.force:
        raise SamiError(
            f"--model {cfg.model}: this run needs about {est.peak / GiB:.1f} GiB ({est.summary()}) but this machine "
            f"has {machine.total / GiB:.1f} GiB; lower --queries-per-step or --max-tokens, add --grad-accumulation, "
            "or pass --force to try anyway"
        )
    return est.peak / GiB


def prepare_run_dir(cfg: TrainConfig) -> Path:
    """Create the run directory, refusing one that already holds a run."""
    out = Path(cfg.out).expanduser()
    if out.exists() and not out.is_dir():
        raise SamiError(f"--out {out}: is a file; choose a directory for the run")
    if (out / "metrics.jsonl").exists() or (out / "state.json").exists():
        raise SamiError(f"--out {out}: already holds a run; choose a new --out directory")
    out.mkdir(parents=True, exist_ok=True)
    return out


def train(cfg: TrainConfig, callbacks: Sequence[Callback] = (), should_stop: StopCheck | None = None,
          ranks: Ranks | None = None) -> TrainResult:
    """Run SAMI as configured; every event goes to metrics.jsonl and then to each callback.

    `should_stop` is polled after every optimizer step; when it returns True the run stops there,
    checkpointed and resumable. Started by mlx.launch, each process is one rank of a data-parallel
    run (`ranks`, by default the launcher's group): only rank 0 writes the run directory and calls
    the callbacks.
    """
    cfg = cfg.resolved()
    ranks = ranks or Ranks.world()
    inputs = prepare_inputs(cfg)
    model, tokenizer, model_config = load_model(cfg.model, cfg.trust_remote_code)
    longest = check_context(cfg, inputs, tokenizer, model_config.get("max_position_embeddings"))
    memory_gb = check_memory(cfg, inputs, model_config, longest, float_bytes(model))
    if not ranks.primary:
        out = Path(cfg.out).expanduser()
        return SamiLoop(cfg, inputs, model, tokenizer, out, _silent, should_stop, ranks).run(RunState())
    out = prepare_run_dir(cfg)
    with RunLock(out):
        atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        loop = SamiLoop(cfg, inputs, model, tokenizer, out, _emitter(out, callbacks), should_stop, ranks)
        loop.memory_estimate_gb = memory_gb
        return loop.run(RunState())


def resume(run_dir: str | Path, callbacks: Sequence[Callback] = (), should_stop: StopCheck | None = None,
           overrides: dict | None = None, ranks: Ranks | None = None) -> TrainResult:
    """Continue a stopped or killed run from its last completed step, as if it had never stopped.

    Every rank reads the run directory (rank 0 alone writes it), so with several machines it must
    be at the same path on each; the number of ranks may differ from the run's first launch.
    """
    ranks = ranks or Ranks.world()
    out = Path(run_dir).expanduser()
    if not (out / "config.yaml").is_file():
        where = f" on rank {ranks.rank}: every rank reads the run directory, so put it at the same path " \
                "on every host (a shared folder or a copy)" if ranks.size > 1 else "; is this a run directory?"
        raise SamiError(f"--resume {out}: no config.yaml there{where}")
    cfg = TrainConfig(**config_from_file(str(out / "config.yaml"))).resolved()
    for key, value in (overrides or {}).items():
        if key != "out" and getattr(cfg, key) != value:
            raise SamiError(f"--resume {out}: --{key.replace('_', '-')} {value} differs from the run's "
                            f"{getattr(cfg, key)} (config.yaml); drop the flag to resume")
    # No state.json yet: the run was stopped during its first sampling, so it starts from the top.
    state = RunState.load(out / "state.json") if (out / "state.json").exists() else RunState()
    if state.finished:
        raise SamiError(f"--resume {out}: the run already finished all {cfg.iterations} iterations")
    inputs = prepare_inputs(cfg)
    model, tokenizer, _ = load_model(cfg.model, cfg.trust_remote_code)
    if not ranks.primary:
        return SamiLoop(cfg, inputs, model, tokenizer, out, _silent, should_stop, ranks).run(state)
    with RunLock(out):
        loop = SamiLoop(cfg, inputs, model, tokenizer, out, _emitter(out, callbacks), should_stop, ranks)
        return loop.run(state)


def _emitter(out: Path, callbacks: Sequence[Callback]) -> Callback:
    def emit(event: ev.Event) -> None:
        if not isinstance(event, ev.SamplingProgress):
            append_jsonl(out / "metrics.jsonl", event.to_dict())
        for cb in callbacks:
            cb(event)

    return emit


def _silent(event: ev.Event) -> None:
    """Ranks other than 0 report nothing: rank 0 speaks for the run."""


class SamiLoop:
    """State of one run: the model with its adapters, the optimizer, the schedule position.

    With several ranks every rank holds the same adapters and optimizer state and walks the same
    schedule; they split each iteration's sampling and each step's groups, and sum gradients.
    """

    memory_estimate_gb: float | None = None  # from check_memory, shown when the run starts

    def __init__(self, cfg: TrainConfig, inputs: RunInputs, model, tokenizer, out: Path, emit: Callback,
                 should_stop: StopCheck | None = None, ranks: Ranks | None = None):
        self.cfg, self.inputs, self.model, self.tokenizer, self.out, self.emit = cfg, inputs, model, tokenizer, out, emit
        self.should_stop = should_stop or (lambda: False)
        self.ranks = ranks or Ranks()
        self.strategy = variant_strategy(cfg.variants)
        mx.random.seed(cfg.seed)
        self.adapter_config = attach_adapters(
            model, cfg.lora_rank, cfg.lora_scale, cfg.lora_dropout, cfg.lora_layers, cfg.lora_keys, cfg.dora
        )
        self.initial_adapters = adapter_weights(model)
        # Checkpointed layers re-run their forward pass, which would grow a KV cache twice.
        self.shared = cfg.scoring == "shared" and not cfg.grad_checkpoint and shared_scoring_supported(model)
        self.loss_and_grad = nn.value_and_grad(model, self._loss)
        self.step_fn = self._step_function()
        self.optimizer = self._make_optimizer()
        self.bad_steps = 0

    # ---- schedule -------------------------------------------------------------------------

    def run(self, state: RunState) -> TrainResult:
        with gradient_checkpointing(self.model, self.cfg.grad_checkpoint):
            return self._run(state)

    def _run(self, state: RunState) -> TrainResult:
        cfg, start = self.cfg, time.perf_counter()
        model = self.model
        model.eval()
        total_steps = sum(cfg.steps_in_iteration(t) for t in range(cfg.iterations))
        trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        if state.checkpoint:
            load_checkpoint(self.out, state, model, self.optimizer)
        # Every rank has read the run directory before rank 0 writes to it again.
        self.ranks.barrier("starting the run")
        if state.base_ppl is None:
            state.base_ppl = self.heldout_ppl()
        self.emit(ev.RunStarted(str(self.out), cfg.to_dict(), cfg.iterations, total_steps,
                                self.inputs.num_variants, trainable, state.base_ppl,
                                resumed_at_step=state.global_step, memory_estimate_gb=self.memory_estimate_gb))
        result = TrainResult(self.out, model, self.tokenizer, iterations=list(state.iterations))
        while state.iteration < cfg.iterations:
            if not self.iteration(state):
                result.stopped_early, result.reason = True, "cancelled"
                break
            summary = state.iterations[-1]
            result.iterations.append(summary)
            if cfg.max_ppl_ratio and summary["ppl_ratio"] > cfg.max_ppl_ratio:
                result.stopped_early = True
                result.reason = (
                    f"held-out perplexity reached {summary['ppl_ratio']:.2f}x the base model's "
                    f"(limit {cfg.max_ppl_ratio}); lower --learning-rate or add --kl-beta"
                )
                self.emit(ev.RunWarning(result.reason))
                break
        else:
            state.finished = True
            if self.ranks.primary:
                atomic_write_json(self.out / "state.json", state.to_dict())
        self.emit(ev.RunCompleted(str(self.out), time.perf_counter() - start, result.stopped_early, result.reason))
        return result

    def iteration(self, state: RunState) -> bool:
        """Run (or finish) iteration `state.iteration`; False if stopped by should_stop."""
        cfg, it = self.cfg, state.iteration
        steps = cfg.steps_in_iteration(it)
        if state.phase == "sampling":
            query_ids = self.queries_for_iteration(it, steps * cfg.queries_per_step)
            self.emit(ev.IterationStarted(it + 1, steps, len(query_ids)))
            self.ranks.at = f"iteration {it + 1}, sampling"
            # Data comes from the previous iteration's model (adapters as they stand now).
            self.model.eval()
            groups = self.sample(it, query_ids)
            if cfg.schedule == "paper":  # the paper re-initialises from the base model every iteration
                set_adapter_weights(self.model, self.initial_adapters)
                self.optimizer = self._make_optimizer()
            state.phase, state.step = "training", 0
            self.checkpoint(state)
        else:
            groups = self.load_samples(it)
        random.Random(f"train-{cfg.seed}-{it}").shuffle(groups)

        self.model.train()
        q = cfg.queries_per_step
        while state.step < steps:
            step = state.step
            self.ranks.at = f"iteration {it + 1}, step {step + 1}"
            batch = [groups[(step * q + n) % len(groups)] for n in range(q)]
            metrics = self.train_step(batch, random.Random(f"step-{cfg.seed}-{it}-{step}"),
                                      seed=_derived_seed(cfg.seed, it, step))
            state.step += 1
            state.global_step += 1
            if metrics is None:
                state.skipped_steps += 1
            self.checkpoint(state)
            if metrics is not None:
                self.emit(ev.StepCompleted(iteration=it + 1, step=step + 1, steps=steps,
                                           global_step=state.global_step, **metrics))
            if self.stop_requested() and state.step < steps:
                return False
        self.model.eval()
        self.ranks.at = f"iteration {it + 1}, end"
        primary = self.ranks.primary
        summary = self.iteration_summary(it)
        it_dir = self.out / f"iter-{it + 1:02d}"
        if primary:
            save_adapters(self.model, it_dir, self.adapter_config)
        fault_point("iteration-adapters")
        if primary:
            save_adapters(self.model, self.out, self.adapter_config)
        summary["heldout_ppl"] = ppl = self.heldout_ppl()
        summary["ppl_ratio"] = ppl / state.base_ppl
        state.iterations.append(summary)
        state.iteration, state.phase, state.step = it + 1, "sampling", 0
        self.checkpoint(state)
        self.emit(ev.IterationCompleted(iteration=it + 1, adapter_dir=str(it_dir), **summary))
        return not self.stop_requested() or state.iteration == cfg.iterations

    def checkpoint(self, state: RunState) -> None:
        """Rank 0 saves adapters, optimizer state and the schedule position; the others hold the same."""
        if self.ranks.primary:
            save_checkpoint(self.out, state, self.model, self.optimizer)

    def stop_requested(self) -> bool:
        """Poll should_stop; with several ranks, a stop seen by any rank stops them all at the same step."""
        return self.ranks.any(self.should_stop(), "agreeing whether to stop")

    def heldout_ppl(self) -> float:
        """Held-out perplexity of the model as it stands; ranks split the texts and add up the losses."""
        ranks = self.ranks
        if ranks.size == 1:
            return heldout_perplexity(self.model, self.tokenizer, self.inputs.heldout)
        nll, count = heldout_nll(self.model, self.tokenizer, self.inputs.heldout[ranks.rank :: ranks.size])
        nll, count = ranks.sum([nll, count], "measuring held-out perplexity")
        return math.exp(nll / max(count, 1))

    def iteration_summary(self, it: int) -> dict:
        """Mean loss, MI bound and accuracies over the iteration's logged steps (rank 0 keeps the log)."""
        log = read_jsonl(self.out / "metrics.jsonl") if self.ranks.primary else []
        rows = [r for r in log if r.get("event") == "StepCompleted" and r.get("iteration") == it + 1]
        keys = ("loss", "mi_bound", "row_accuracy", "column_accuracy")
        return {k: sum(r[k] for r in rows) / len(rows) if rows else float("nan") for k in keys}

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
        """A response per (query slot, variant); each rank samples its share of the slots and all
        ranks end with every group, so filtering and the step batches are the same everywhere."""
        cfg, inputs = self.cfg, self.inputs
        rng = random.Random(f"variants-{cfg.seed}-{it}")
        k = len(inputs.constitution.principles)
        specs = [(qi, sample_variants(self.strategy, k, rng)) for qi in query_ids]
        prompts = []
        for slot in self.ranks.shard(len(specs)):
            qi, variants = specs[slot]
            for v in variants:
                text = inputs.generation_template.fill(inputs.constitution.render(v), inputs.queries[qi])
                prompts.append(encode_prompt(self.tokenizer, text, cfg.chat_template))
        mx.random.seed(self.ranks.seed(cfg.seed * 1009 + it))
        t0 = time.perf_counter()
        gens = generate_batch(
            self.model, self.tokenizer, prompts, cfg.max_tokens, cfg.temperature, cfg.top_p,
            cfg.stop, cfg.gen_batch_size,
            on_progress=lambda done, total: self.emit(ev.SamplingProgress(it + 1, done, total)),
        )
        gens = self.gather_generations(gens, len(specs))
        seconds = time.perf_counter() - t0
        n = inputs.num_variants
        groups = [Group(qi, inputs.queries[qi], vs, gens[g * n : (g + 1) * n]) for g, (qi, vs) in enumerate(specs)]
        kept, drops = filter_groups(groups, cfg.banned)
        if self.ranks.primary:
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

    def gather_generations(self, gens: list[Generation], slots: int) -> list[Generation]:
        """Every rank's generations (its shard of `slots`, N each) in slot order, on every rank."""
        ranks = self.ranks
        if ranks.size == 1:
            return gens
        finish_codes = ("eos", "stop", "length")
        rows = [[finish_codes.index(g.finish), *g.tokens] for g in gens]
        per_rank = ranks.gather_lists(rows, "sharing the sampled responses")
        n, out = self.inputs.num_variants, []
        for slot in range(slots):
            rank, local = slot % ranks.size, slot // ranks.size
            for code, *tokens in per_rank[rank][local * n : (local + 1) * n]:
                out.append(Generation(tokens, self.tokenizer.decode(tokens), finish_codes[code]))
        return out

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

    def scoring_batch(self, groups: list[Group], rng: random.Random | None = None,
                      orders: list[list[int]] | None = None) -> ScoringBatch:
        """Training prompts for every variant of each group and the sampled response ids.

        Each group's principle order is drawn from `rng`, or given in `orders`.
        """
        cfg, c = self.cfg, self.inputs.constitution
        prompts, responses = [], []
        for n, g in enumerate(groups):
            # One shuffled order per group, so the rows of S differ only in the wordings.
            order = orders[n] if orders is not None else principle_order(len(c.principles), rng, cfg.shuffle_principles)
            prompts.append([
                encode_prompt(self.tokenizer, self.inputs.training_template.fill(c.render(v, order), g.query),
                              cfg.chat_template)
                for v in g.variants
            ])
            responses.append(self.response_ids(g))
        anchors = None
        if self.inputs.anchor_template is not None:
            anchors = [encode_prompt(self.tokenizer, self.inputs.anchor_template.fill("", g.query), cfg.chat_template)
                       for g in groups]
        return ScoringBatch(prompts, responses, anchors)

    def response_ids(self, g: Group) -> list[list[int]]:
        """The token ids each response is scored on (with its EOS under --count-eos)."""
        eos = self.tokenizer.eos_token_id
        return [gen.tokens + ([eos] if self.cfg.count_eos and gen.finish == "eos" else []) for gen in g.generations]

    def step_inputs(self, batch: ScoringBatch) -> dict[str, dict[str, mx.array]]:
        """The padded arrays one micro-batch's loss reads (lengths bucketed when the step is compiled)."""
        bucketed = self.cfg.compile
        inputs = {"scores": scoring_inputs(batch, self.shared, bucketed)}
        if self.cfg.kl_beta > 0:
            inputs["diagonal"] = batch.diagonal(bucketed).arrays()
        if self.cfg.anchor_beta > 0:
            inputs["anchored"] = batch.anchored(bucketed).arrays()
        return inputs

    def _loss(self, model, inputs: dict[str, dict[str, mx.array]], n: int, kl_tokens: mx.array):
        S = scores_from_inputs(model, inputs["scores"], n, self.shared)
        loss = sami_loss(S)
        kl = anchor = mx.array(0.0)
        if self.cfg.kl_beta > 0:
            kl = _kl_on(model, PairBatch(**inputs["diagonal"], shape=(0, n)), kl_tokens)
            loss = loss + self.cfg.kl_beta * kl
        if self.cfg.anchor_beta > 0:
            anchor = _kl_on(model, PairBatch(**inputs["anchored"], shape=(0, n)), kl_tokens)
            loss = loss + self.cfg.anchor_beta * anchor
        return loss, S, kl, anchor

    def _step_function(self) -> Callable:
        """(inputs, n, kl_tokens, training) -> ((loss, S, kl, anchor), gradients), compiled with
        --compile as mlx-lm compiles its SFT step: the model's arrays and the random state (dropout)
        are the traced state, and `training` is a constant so that train/eval mode retraces."""
        model = self.model

        def step(inputs, n: int, kl_tokens: mx.array, training: bool):
            return self.loss_and_grad(model, inputs, n, kl_tokens)

        if not self.cfg.compile:
            return step
        state = [model.state, mx.random.state]
        return mx.compile(step, inputs=state, outputs=state)

    def train_step(self, groups: list[Group], rng: random.Random, seed: int = 0) -> dict | None:
        """One optimizer step over `groups` in grad_accumulation micro-batches; None if it was skipped.

        With several ranks each scores its share of the groups and the weighted gradients are summed,
        so every rank applies the update one process would have computed from all the groups.
        """
        cfg, ranks = self.cfg, self.ranks
        mx.random.seed(ranks.seed(seed))  # dropout draws, so that a resumed run repeats them
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        ga, k = cfg.grad_accumulation, len(self.inputs.constitution.principles)
        parts = [list(range(len(groups)))[i::ga] for i in range(ga)]
        # Principle orders are drawn for every group, in one process's order, before taking a share.
        orders = {n: principle_order(k, rng, cfg.shuffle_principles) for part in parts for n in part}
        mine = set(ranks.shard(len(groups)))
        # The KL terms average over all the step's response tokens: each part divides its sum by that
        # count over its weight, so the weighted parts (and ranks) add up to one process's mean.
        step_tokens = sum(len(r) for g in groups for r in self.response_ids(g))
        grads, loss, kl, anchor, scores, tokens = None, 0.0, 0.0, 0.0, [], 0
        for part in ([n for n in part if n in mine] for part in parts):
            if not part:
                continue
            batch = self.scoring_batch([groups[n] for n in part], orders=[orders[n] for n in part])
            w = len(part) / len(groups)
            (part_loss, S, part_kl, part_anchor), g = self.step_fn(
                self.step_inputs(batch), batch.shape[1], mx.array(step_tokens * w), self.model.training)
            mx.eval(g)
            fault_point("scoring")
            g = tree_map(lambda x, w=w: x * w, g)
            grads = g if grads is None else tree_map(mx.add, grads, g)
            mx.eval(grads, part_loss, S, part_kl, part_anchor)
            loss += part_loss.item() * w
            kl += part_kl.item() * w
            anchor += part_anchor.item() * w
            scores.append(S)
            tokens += batch.num_tokens
        reduced = None
        if ranks.size > 1:
            grads, loss, kl, anchor, tokens, reduced = self.sum_over_ranks(
                grads, loss, kl, anchor, scores, tokens, len(groups))
        grad_norm = 0.0
        if cfg.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            grad_norm = norm.item()
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            return self._skip_step(loss)
        self.bad_steps = 0
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        fault_point("update")
        if reduced is None:
            S = mx.concatenate(scores, axis=0)
            row_acc, col_acc = accuracies(S)
            peak = mx.get_peak_memory() / 2**30  # GiB, as every memory figure
        else:
            row_acc, col_acc, peak = reduced
        seconds = time.perf_counter() - t0
        sami = loss - cfg.kl_beta * kl - cfg.anchor_beta * anchor
        return {
            "loss": sami, "mi_bound": mi_lower_bound(sami, self.inputs.num_variants), "row_accuracy": row_acc,
            "column_accuracy": col_acc, "kl": kl, "anchor_kl": anchor, "learning_rate": cfg.learning_rate,
            "grad_norm": grad_norm, "tokens_per_sec": tokens / max(seconds, 1e-9),
            "peak_memory_gb": peak, "scores": scores[0][0].tolist() if scores else [],
        }

    def sum_over_ranks(self, grads, loss: float, kl: float, anchor: float, scores: list[mx.array], tokens: int,
                       total: int):
        """Add up the ranks' weighted gradients, losses and counts; a rank with no groups adds zeros.

        Returns the global gradient, loss, the two KLs and tokens, and (row accuracy, column accuracy, peak GiB).
        The first group's score matrix stays on rank 0, the only rank that reports it.
        """
        ranks = self.ranks
        if grads is None:
            grads = tree_map(mx.zeros_like, self.model.trainable_parameters())
        grads = ranks.sum_gradients(grads, "summing gradients")
        rows = cols = 0
        if scores:
            S = mx.concatenate(scores, axis=0)
            idx = mx.arange(S.shape[1])
            rows = (mx.argmax(S, axis=2) == idx).sum().item()
            cols = (mx.argmax(S, axis=1) == idx).sum().item()
        per_rank = ranks.gather([loss, kl, anchor, tokens, rows, cols, mx.get_peak_memory() / 2**30],
                                "summing step metrics")
        loss, kl, anchor, tokens, rows, cols = (sum(r[i] for r in per_rank) for i in range(6))
        pairs = total * self.inputs.num_variants
        return grads, loss, kl, anchor, int(tokens), (rows / pairs, cols / pairs, max(r[6] for r in per_rank))

    def _skip_step(self, loss: float) -> None:
        """A NaN/inf loss or gradient: skip the update; several in a row end the run."""
        self.bad_steps += 1
        if self.bad_steps == 1:
            self.emit(ev.RunWarning(f"loss {loss} is not finite: step skipped (counted as skipped_steps)"))
        if self.bad_steps >= MAX_BAD_STEPS:
            raise RunAborted(
                f"{MAX_BAD_STEPS} steps in a row had a non-finite loss; the last good checkpoint is kept "
                f"in {self.out}; lower --learning-rate and resume, or start again"
            )
        return None

    def load_samples(self, it: int) -> list[Group]:
        """The kept groups of an iteration whose sampling finished before a stop."""
        path = self.out / f"iter-{it + 1:02d}" / "samples.jsonl"
        groups = []
        for row in read_jsonl(path):
            if row.get("kept"):
                variants = [Variant(tuple(c == "+" for c in label)) for label in row["variants"]]
                gens = [Generation(t, text, f) for t, text, f in zip(row["tokens"], row["responses"], row["finish"])]
                groups.append(Group(row["query_index"], row["query"], variants, gens))
        if not groups:
            raise SamiError(f"{path}: no sampled groups to resume from; the run directory is incomplete")
        return groups

    def _make_optimizer(self) -> optim.Optimizer:
        if self.cfg.optimizer == "rmsprop":
            return optim.RMSprop(learning_rate=self.cfg.learning_rate)
        return optim.AdamW(learning_rate=self.cfg.learning_rate, weight_decay=self.cfg.weight_decay)


@contextlib.contextmanager
def gradient_checkpointing(model: nn.Module, enabled: bool):
    """mlx-lm's grad_checkpoint patches the block class for the whole process: undo it afterwards."""
    if not enabled:
        yield
        return
    from mlx_lm.tuner.trainer import grad_checkpoint

    cls = type(model.layers[0])
    original = cls.__call__
    grad_checkpoint(model.layers[0])
    try:
        yield
    finally:
        cls.__call__ = original


def _kl_on(model: nn.Module, pairs, tokens: float | None = None) -> mx.array:
    """Per-token KL(policy || base) over the response tokens of `pairs`, summed and divided by
    `tokens` (default: their count); the base is the model with its adapters switched off."""
    _, logits = token_logprobs(model, pairs.inputs, pairs.targets)
    with adapters_disabled(model):
        base_logits = mx.stop_gradient(model(pairs.inputs).astype(mx.float32))
    return kl_to_base(logits, base_logits, pairs.mask, tokens)


def heldout_perplexity(model: nn.Module, tokenizer, texts: list[tuple[str, str]], max_len: int = 256,
                       batch: int = 8) -> float:
    """Perplexity of held-out text (after its prompt, if any) that the loss never trains on."""
    nll, count = heldout_nll(model, tokenizer, texts, max_len, batch)
    return math.exp(nll / max(count, 1))


def heldout_nll(model: nn.Module, tokenizer, texts: list[tuple[str, str]], max_len: int = 256,
                batch: int = 8) -> tuple[float, int]:
    """Summed negative log-likelihood of the held-out texts' tokens, and how many tokens."""
    nll, count = 0.0, 0
    rows = []
    for prompt, text in texts:
        ids = tokenizer.encode(prompt + text)[:max_len]
        start = len(tokenizer.encode(prompt)) if prompt else 1
        if len(ids) > start:
            rows.append((ids, start))
    for i in range(0, len(rows), batch):
        chunk = rows[i : i + batch]
        L = max(len(ids) for ids, _ in chunk)
        arr = mx.array([ids + [0] * (L - len(ids)) for ids, _ in chunk])
        pos = mx.arange(1, L)[None, :]
        mask = (pos >= mx.array([s for _, s in chunk])[:, None]) & (pos < mx.array([len(ids) for ids, _ in chunk])[:, None])
        ce = nn.losses.cross_entropy(model(arr[:, :-1]).astype(mx.float32), arr[:, 1:]) * mask
        nll += ce.sum().item()
        count += int(mask.sum().item())
    return nll, count


def _example(g: Group) -> dict:
    return {"query": g.query, "variants": [v.label for v in g.variants],
            "responses": [gen.text for gen in g.generations]}
