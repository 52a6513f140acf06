"""The SAMI loop: sample -> score -> train -> checkpoint, reporting only through events."""

from __future__ import annotations

import contextlib
import dataclasses
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

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig, config_from_file
from sami_mlx.errors import RunAborted, SamiError
from sami_mlx.fileio import (
    append_jsonl,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    read_jsonl,
    read_text,
)
from sami_mlx.inputs.constitution import (
    Constitution,
    Principle,
    Variant,
    load_constitution,
    num_variants,
    principle_order,
    sample_variants,
    variant_orders,
    variant_strategy,
)
from sami_mlx.inputs.prompts import Template, encode_prompt, encode_with_prefix, load_template
from sami_mlx.inputs.queries import load_queries
from sami_mlx.loop.adapters import (
    adapter_weights,
    adapters_disabled,
    attach_adapters,
    save_adapter_weights,
    save_adapters,
    set_adapter_weights,
)
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.faults import fault_point
from sami_mlx.loop.monitor import KINDS as MONITOR_KINDS
from sami_mlx.loop.monitor import Answer, Probe, answer_of, answer_stats, drift, mean_nll
from sami_mlx.loop.rollout import (
    DropCounts,
    Generation,
    Group,
    filter_groups,
    generate_batch,
    sample_stats,
)
from sami_mlx.loop.runstate import RunLock, RunState, load_checkpoint, save_checkpoint
from sami_mlx.loop.scoring import (
    PairBatch,
    ScoringBatch,
    kl_to_base,
    score_matrix,
    scores_from_inputs,
    scoring_inputs,
    shared_scoring_supported,
    token_logprobs,
)
from sami_mlx.model import float_bytes, load_model
from sami_mlx.objective import accuracies, mi_lower_bound, sami_loss

Callback = Callable[[ev.Event], None]
StopCheck = Callable[[], bool]
HELDOUT_TEXTS = 32
MAX_BAD_STEPS = 3
HEALTHY = "healthy"  # RUN/healthy/: the adapters of the last step the monitor passed inside an iteration
MONITOR_EXTRA = ("heldout_mi", "mean_length", "limit_rate", "distinct_2", "repetition", "ppl_ratio")


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
    monitor_ids: list[int] = field(default_factory=list)  # queries held out for the degeneration monitor
    train_ids: list[int] = field(default_factory=list)  # the rest, in the order the splits take them


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    tokenizer: object
    iterations: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    reason: str = ""
    kept: dict | None = None  # which adapters RUN/adapters.safetensors (and `model`) hold, and why


