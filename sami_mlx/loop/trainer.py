"""The SAMI loop: sample -> score -> train -> save the step state, reporting only through events.

One iteration, as SamiLoop.run_iteration walks it: the Sampler (sampling.py) draws the iteration's
groups with the previous iteration's adapters; train_step (train_step.py, whose loss is loss.py) takes
the optimizer steps, each saved as the step state (runstate.py); the Monitor (monitor.py) checks for
degeneration inside the iteration and at its end; the loop then keeps the adapters choose_kept
(kept.py) picks, or rolls back to the last healthy ones and ends the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import cast

import mlx.core as mx
import mlx.nn as nn
import yaml
from mlx.utils import tree_flatten

from sami_mlx import events as ev
from sami_mlx.config import TrainConfig
from sami_mlx.config_file import load_run_config
from sami_mlx.errors import RunAborted, SamiError
from sami_mlx.fileio import append_jsonl, atomic_write_bytes, atomic_write_json, atomic_write_text
from sami_mlx.instruct import prompts_resolved, resolve_prompts
from sami_mlx.loop.adapters import (
    adapter_weights,
    attach_adapters,
    save_adapter_weights,
    save_adapters,
    set_adapter_weights,
)
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.faults import fault_point
from sami_mlx.loop.kept import choose_kept, describe_kept, kept_record
from sami_mlx.loop.monitor import Check, Monitor, fields_of
from sami_mlx.loop.prepare import (
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
from sami_mlx.loop.sampling import PARTIAL, Sampler, derived_seed
from sami_mlx.loop.scoring import shared_scoring_supported
from sami_mlx.loop.train_step import NonFiniteStep, StepParts, StepResult, make_optimizer, train_step
from sami_mlx.model import float_bytes, load_model

Callback = Callable[[ev.Event], None]
StopCheck = Callable[[], bool]
HEALTHY = "healthy"  # RUN/healthy/: the adapters of the last step the monitor passed inside an iteration
MAX_BAD_STEPS = 3  # non-finite steps in a row that end the run


class Outcome(Enum):
    """How an iteration (or the schedule) ended."""

    DONE = "done"  # it ran to its end, healthy
    CANCELLED = "cancelled"  # should_stop asked for a stop: saved and resumable
    DEGENERATED = "degenerated"  # the monitor tripped: the run ended with the last healthy adapters kept


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
    return _load_and_run(cfg.resolved(), RunState(), None, callbacks, should_stop, ranks or Ranks.world())


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
    return _load_and_run(cfg, state, out, callbacks, should_stop, ranks)


def _load_and_run(
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
        emit = _emitter(out, callbacks)
        loop = SamiLoop(cfg, inputs, model, tokenizer, out, emit, should_stop, ranks, memory_gb, "; ".join(notes))
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
    """Means over an iteration's trained steps (nan when none was trained)."""

    loss: float
    mi_bound: float
    row_accuracy: float
    column_accuracy: float

    @classmethod
    def of(cls, step_scores: Sequence[dict]) -> IterationScores:
        """The means of the steps' scores (as RunState.step_scores holds them, from the StepResults)."""
        keys = [f.name for f in dataclasses.fields(cls)]
        n = len(step_scores)
        return cls(**{k: sum(s[k] for s in step_scores) / n if n else float("nan") for k in keys})


def step_scores(result: StepResult) -> dict:
    """The figures of a step that its iteration's summary averages."""
    return {f.name: getattr(result, f.name) for f in dataclasses.fields(IterationScores)}


