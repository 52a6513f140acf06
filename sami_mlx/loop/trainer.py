"""The SAMI loop: sample -> score -> train -> save the step state, reporting only through events.

This module holds the entry points (train, resume) and the schedule; SamiLoop's other parts live
beside it: sampling.py (the groups), update.py (one optimizer step, whose maths is step.py) and
health.py (the degeneration monitor, keeping and rolling back adapters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import yaml
from mlx.utils import tree_flatten

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig
from sami_mlx.config_file import load_run_config
from sami_mlx.errors import SamiError
from sami_mlx.fileio import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl
from sami_mlx.inputs.constitution import variant_strategy
from sami_mlx.instruct import prompts_resolved, resolve_prompts
from sami_mlx.loop.adapters import adapter_weights, attach_adapters, save_adapters, set_adapter_weights
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.faults import fault_point
from sami_mlx.loop.health import HEALTHY, HealthChecks, describe_kept, fields_of
from sami_mlx.loop.heldout import heldout_nll, heldout_perplexity, load_heldout
from sami_mlx.loop.monitor import Probe
from sami_mlx.loop.prepare import (
    HELDOUT_TEXTS,
    RunInputs,
    check_context,
    check_memory,
    choose_micro_batches,
    prepare_inputs,
    prepare_run_dir,
    with_templates,
)
from sami_mlx.loop.rollout import StopRequested
from sami_mlx.loop.runstate import RunLock, RunState, load_step_state, save_step_state
from sami_mlx.loop.sampling import PARTIAL, Sampling, derived_seed
from sami_mlx.loop.scoring import shared_scoring_supported
from sami_mlx.loop.step import StepSettings, step_function
from sami_mlx.loop.update import MAX_BAD_STEPS, Stepping
from sami_mlx.model import float_bytes, load_model

__all__ = [
    "HEALTHY",
    "HELDOUT_TEXTS",
    "MAX_BAD_STEPS",
    "RunInputs",
    "SamiLoop",
    "TrainResult",
    "check_context",
    "check_memory",
    "choose_micro_batches",
    "describe_kept",
    "gradient_checkpointing",
    "heldout_nll",
    "heldout_perplexity",
    "load_heldout",
    "prepare_inputs",
    "prepare_run_dir",
    "resume",
    "train",
]

Callback = Callable[[ev.Event], None]
StopCheck = Callable[[], bool]


@dataclass
class TrainResult:
    run_dir: Path
    model: nn.Module
    tokenizer: object
    iterations: list[dict] = field(default_factory=list)
    stopped_early: bool = False
    reason: str = ""
    kept: dict | None = None  # which adapters RUN/adapters.safetensors (and `model`) hold, and why


def train(
    cfg: TrainConfig,
    callbacks: Sequence[Callback] = (),
    should_stop: StopCheck | None = None,
    ranks: Ranks | None = None,
) -> TrainResult:
    """Run SAMI as configured; every event goes to metrics.jsonl and then to each callback.

    `should_stop` is polled after every optimizer step, and (in a single process) between decode
    steps of the sampling and the monitor's generation; when it returns True the run stops there,
    saved and resumable (the groups already sampled are kept in RUN/iter-NN/samples.partial.jsonl).
    Started by mlx.launch, each process is one rank of a data-parallel run (`ranks`, by default the
    launcher's group): only rank 0 writes the run directory and calls the callbacks.
    """
    return _run(cfg.resolved(), RunState(), None, callbacks, should_stop, ranks or Ranks.world())


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
    cfg = load_run_config(out, "--resume").resolved()
    for key, value in (overrides or {}).items():
        if key == "grad_accumulation" and str(value).lower() == "auto":
            continue  # the run chose its number when it started; resuming repeats it
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
    return _run(cfg, state, out, callbacks, should_stop, ranks)


def _run(
    cfg: TrainConfig,
    state: RunState,
    out: Path | None,
    callbacks: Sequence[Callback],
    should_stop: StopCheck | None,
    ranks: Ranks,
) -> TrainResult:
    """Load the inputs and the model, check that they fit, and run the loop from `state`. `out` None: a
    new run, whose directory rank 0 prepares (with its config.yaml); else the run directory to resume."""
    inputs = prepare_inputs(cfg)
    notes: list[str] = []  # how the weights were loaded (dequantized or not, and why), told at RunStarted
    model, tokenizer, model_config = load_model(cfg.model, cfg.trust_remote_code, cfg.dequantize, notes.append)
    if not prompts_resolved(cfg):  # chosen for the model now that its tokenizer is here; config.yaml records them
        cfg = resolve_prompts(cfg, tokenizer)
        inputs = with_templates(inputs, cfg)
    longest = check_context(cfg, inputs, tokenizer, model_config.get("max_position_embeddings"))
    cfg = choose_micro_batches(cfg, inputs, model_config, longest, float_bytes(model))
    if ranks.size > 1:  # every rank splits a step alike: the most micro-batches any rank's memory needs
        chosen = ranks.gather([cfg.micro_batches], "choosing --grad-accumulation")
        cfg = dataclasses.replace(cfg, grad_accumulation=int(max(r[0] for r in chosen)))
    memory_gb = check_memory(cfg, inputs, model_config, longest, float_bytes(model))
    if not ranks.primary:
        where = out or Path(cfg.out).expanduser()
        return SamiLoop(cfg, inputs, model, tokenizer, where, _silent, should_stop, ranks).run(state)
    new = out is None
    out = prepare_run_dir(cfg) if out is None else out
    with RunLock(out):
        if new:
            atomic_write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        loop = SamiLoop(cfg, inputs, model, tokenizer, out, _emitter(out, callbacks), should_stop, ranks)
        loop.memory_estimate_gb = memory_gb
        loop.model_note = "; ".join(notes)
        return loop.run(state)


def _emitter(out: Path, callbacks: Sequence[Callback]) -> Callback:
    def emit(event: ev.Event) -> None:
        # Progress only, not metrics; GroupSampled's responses are in the samples files already.
        if not isinstance(event, (ev.SamplingProgress, ev.StageProgress, ev.GroupSampled)):
            append_jsonl(out / "metrics.jsonl", event.to_dict())
        for cb in callbacks:
            cb(event)

    return emit


def _silent(event: ev.Event) -> None:
    """Ranks other than 0 report nothing: rank 0 speaks for the run."""


@dataclass
class IterationScores:
    """Means over an iteration's logged steps (nan when none was logged)."""

    loss: float
    mi_bound: float
    row_accuracy: float
    column_accuracy: float


class SamiLoop(Sampling, Stepping, HealthChecks):
    """State of one run: the model with its adapters, the optimizer, the schedule position.

    With several ranks every rank holds the same adapters and optimizer state and walks the same
    schedule; they split each iteration's sampling and each step's groups, and sum gradients.
    """

    memory_estimate_gb: float | None = None  # from check_memory, shown when the run starts
    model_note: str = ""  # from load_model: how the weights were loaded, shown when the run starts

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
        self.settings = StepSettings(cfg.kl_beta, cfg.anchor_beta, self.shared, bucketed=cfg.compile)
        self.step_fn = step_function(model, self.settings, cfg.compile)
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
        trainable = sum(v.size for _, v in cast(list, tree_flatten(model.trainable_parameters())))
        if state.checkpoint:
            load_step_state(self.out, state, model, self.optimizer)
        # Every rank has read the run directory before rank 0 writes to it again.
        self.ranks.barrier("starting the run")
        result = TrainResult(self.out, model, self.tokenizer)
        outcome = self.schedule(state, total_steps, trainable)
        if outcome != "done":
            result.stopped_early = True
            result.reason = "cancelled" if outcome == "cancelled" else state.stopped
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

    def schedule(self, state: RunState, total_steps: int, trainable: int) -> str:
        """The monitor's start, then the iterations: 'done', 'cancelled' or 'degenerated'."""
        cfg = self.cfg
        try:
            self.probe = probe = self.start_monitor()
            if self.inputs.heldout and state.base_ppl is None:
                self.emit(ev.StageProgress("base model: held-out perplexity", 0, 1))
                state.base_ppl = self.heldout_ppl()
                self.emit(ev.StageProgress("base model: held-out perplexity", 1, 1))
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
                    model_note=self.model_note,
                    monitor_queries=len(probe.query_ids) if probe else 0,
                    base_heldout_mi=probe.base_mi if probe else None,
                )
            )
            while state.iteration < cfg.iterations:
                outcome = self.iteration(state)
                if outcome != "done":
                    return outcome
        except StopRequested:
            # Stopped inside the sampling or the monitor's generation: the last saved state stands (the
            # groups sampled so far are in samples.partial.jsonl); a run stopped before it saved one gets one.
            if self.ranks.primary and not (self.out / "state.json").exists():
                atomic_write_json(self.out / "state.json", state.to_dict())
            return "cancelled"
        return "done"

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
            self.save_step_state(state)
            if self.ranks.primary:  # samples.jsonl holds them all now
                (self.out / f"iter-{it + 1:02d}" / PARTIAL).unlink(missing_ok=True)
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
                batch, random.Random(f"step-{cfg.seed}-{it}-{step}"), seed=derived_seed(cfg.seed, it, step)
            )
            state.step += 1
            state.global_step += 1
            if metrics is None:
                state.skipped_steps += 1
            completed = (
                None
                if metrics is None
                else ev.StepCompleted(
                    iteration=it + 1,
                    step=step + 1,
                    steps=steps,
                    global_step=state.global_step,
                    **dataclasses.asdict(metrics),
                )
            )
            if self.probe and cfg.monitor_every and state.step % cfg.monitor_every == 0 and state.step < steps:
                # Checked before the step state is saved, so that a resumed run repeats the check.
                if not self.mid_iteration_check(state):
                    if completed is not None:
                        self.emit(completed)
                    self.roll_back(state, it + 1, state.step)
                    return "degenerated"
            self.save_step_state(state)
            if completed is not None:
                self.emit(completed)
            if self.stop_requested() and state.step < steps:
                return "cancelled"
        self.model.eval()
        self.ranks.at = f"iteration {it + 1}, end"
        summary = {
            "iteration": it + 1,
            "step": steps,
            "adapters": f"iter-{it + 1:02d}",
            **dataclasses.asdict(self.iteration_summary(it)),
        }
        it_dir = self.out / summary["adapters"]
        self.snapshots[summary["adapters"]] = {k: mx.array(v) for k, v in adapter_weights(self.model).items()}
        if self.ranks.primary:
            save_adapters(self.model, it_dir, self.adapter_config)
        fault_point("iteration-adapters")
        summary.update(self.full_check(state, it + 1, steps).to_dict())
        state.iterations.append(summary)
        state.iteration, state.phase, state.step = it + 1, "sampling", 0
        event = ev.IterationCompleted(adapter_dir=str(it_dir), **fields_of(ev.IterationCompleted, summary))
        if not summary["healthy"]:
            self.emit(event)
            self.roll_back(state, it + 1, steps)
            return "degenerated"
        state.healthy = {"iteration": it + 1, "step": steps}
        self.keep_adapters(state)  # the best so far, so that a kill leaves it in place
        self.save_step_state(state)
        self.emit(event)
        return "done" if not self.stop_requested() or state.iteration == cfg.iterations else "cancelled"

    def save_step_state(self, state: RunState) -> None:
        """Rank 0 saves adapters, optimizer state and the schedule position; the others hold the same."""
        if self.ranks.primary:
            save_step_state(self.out, state, self.model, self.optimizer)

    def stop_requested(self) -> bool:
        """Poll should_stop; with several ranks, a stop seen by any rank stops them all at the same step."""
        return self.ranks.any(self.should_stop(), "agreeing whether to stop")

    def iteration_summary(self, it: int) -> IterationScores:
        """Mean loss, MI bound and accuracies over the iteration's logged steps (rank 0 keeps the log)."""
        log = read_jsonl(self.out / "metrics.jsonl") if self.ranks.primary else []
        rows = [r for r in log if r.get("event") == "StepCompleted" and r.get("iteration") == it + 1]
        keys = [f.name for f in dataclasses.fields(IterationScores)]
        return IterationScores(**{k: sum(r[k] for r in rows) / len(rows) if rows else float("nan") for k in keys})

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