def prepare_inputs(cfg: TrainConfig) -> RunInputs:
    """Load and validate the constitution, queries, templates and held-out text."""
    constitution = load_constitution(cfg.constitution)
    n = num_variants(variant_strategy(cfg.variants), len(constitution.principles))
    queries = load_queries(cfg.queries)
    heldout = load_heldout(cfg.heldout) if cfg.heldout else []
    if cfg.heldout and not heldout:
        raise SamiError(f"{cfg.heldout}: no text found; give plain text paragraphs for the perplexity check")
    order = list(range(len(queries)))
    random.Random(f"splits-{cfg.seed}").shuffle(order)
    held = min(cfg.monitor_queries, len(queries) // 4)  # three in four queries at least stay for training
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
        order[:held],
        order[held:],
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
    longest = Constitution(
        c.name, tuple(Principle(p.name, *(2 * [max(p.positive, p.negative, key=len)])) for p in c.principles)
    )
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


def check_memory(
    cfg: TrainConfig, inputs: RunInputs, model_config: dict, prompt_tokens: int, float_bytes: int | None = None
) -> float | None:
    """Estimated peak memory in GiB; refuses a run that cannot fit this machine unless --force.

    `float_bytes`: the loaded model's float width (fp32 on the CPU backend after `upcast_for_cpu`).
    """
    from sami_mlx.memory import GiB, ModelShape, RunShape, estimate_memory, fit, machine_memory

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


def train(
    cfg: TrainConfig,
    callbacks: Sequence[Callback] = (),
    should_stop: StopCheck | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
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


def resume(
    run_dir: str | Path,
    callbacks: Sequence[Callback] = (),
    should_stop: StopCheck | None = None,
    overrides: dict | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Continue a stopped or killed run from its last completed step, as if it had never stopped.

    Every rank reads the run directory (rank 0 alone writes it), so with several machines it must
    be at the same path on each; the number of ranks may differ from the run's first launch.
    """
    ranks = ranks or Ranks.world()
    out = Path(run_dir).expanduser()
    if not (out / "config.yaml").is_file():
        where = (
            f" on rank {ranks.rank}: every rank reads the run directory, so put it at the same path "
            "on every host (a shared folder or a copy)"
            if ranks.size > 1
            else "; is this a run directory?"
        )
        raise SamiError(f"--resume {out}: no config.yaml there{where}")
    cfg = TrainConfig(**config_from_file(str(out / "config.yaml"))).resolved()
    for key, value in (overrides or {}).items():
        if key != "out" and getattr(cfg, key) != value:
            raise SamiError(
                f"--resume {out}: --{key.replace('_', '-')} {value} differs from the run's "
                f"{getattr(cfg, key)} (config.yaml); drop the flag to resume"
            )
    # No state.json yet: the run was stopped during its first sampling, so it starts from the top.
    state = RunState.load(out / "state.json") if (out / "state.json").exists() else RunState()
    if state.finished and state.stopped:
        raise SamiError(
            f"--resume {out}: the degeneration monitor ended this run ({state.stopped.split(';')[0]}); "
            "start a new run with a lower --learning-rate"
        )
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
        if not isinstance(event, (ev.SamplingProgress, ev.StageProgress)):  # progress only, not metrics
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

    def __init__(
        self,
        cfg: TrainConfig,
        inputs: RunInputs,
        model,
        tokenizer,
        out: Path,
        emit: Callback,
        should_stop: StopCheck | None = None,
        ranks: Ranks | None = None,
    ):
        self.cfg, self.inputs, self.model, self.tokenizer, self.out, self.emit = (
            cfg,
            inputs,
            model,
            tokenizer,
            out,
            emit,
        )
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
        self.probe: Probe | None = None  # the monitor's held-out answers (None: monitor off)
        self.problem = ""  # what the last monitor check found wrong
        self.snapshots: dict[str, dict] = {}  # adapters this process saved, by folder (iter-NN, healthy)

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
        self.probe = self.start_monitor()
        if self.inputs.heldout and state.base_ppl is None:
            state.base_ppl = self.heldout_ppl()
        probe = self.probe
        self.emit(
            ev.RunStarted(
                str(self.out),
                cfg.to_dict(),
                cfg.iterations,
                total_steps,
                self.inputs.num_variants,
                trainable,
                state.base_ppl,
                resumed_at_step=state.global_step,
                memory_estimate_gb=self.memory_estimate_gb,
                monitor_queries=len(probe.query_ids) if probe else 0,
                base_heldout_mi=probe.base_mi if probe else None,
            )
        )
        result = TrainResult(self.out, model, self.tokenizer)
        while state.iteration < cfg.iterations:
            outcome = self.iteration(state)
            if outcome != "done":
                result.stopped_early = True
                result.reason = "cancelled" if outcome == "cancelled" else state.stopped
                break
        else:
            state.finished = True
            self.keep_adapters(state)
            if self.ranks.primary:
                atomic_write_json(self.out / "state.json", state.to_dict())
        if state.finished:
            self.load_kept(state)
        result.iterations, result.kept = list(state.iterations), state.kept
        self.emit(
            ev.RunCompleted(
                str(self.out),
                time.perf_counter() - start,
                result.stopped_early,
                result.reason,
                adapters=(state.kept or {}).get("name", ""),
                kept=describe_kept(state.kept),
            )
        )
        return result

    def iteration(self, state: RunState) -> str:
        """Run (or finish) iteration `state.iteration`: 'done', 'cancelled' (should_stop), or
        'degenerated' (the monitor tripped: the run ended with the last healthy adapters kept)."""
        cfg, it = self.cfg, state.iteration
        steps = cfg.steps_in_iteration(it)
        if state.phase == "sampling":
            self.emit(ev.IterationStarted(it + 1, steps, steps * cfg.queries_per_step))
            self.ranks.at = f"iteration {it + 1}, sampling"
            # Data comes from the previous iteration's model (adapters as they stand now).
            self.model.eval()
            groups = self.sample(it, steps * cfg.queries_per_step, state)
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
            # Groups repeat only when the query split ran out (sample() warned).
            batch = [groups[(step * q + n) % len(groups)] for n in range(q)]
            metrics = self.train_step(
                batch, random.Random(f"step-{cfg.seed}-{it}-{step}"), seed=_derived_seed(cfg.seed, it, step)
            )
            state.step += 1
            state.global_step += 1
            if metrics is None:
                state.skipped_steps += 1
            completed = (
                None
                if metrics is None
                else ev.StepCompleted(
                    iteration=it + 1, step=step + 1, steps=steps, global_step=state.global_step, **metrics
                )
            )
            if self.probe and cfg.monitor_every and state.step % cfg.monitor_every == 0 and state.step < steps:
                # Checked before the step is checkpointed, so that a resumed run repeats the check.
                if not self.mid_iteration_check(state):
                    if completed is not None:
                        self.emit(completed)
                    self.roll_back(state, it + 1, state.step)
                    return "degenerated"
            self.checkpoint(state)
            if completed is not None:
                self.emit(completed)
            if self.stop_requested() and state.step < steps:
                return "cancelled"
        self.model.eval()
        self.ranks.at = f"iteration {it + 1}, end"
        summary = {"iteration": it + 1, "step": steps, "adapters": f"iter-{it + 1:02d}", **self.iteration_summary(it)}
        it_dir = self.out / summary["adapters"]
        self.snapshots[summary["adapters"]] = {k: mx.array(v) for k, v in adapter_weights(self.model).items()}
        if self.ranks.primary:
            save_adapters(self.model, it_dir, self.adapter_config)
        fault_point("iteration-adapters")
        summary.update(self.full_check(state, it + 1, steps))
        state.iterations.append(summary)
        state.iteration, state.phase, state.step = it + 1, "sampling", 0
        event = ev.IterationCompleted(adapter_dir=str(it_dir), **_fields_of(ev.IterationCompleted, summary))
        if not summary["healthy"]:
            self.emit(event)
            self.roll_back(state, it + 1, steps)
            return "degenerated"
        state.healthy = {"iteration": it + 1, "step": steps}
        self.keep_adapters(state)  # the best so far, so that a kill leaves it in place
        self.checkpoint(state)
        self.emit(event)
        return "done" if not self.stop_requested() or state.iteration == cfg.iterations else "cancelled"

    def checkpoint(self, state: RunState) -> None:
        """Rank 0 saves adapters, optimizer state and the schedule position; the others hold the same."""
        if self.ranks.primary:
            save_checkpoint(self.out, state, self.model, self.optimizer)

    def stop_requested(self) -> bool:
        """Poll should_stop; with several ranks, a stop seen by any rank stops them all at the same step."""
        return self.ranks.any(self.should_stop(), "agreeing whether to stop")

    def heldout_ppl(self) -> float:
        """Perplexity of the --heldout text as the model stands; ranks split the texts and add up the losses."""
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

    # ---- the degeneration monitor ---------------------------------------------------------

    def start_monitor(self) -> Probe | None:
        """The base model's answers to the held-out queries: read back from RUN/monitor.json on
        resume, else sampled now with the adapters off and a seed every rank shares."""
        cfg, inputs = self.cfg, self.inputs
        if not inputs.monitor_ids:
            if cfg.monitor_queries:
                self.emit(
                    ev.RunWarning(
                        f"{cfg.queries}: too few queries to hold {cfg.monitor_queries} out for "
                        "the degeneration monitor (it needs 4 or more); the monitor is off"
                    )
                )
            return None
        path = self.out / "monitor.json"
        if path.is_file():
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                return Probe.load(path)  # else torn by a kill: sampled again below, identically
        self.emit(ev.StageProgress("monitor: base answers", 0, 1))
        rng = random.Random(f"monitor-variants-{cfg.seed}")
        k = len(inputs.constitution.principles)
        variants = [sample_variants(self.strategy, k, rng) for _ in inputs.monitor_ids]
        prompted = [
            self.generation_prompt(v, inputs.queries[qi]) for qi, vs in zip(inputs.monitor_ids, variants) for v in vs
        ]
        plain = [self.plain_prompt(inputs.queries[qi]) for qi in inputs.monitor_ids]
        eos = self.tokenizer.eos_token_id
        with adapters_disabled(self.model):
            gens = self.monitor_generate(prompted + plain, _derived_seed(cfg.seed, 7))
            probe = Probe(
                list(inputs.monitor_ids),
                [[v.label for v in vs] for vs in variants],
                [Answer(p, answer_of(g, eos)) for p, g in zip(prompted, gens)],
                [Answer(p, answer_of(g, eos)) for p, g in zip(plain, gens[len(prompted) :])],
                {},
            )
            probe.base_nll = {kind: mean_nll(self.model, getattr(probe, kind)) for kind in MONITOR_KINDS}
            probe.base_mi = self.heldout_mi(probe, gens[: len(prompted)])
        if self.ranks.primary:
            probe.save(path)
        self.emit(ev.StageProgress("monitor: base answers", 1, 1))
        return probe

    def generation_ids(self, variant: Variant, query: str, order: list[int] | None = None) -> tuple[list, list]:
        """The generation prompt's ids and the --response-prefix ids that follow it."""
        text = self.inputs.generation_template.fill(self.inputs.constitution.render(variant, order), query)
        return encode_with_prefix(self.tokenizer, text, self.cfg.response_prefix, self.cfg.chat_template)

    def generation_prompt(self, variant: Variant, query: str) -> list[int]:
        """What the model answers under `variant` (the forced response prefix included), in file order."""
        ids, prefix = self.generation_ids(variant, query)
        return ids + prefix

    def plain_prompt(self, query: str) -> list[int]:
        """The prompt with no constitution: the anchor's template, else the training template left empty."""
        template = self.inputs.anchor_template or self.inputs.training_template
        return encode_prompt(self.tokenizer, template.fill("", query), self.cfg.chat_template)

    def monitor_generate(self, prompts: list[list[int]], seed: int) -> list[Generation]:
        """The monitor's sampling: the run's settings, and a seed that is the same on every rank."""
        cfg = self.cfg
        mx.random.seed(seed)
        return generate_batch(
            self.model,
            self.tokenizer,
            prompts,
            cfg.max_tokens,
            cfg.temperature,
            cfg.top_p,
            cfg.stop,
            cfg.gen_batch_size,
        )

    def heldout_mi(self, probe: Probe, gens: list[Generation]) -> float | None:
        """log N - SAMI loss of the model's own answers to the held-out queries (groups with an empty
        answer left out): what training raises, measured on queries it never saw."""
        n, c = self.inputs.num_variants, self.inputs.constitution
        groups = [
            Group(qi, self.inputs.queries[qi], [_variant(v) for v in labels], gens[i * n : (i + 1) * n])
            for i, (qi, labels) in enumerate(zip(probe.query_ids, probe.variants))
        ]
        groups = [g for g in groups if all(gen.tokens for gen in g.generations)]
        if not groups:
            return None
        order = list(range(len(c.principles)))  # file order, as at evaluation
        batch = self.scoring_batch(groups, orders=[order] * len(groups))
        S = score_matrix(self.model, ScoringBatch(batch.prompts, batch.responses), shared=self.cfg.scoring == "shared")
        return mi_lower_bound(sami_loss(S).item(), n)

    def verdict(self, drifts: dict[str, float], ppl_ratio: float | None) -> str:
        """'' when healthy, else what went past --max-ppl-ratio, in words; every rank agrees."""
        cfg, problem = self.cfg, ""
        limit = cfg.max_ppl_ratio
        # With the constitution SAMI is meant to move the model, so that drift has a looser limit;
        # --max-ppl-ratio off turns both guards off.
        limits = {"plain": limit, "prompted": cfg.max_prompted_ratio if limit is not None else None}
        for kind, value in drifts.items():
            if limits[kind] is not None and not (math.isfinite(value) and value <= limits[kind]):
                where = "with the constitution" if kind == "prompted" else "without a constitution"
                problem = problem or (
                    f"the base model's held-out answers ({where}) became {value:.2f}x less "
                    f"likely (perplexity ratio; limit {limits[kind]:g}x)"
                )
        if limit is not None:
            if ppl_ratio is not None and not (math.isfinite(ppl_ratio) and ppl_ratio <= limit):
                problem = problem or f"--heldout text perplexity reached {ppl_ratio:.2f}x the base's (limit {limit:g}x)"
        tripped = self.ranks.any(bool(problem), "agreeing on the drift check")
        return (problem or "another rank's drift check failed") if tripped else ""

    def mid_iteration_check(self, state: RunState) -> bool:
        """Drift only (forward passes, no sampling); a healthy step becomes the one to roll back to."""
        self.model.eval()
        drifts = drift(self.model, self.probe)
        self.problem = self.verdict(drifts, None)
        it, step = state.iteration + 1, state.step
        self.emit(
            ev.MonitorChecked(
                iteration=it,
                step=step,
                drift_prompted=drifts["prompted"],
                drift_plain=drifts["plain"],
                healthy=not self.problem,
                limit=self.cfg.max_ppl_ratio,
            )
        )
        self.model.train()
        if self.problem:
            return False
        # Every rank keeps the step in memory (rank 0 alone writes RUN/healthy/, maybe on another Mac).
        self.snapshots[HEALTHY] = {k: mx.array(v) for k, v in adapter_weights(self.model).items()}
        if self.ranks.primary:
            save_adapters(self.model, self.out / HEALTHY, self.adapter_config)
        state.healthy = {"iteration": it, "step": step}
        return True

    def full_check(self, state: RunState, iteration: int, step: int) -> dict:
        """The monitor at an iteration's end: drift, the model's own held-out answers (length, token
        limit, distinct-2, repetition) and their MI bound, and the --heldout text's perplexity."""
        out: dict = {}
        if self.inputs.heldout:
            out["heldout_ppl"] = ppl = self.heldout_ppl()
            out["ppl_ratio"] = ppl / state.base_ppl
        drifts = {}
        if self.probe:
            probe = self.probe
            prompts = [a.prompt for a in probe.prompted] + [a.prompt for a in probe.plain]
            gens = self.monitor_generate(prompts, _derived_seed(self.cfg.seed, 11, iteration, step))
            drifts = drift(self.model, probe)
            out.update(
                drift_prompted=drifts["prompted"],
                drift_plain=drifts["plain"],
                heldout_mi=self.heldout_mi(probe, gens[: len(probe.prompted)]),
                **answer_stats(gens),
            )
        self.problem = self.verdict(drifts, out.get("ppl_ratio"))
        out["healthy"] = not self.problem
        self.emit(
            ev.MonitorChecked(
                iteration=iteration,
                step=step,
                drift_prompted=out.get("drift_prompted"),
                drift_plain=out.get("drift_plain"),
                healthy=out["healthy"],
                limit=self.cfg.max_ppl_ratio,
                **_fields_of(ev.MonitorChecked, out, MONITOR_EXTRA),
            )
        )
        return out

    def keep_adapters(self, state: RunState) -> None:
        """Put in RUN/adapters.safetensors the healthy iteration --keep chooses (the best held-out MI
        bound, or the last); the initial (identity) adapters, i.e. the base model, if none was healthy."""
        healthy = [s for s in state.iterations if s.get("healthy", True)]
        chosen = None
        if healthy and (self.cfg.keep == "last" or all(s.get("heldout_mi") is None for s in healthy)):
            chosen = healthy[-1]
        elif healthy:
            chosen = max(
                healthy,
                key=lambda s: (
                    -math.inf if s.get("heldout_mi") is None else s["heldout_mi"],
                    s["iteration"],
                    s["step"],
                ),
            )
        state.kept = (
            {"name": "base", "rule": self.cfg.keep}
            if chosen is None
            else {
                "name": _checkpoint_name(chosen),
                "rule": self.cfg.keep,
                **{k: chosen.get(k) for k in ("iteration", "step", "adapters", "heldout_mi")},
            }
        )
        if not self.ranks.primary:
            return
        if chosen is None:
            save_adapter_weights(self.initial_adapters, self.out, self.adapter_config)
            return
        for name in ("adapters.safetensors", "adapter_config.json"):
            atomic_write_bytes(self.out / name, (self.out / chosen["adapters"] / name).read_bytes())

    def load_kept(self, state: RunState) -> None:
        """The model a finished run returns holds the kept adapters, as RUN/adapters.safetensors does."""
        source = (state.kept or {}).get("adapters")
        weights = self.initial_adapters if source is None else self.snapshot(source)
        if weights is not None:  # else a rank on another Mac, resumed: its returned model is not the kept one
            set_adapter_weights(self.model, weights)

    def snapshot(self, source: str) -> dict | None:
        """Adapters saved in RUN/<source>, from memory (this process saved them) or from disk."""
        if source in self.snapshots:
            return self.snapshots[source]
        path = self.out / source / "adapters.safetensors"
        return dict(mx.load(str(path))) if path.is_file() else None

    def roll_back(self, state: RunState, iteration: int, step: int) -> None:
        """The monitor tripped at `step` of `iteration`: end the run with the best healthy adapters,
        a healthy step of this iteration among them (measured in full first, as an iteration's end)."""
        self.model.eval()
        h = state.healthy
        weights = self.snapshot(HEALTHY) if h and h["iteration"] == iteration and h["step"] < step else None
        # The full check talks to the other ranks: all of them measure the healthy step, or none does.
        if not self.ranks.any(weights is None, "agreeing on the step to roll back to"):
            set_adapter_weights(self.model, weights)
            problem = self.problem
            partial = {
                "iteration": iteration,
                "step": h["step"],
                "adapters": HEALTHY,
                "partial": True,
                **self.full_check(state, iteration, h["step"]),
            }
            state.iterations.append(partial)
            self.problem = problem
        self.keep_adapters(state)
        state.stopped = (
            f"stopped at iteration {iteration}, step {step}: {self.problem}; RUN/adapters.safetensors "
            f"holds {state.kept['name']}{describe_kept(state.kept, ' (', ')')}. Lower --learning-rate "
            "or raise --kl-beta / --anchor-beta"
        )
        state.finished = True
        self.emit(ev.RunWarning(state.stopped))
        if self.ranks.primary:
            atomic_write_json(self.out / "state.json", state.to_dict())
        self.load_kept(state)

    # ---- sampling -------------------------------------------------------------------------

    def query_split(self, it: int) -> tuple[int, list[int]]:
        """(split number, its query ids in order): the paper alternates two disjoint halves of the
        training queries; `continue` walks through all of them. Monitor queries are never in a split."""
        order = list(self.inputs.train_ids)
        if self.cfg.schedule == "paper" and len(order) >= 2:
            return it % 2, order[it % 2 :: 2]
        return 0, order

    def sample(self, it: int, count: int, state: RunState | None = None, split: list[int] | None = None) -> list[Group]:
        """`count` usable groups for iteration `it`: queries are taken in turn from the iteration's
        split (or the given `split` of query ids), and degenerate groups (dropped) are replaced by
        sampling more queries, as the reference does, until the split runs out; only then do groups
        repeat (and the run says so)."""
        cfg = self.cfg
        split_no, offset = 0, 0
        if split is None:
            split_no, split = self.query_split(it)
            offset = state.split_offsets[split_no] % len(split) if state else 0
        rng = random.Random(f"variants-{cfg.seed}-{it}")
        order_rng = random.Random(f"generation-order-{cfg.seed}-{it}")
        mx.random.seed(self.ranks.seed(cfg.seed * 1009 + it))
        groups: list[Group] = []
        kept: list[Group] = []
        drops = DropCounts()
        t0 = time.perf_counter()
        while len(kept) < count and len(groups) < len(split):
            need = count - len(kept)
            # The first wave asks for exactly what is needed; later ones for enough at the rate seen.
            rate = len(kept) / len(groups) if groups else 1.0
            wave = min(len(split) - len(groups), math.ceil(need / max(rate, 0.1)))
            ids = [split[(offset + len(groups) + n) % len(split)] for n in range(wave)]
            new, prefixes = self.sample_groups(it, ids, rng, order_rng, len(groups), count)
            new_kept, new_drops = filter_groups(
                new, cfg.banned, cfg.drop_truncated, cfg.sentence_end, cfg.sentence_end_marks
            )
            if cfg.response_prefix:  # filtered on what the model wrote; scored and judged with the forced start
                for slot, g in enumerate(new):
                    toks = [prefixes[slot, j] + x.tokens for j, x in enumerate(g.generations)]
                    g.generations = [
                        Generation(t, self.tokenizer.decode(t), x.finish) for t, x in zip(toks, g.generations)
                    ]
            groups += new
            kept += new_kept
            drops = _add_counts(drops, new_drops)
        seconds = time.perf_counter() - t0
        kept = kept[:count]  # the last wave may overshoot: the surplus stays in samples.jsonl, unused
        if state is not None:
            state.split_offsets[split_no] = (offset + len(groups)) % len(split)
        if self.ranks.primary:
            self.write_samples(it, groups, kept)
        stats = sample_stats(groups, seconds)
        repeated = max(count - len(kept), 0)
        self.emit(
            ev.SamplesReady(
                iteration=it + 1,
                groups=len(kept),
                dropped_empty=drops.empty,
                dropped_identical=drops.identical,
                dropped_banned=drops.banned,
                dropped_truncated=drops.truncated,
                dropped_unfinished=drops.unfinished,
                mean_length=stats.mean_length,
                no_eos_rate=stats.no_eos_rate,
                distinct_2=stats.distinct_2,
                tokens_per_sec=stats.tokens / max(seconds, 1e-9),
                examples=[_example(g) for g in kept[:3]],
                queries_sampled=len(groups),
                repeated=repeated,
                repetition=stats.repetition,
            )
        )
        if not kept:
            raise RunAborted(
                f"iteration {it + 1}: all {len(groups)} sampled groups were degenerate "
                f"({drops.empty} empty, {drops.identical} identical, {drops.banned} banned, "
                f"{drops.truncated} truncated, {drops.unfinished} without a sentence end); "
                "try --temperature 0.7, other --stop strings or another template"
            )
        if repeated:
            self.emit(
                ev.RunWarning(
                    f"iteration {it + 1}: the query split has {len(split)} queries and {len(kept)} usable groups for "
                    f"{count} step slots, so {repeated} slots repeat a group; give more queries or fewer --steps"
                )
            )
        return kept

    def sample_groups(
        self, it: int, query_ids: list[int], rng: random.Random, order_rng: random.Random, done: int, target: int
    ) -> tuple[list[Group], dict]:
        """A response per (query, variant), and the --response-prefix ids of each (slot, variant).
        Each rank samples its share of the queries and all ranks end with every group, so filtering
        and the step batches are the same everywhere."""
        cfg, inputs = self.cfg, self.inputs
        k = len(inputs.constitution.principles)
        specs = [(qi, sample_variants(self.strategy, k, rng)) for qi in query_ids]
        # File order, or (--shuffle-generation) one order per query group shared by its variants, drawn
        # for every slot in one process's order so that ranks and a resumed run draw the same.
        orders = [principle_order(k, order_rng, cfg.shuffle_generation) for _ in specs]
        mine = set(self.ranks.shard(len(specs)))
        prompts, prefixes = [], {}  # prefixes: every slot's, as every rank keeps every group
        for slot in range(len(specs)) if cfg.response_prefix else sorted(mine):
            qi, variants = specs[slot]
            for j, v in enumerate(variants):
                ids, prefixes[slot, j] = self.generation_ids(v, inputs.queries[qi], orders[slot])
                if slot in mine:
                    prompts.append(ids + prefixes[slot, j])
        n = inputs.num_variants
        gens = generate_batch(
            self.model,
            self.tokenizer,
            prompts,
            cfg.max_tokens,
            cfg.temperature,
            cfg.top_p,
            cfg.stop,
            cfg.gen_batch_size,
            # Progress over the iteration's slots; waves that replace dropped groups push the total up.
            on_progress=lambda d, t: self.emit(
                ev.SamplingProgress(
                    it + 1, (done * n + d * self.ranks.size), max(target * n, (done * n + t * self.ranks.size))
                )
            ),
        )
        gens = self.gather_generations(gens, len(specs))
        groups = [Group(qi, inputs.queries[qi], vs, gens[g * n : (g + 1) * n]) for g, (qi, vs) in enumerate(specs)]
        return groups, prefixes

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
            lines.append(
                json.dumps(
                    {
                        **_example(g),
                        "query_index": g.query_index,
                        "tokens": [gen.tokens for gen in g.generations],
                        "finish": [gen.finish for gen in g.generations],
                        "kept": id(g) in kept_ids,
                    },
                    ensure_ascii=False,
                )
            )
        atomic_write_text(self.out / f"iter-{it + 1:02d}" / "samples.jsonl", "\n".join(lines) + "\n")

    # ---- training -------------------------------------------------------------------------

    def scoring_batch(
        self, groups: list[Group], rng: random.Random | None = None, orders: list[list[int]] | None = None
    ) -> ScoringBatch:
        """Training prompts for every variant of each group and the sampled response ids.

        Each group's principle order is drawn from `rng`, or given in `orders`.
        """
        cfg, c = self.cfg, self.inputs.constitution
        prompts, responses = [], []
        for n, g in enumerate(groups):
            order = orders[n] if orders is not None else principle_order(len(c.principles), rng, cfg.shuffle_principles)
            # Each constitution of the group in its own order, as the reference shuffles each separately.
            per_variant = variant_orders(order, len(g.variants), f"{cfg.seed}-{g.query_index}", cfg.shuffle_principles)
            prompts.append(
                [
                    encode_prompt(
                        self.tokenizer, self.inputs.training_template.fill(c.render(v, o), g.query), cfg.chat_template
                    )
                    for v, o in zip(g.variants, per_variant)
                ]
            )
            responses.append(self.response_ids(g))
        anchors = None
        if self.inputs.anchor_template is not None:
            anchors = [
                encode_prompt(self.tokenizer, self.inputs.anchor_template.fill("", g.query), cfg.chat_template)
                for g in groups
            ]
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
                self.step_inputs(batch), batch.shape[1], mx.array(step_tokens * w), self.model.training
            )
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
                grads, loss, kl, anchor, scores, tokens, len(groups)
            )
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
            "loss": sami,
            "mi_bound": mi_lower_bound(sami, self.inputs.num_variants),
            "row_accuracy": row_acc,
            "column_accuracy": col_acc,
            "kl": kl,
            "anchor_kl": anchor,
            "learning_rate": cfg.learning_rate,
            "grad_norm": grad_norm,
            "tokens_per_sec": tokens / max(seconds, 1e-9),
            "peak_memory_gb": peak,
            "scores": scores[0][0].tolist() if scores else [],
        }

    def sum_over_ranks(
        self, grads, loss: float, kl: float, anchor: float, scores: list[mx.array], tokens: int, total: int
    ):
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
        per_rank = ranks.gather(
            [loss, kl, anchor, tokens, rows, cols, mx.get_peak_memory() / 2**30], "summing step metrics"
        )
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