class SamiLoop:
    """One run: the model with its adapters, and the parts that work on it (the Sampler, the step's
    parts for train_step, the Monitor), walked through the schedule from a RunState.

    With several ranks every rank holds the same adapters and optimizer state and walks the same
    schedule; they split each iteration's sampling and each step's groups, and sum gradients.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        inputs: RunInputs,
        model: nn.Module,
        tokenizer,
        out: Path,
        emit: Callback,
        should_stop: StopCheck | None = None,
        ranks: Ranks | None = None,
        memory_estimate_gb: float | None = None,
        model_note: str = "",
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
        self.memory_estimate_gb = memory_estimate_gb  # from check_memory, shown when the run starts
        self.model_note = model_note  # from load_model: how the weights were loaded, shown when the run starts
        mx.random.seed(cfg.seed)
        self.adapter_config = attach_adapters(
            model, cfg.lora_rank, cfg.lora_scale, cfg.lora_dropout, cfg.lora_layers, cfg.lora_keys, cfg.dora
        )
        self.initial_adapters = adapter_weights(model)
        # Checkpointed layers re-run their forward pass, which would grow a KV cache twice.
        self.shared = cfg.scoring == "shared" and not cfg.grad_checkpoint and shared_scoring_supported(model)
        self.sampler = Sampler(cfg, inputs, model, tokenizer, out, emit, self.should_stop, self.ranks)
        self.step_parts = StepParts.build(cfg, inputs, model, tokenizer, self.shared, self.ranks)
        self.monitor = Monitor(self.sampler)
        self.bad_steps = 0  # non-finite steps in a row
        self.snapshots: dict[str, dict] = {}  # adapters this process saved, by folder (iter-NN, healthy)

    # ---- schedule -------------------------------------------------------------------------

    def run(self, state: RunState) -> TrainResult:
        """Walk the schedule from `state` to its end (or a stop, or the monitor's verdict)."""
        with gradient_checkpointing(self.model, self.cfg.grad_checkpoint):
            cfg, start = self.cfg, time.perf_counter()
            model = self.model
            model.eval()
            total_steps = sum(cfg.steps_in_iteration(t) for t in range(cfg.iterations))
            trainable = sum(v.size for _, v in cast(list, tree_flatten(model.trainable_parameters())))
            if state.checkpoint:
                load_step_state(self.out, state, model, self.step_parts.optimizer)
            # Every rank has read the run directory before rank 0 writes to it again.
            self.ranks.barrier("starting the run")
            result = TrainResult(self.out, model, self.tokenizer)
            outcome = self.schedule(state, total_steps, trainable)
            if outcome is not Outcome.DONE:
                result.stopped_early = True
                result.reason = "cancelled" if outcome is Outcome.CANCELLED else state.stopped
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

    def schedule(self, state: RunState, total_steps: int, trainable: int) -> Outcome:
        """The monitor's start, then the iterations until one does not end DONE."""
        cfg = self.cfg
        try:
            probe = self.monitor.start()
            if self.inputs.heldout and state.base_ppl is None:
                self.emit(ev.StageProgress("base model: held-out perplexity", 0, 1))
                state.base_ppl = self.monitor.heldout_ppl()
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
                outcome = self.run_iteration(state)
                if outcome is not Outcome.DONE:
                    return outcome
        except StopRequested:
            # Stopped inside the sampling or the monitor's generation: the last saved state stands (the
            # groups sampled so far are in samples.partial.jsonl); a run stopped before it saved one gets one.
            if self.ranks.primary and not (self.out / "state.json").exists():
                atomic_write_json(self.out / "state.json", state.to_dict())
            return Outcome.CANCELLED
        return Outcome.DONE

    def run_iteration(self, state: RunState) -> Outcome:
        """Run (or finish) iteration `state.iteration`: sample its groups, take its steps (with the
        monitor's drift checks), then check it in full and keep its adapters or roll back."""
        cfg, it = self.cfg, state.iteration
        steps = cfg.steps_in_iteration(it)
        if state.phase == "sampling":
            self.emit(ev.IterationStarted(it + 1, steps, steps * cfg.queries_per_step))
            self.ranks.at = f"iteration {it + 1}, sampling"
            # Data comes from the previous iteration's model (adapters as they stand now).
            self.model.eval()
            groups = self.sampler.sample(it, steps * cfg.queries_per_step, state)
            if cfg.schedule == "paper":  # the paper re-initialises from the base model every iteration
                set_adapter_weights(self.model, self.initial_adapters)
                self.step_parts.optimizer = make_optimizer(cfg)
            state.phase, state.step, state.step_scores = "training", 0, []
            self.save_step_state(state)
            if self.ranks.primary:  # samples.jsonl holds them all now
                (self.out / f"iter-{it + 1:02d}" / PARTIAL).unlink(missing_ok=True)
        else:
            groups = self.sampler.load_samples(it)
        random.Random(f"train-{cfg.seed}-{it}").shuffle(groups)

        self.model.train()
        q = cfg.queries_per_step
        while state.step < steps:
            step = state.step
            self.ranks.at = f"iteration {it + 1}, step {step + 1}"
            # Groups repeat only when the query split ran out (sample() warned).
            batch = [groups[(step * q + n) % len(groups)] for n in range(q)]
            result = self.guarded_step(
                batch, random.Random(f"step-{cfg.seed}-{it}-{step}"), derived_seed(cfg.seed, it, step)
            )
            state.step += 1
            state.global_step += 1
            completed = None
            if result is None:
                state.skipped_steps += 1
            else:
                state.step_scores.append(step_scores(result))
                completed = ev.StepCompleted(
                    iteration=it + 1,
                    step=step + 1,
                    steps=steps,
                    global_step=state.global_step,
                    **dataclasses.asdict(result),
                )
            if self.monitor.probe and cfg.monitor_every and state.step % cfg.monitor_every == 0 and state.step < steps:
                # Checked before the step state is saved, so that a resumed run repeats the check.
                check = self.check_mid_iteration(state)
                if not check.healthy:
                    if completed is not None:
                        self.emit(completed)
                    self.roll_back(state, it + 1, state.step, check.problem)
                    return Outcome.DEGENERATED
            self.save_step_state(state)
            if completed is not None:
                self.emit(completed)
            if self.stop_requested() and state.step < steps:
                return Outcome.CANCELLED
        return self.end_iteration(state, steps)

    def end_iteration(self, state: RunState, steps: int) -> Outcome:
        """Save the iteration's adapters, check them in full, and keep them (or roll back)."""
        it = state.iteration
        self.model.eval()
        self.ranks.at = f"iteration {it + 1}, end"
        summary = {
            "iteration": it + 1,
            "step": steps,
            "adapters": f"iter-{it + 1:02d}",
            **dataclasses.asdict(IterationScores.of(state.step_scores)),
        }
        it_dir = self.out / summary["adapters"]
        self.snapshots[summary["adapters"]] = {k: mx.array(v) for k, v in adapter_weights(self.model).items()}
        if self.ranks.primary:
            save_adapters(self.model, it_dir, self.adapter_config)
        fault_point("iteration-adapters")
        check = self.monitor.check_in_full(it + 1, steps, state.base_ppl)
        summary.update(check.to_dict())
        state.iterations.append(summary)
        state.iteration, state.phase, state.step, state.step_scores = it + 1, "sampling", 0, []
        event = ev.IterationCompleted(adapter_dir=str(it_dir), **fields_of(ev.IterationCompleted, summary))
        if not check.healthy:
            self.emit(event)
            self.roll_back(state, it + 1, steps, check.problem)
            return Outcome.DEGENERATED
        state.healthy = {"iteration": it + 1, "step": steps}
        self.keep_adapters(state)  # the best so far, so that a kill leaves it in place
        self.save_step_state(state)
        self.emit(event)
        return (
            Outcome.DONE if not self.stop_requested() or state.iteration == self.cfg.iterations else Outcome.CANCELLED
        )

    def guarded_step(self, groups, rng: random.Random, seed: int) -> StepResult | None:
        """train_step, or None when it was not finite (warned once; MAX_BAD_STEPS in a row end the run)."""
        try:
            result = train_step(self.step_parts, groups, rng, seed)
        except NonFiniteStep as e:
            self.bad_steps += 1
            if self.bad_steps == 1:
                self.emit(ev.RunWarning(f"{e}: step skipped (counted as skipped_steps)"))
            if self.bad_steps >= MAX_BAD_STEPS:
                raise RunAborted(
                    f"{MAX_BAD_STEPS} steps in a row had a non-finite loss; the last good step state is kept "
                    f"in {self.out}; lower --learning-rate and resume, or start again"
                ) from None
            return None
        self.bad_steps = 0
        return result

    def save_step_state(self, state: RunState) -> None:
        """Rank 0 saves adapters, optimizer state and the schedule position; the others hold the same."""
        if self.ranks.primary:
            save_step_state(self.out, state, self.model, self.step_parts.optimizer)

    def stop_requested(self) -> bool:
        """Poll should_stop; with several ranks, a stop seen by any rank stops them all at the same step."""
        return self.ranks.any(self.should_stop(), "agreeing whether to stop")

    # ---- keeping and rolling back -----------------------------------------------------------

    def check_mid_iteration(self, state: RunState) -> Check:
        """The monitor's drift check inside an iteration; a healthy step becomes the one to roll back to."""
        self.model.eval()
        check = self.monitor.check_drift(state.iteration + 1, state.step)
        self.model.train()
        if check.healthy:
            # Every rank keeps the step in memory (rank 0 alone writes RUN/healthy/, maybe on another Mac).
            self.snapshots[HEALTHY] = {k: mx.array(v) for k, v in adapter_weights(self.model).items()}
            if self.ranks.primary:
                save_adapters(self.model, self.out / HEALTHY, self.adapter_config)
            state.healthy = {"iteration": state.iteration + 1, "step": state.step}
        return check

    def keep_adapters(self, state: RunState) -> None:
        """Put in RUN/adapters.safetensors the healthy iteration --keep chooses (choose_kept); the
        initial (identity) adapters, i.e. the base model, if none was healthy."""
        chosen = choose_kept(state.iterations, self.cfg.keep)
        state.kept = kept_record(chosen, self.cfg.keep)
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

    def snapshot(self, source: str) -> dict[str, mx.array] | None:
        """Adapters saved in RUN/<source>, from memory (this process saved them) or from disk."""
        if source in self.snapshots:
            return self.snapshots[source]
        path = self.out / source / "adapters.safetensors"
        # a .safetensors file loads as a dict (mlx annotates mx.load with every format's result)
        return dict(cast(dict, mx.load(str(path)))) if path.is_file() else None

    def roll_back(self, state: RunState, iteration: int, step: int, problem: str) -> None:
        """The monitor found `problem` at `step` of `iteration`: end the run with the best healthy
        adapters, a healthy step of this iteration among them (measured in full first, as an iteration's end)."""
        self.model.eval()
        h = state.healthy or {}
        weights = self.snapshot(HEALTHY) if h and h["iteration"] == iteration and h["step"] < step else None
        # The full check talks to the other ranks: all of them measure the healthy step, or none does.
        missing = self.ranks.any(weights is None, "agreeing on the step to roll back to")
        if weights is not None and not missing:
            set_adapter_weights(self.model, weights)
            check = self.monitor.check_in_full(iteration, h["step"], state.base_ppl)
            state.iterations.append(
                {"iteration": iteration, "step": h["step"], "adapters": HEALTHY, "partial": True, **check.to_dict()}
            )
        self.keep_adapters(state)
        kept = state.kept
        assert kept is not None  # keep_adapters() set it
        state.stopped = (
            f"stopped at iteration {iteration}, step {step}: {problem}; RUN/adapters.safetensors "
            f"holds {kept['name']}{describe_kept(kept, ' (', ')')}. Lower --learning-rate "
            "or raise --kl-beta / --anchor-beta"
        )
        state.finished = True
        self.emit(ev.RunWarning(state.stopped))
        if self.ranks.primary:
            atomic_write_json(self.out / "state.json", state.to_dict())
        self.load_kept(state)


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