def heldout_perplexity(
    model: nn.Module, tokenizer, texts: list[tuple[str, str]], max_len: int = 256, batch: int = 8
) -> float:
    """Perplexity of held-out text (after its prompt, if any) that the loss never trains on."""
    nll, count = heldout_nll(model, tokenizer, texts, max_len, batch)
    return math.exp(nll / max(count, 1))


def heldout_nll(
    model: nn.Module, tokenizer, texts: list[tuple[str, str]], max_len: int = 256, batch: int = 8
) -> tuple[float, int]:
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
        mask = (pos >= mx.array([s for _, s in chunk])[:, None]) & (
            pos < mx.array([len(ids) for ids, _ in chunk])[:, None]
        )
        ce = nn.losses.cross_entropy(model(arr[:, :-1]).astype(mx.float32), arr[:, 1:]) * mask
        nll += ce.sum().item()
        count += int(mask.sum().item())
    return nll, count


def _example(g: Group) -> dict:
    return {
        "query": g.query,
        "variants": [v.label for v in g.variants],
        "responses": [gen.text for gen in g.generations],
    }


def _variant(label: str) -> Variant:
    return Variant(tuple(c == "+" for c in label))


def _fields_of(cls: type, values: dict, keys: Sequence[str] | None = None) -> dict:
    """The entries of `values` that are fields of the event class `cls` (and among `keys`, if given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and (keys is None or k in keys)}


def _add_counts(a: DropCounts, b: DropCounts) -> DropCounts:
    return type(a)(**{f.name: getattr(a, f.name) + getattr(b, f.name) for f in dataclasses.fields(a)})


def _checkpoint_name(summary: dict) -> str:
    name = f"iter-{summary['iteration']:02d}"
    return f"{name} step {summary['step']}" if summary.get("partial") else name


def describe_kept(kept: dict | None, before: str = "", after: str = "") -> str:
    """Why RUN/adapters.safetensors holds what it holds, in words ('' before any iteration ended)."""
    if not kept:
        return ""
    if kept["name"] == "base":
        text = "no iteration was healthy: the base model"
    elif kept["rule"] == "best" and kept.get("heldout_mi") is not None:
        text = f"best held-out MI bound, {kept['heldout_mi']:+.3f} nats"
    else:
        text = "the last healthy iteration"
    return before + text + after
