"""SamiLoop's degeneration monitor and what it decides: drift checks inside an iteration, the full
check at its end (drift, the model's own held-out answers, their MI bound, the --heldout text's
perplexity), the verdict, which adapters to keep, and the roll-back when a check fails."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import mlx.core as mx

from sami_mlx import events as ev
from sami_mlx.fileio import atomic_write_bytes, atomic_write_json
from sami_mlx.inputs.constitution import Variant, sample_variants
from sami_mlx.loop.adapters import (
    adapter_weights,
    adapters_disabled,
    save_adapter_weights,
    save_adapters,
    set_adapter_weights,
)
from sami_mlx.loop.batches import scoring_batch, training_orders
from sami_mlx.loop.heldout import heldout_nll, heldout_perplexity
from sami_mlx.loop.monitor import KINDS as MONITOR_KINDS
from sami_mlx.loop.monitor import Answer, Probe, answer_of, answer_stats, drift, mean_nll
from sami_mlx.loop.parts import LoopParts
from sami_mlx.loop.rollout import Generation, Group
from sami_mlx.loop.runstate import RunState
from sami_mlx.loop.sampling import derived_seed, variant_from_label
from sami_mlx.loop.scoring import score_micro_batches
from sami_mlx.objective import mi_lower_bound, sami_loss

HEALTHY = "healthy"  # RUN/healthy/: the adapters of the last step the monitor passed inside an iteration
MONITOR_EXTRA = ("heldout_mi", "mean_length", "limit_rate", "distinct_2", "repetition", "ppl_ratio")


@dataclass
class FullCheck:
    """The monitor's reading at an iteration's end: the --heldout text's figures are None without
    --heldout, drift and the model's own held-out answers None (empty) with the monitor off."""

    healthy: bool = True
    heldout_ppl: float | None = None
    ppl_ratio: float | None = None
    drift_prompted: float | None = None
    drift_plain: float | None = None
    heldout_mi: float | None = None
    answers: dict[str, float] = field(default_factory=dict)  # answer_stats of the model's own answers

    def to_dict(self) -> dict:
        """What was measured, as an iteration's summary in RUN/state.json holds it."""
        out: dict = {}
        if self.heldout_ppl is not None:
            out.update(heldout_ppl=self.heldout_ppl, ppl_ratio=self.ppl_ratio)
        if self.drift_prompted is not None:
            out.update(
                drift_prompted=self.drift_prompted,
                drift_plain=self.drift_plain,
                heldout_mi=self.heldout_mi,
                **self.answers,
            )
        out["healthy"] = self.healthy
        return out


class HealthChecks(LoopParts):
    """SamiLoop's monitor checks and keep/roll-back decisions (a mixin: SamiLoop sets the attributes of
    LoopParts and those below)."""

    adapter_config: dict
    initial_adapters: dict[str, mx.array]
    probe: Probe | None
    problem: str
    snapshots: dict[str, dict[str, mx.array]]

    if TYPE_CHECKING:  # Sampling's prompts and sampler

        def generation_prompt(self, variant: Variant, query: str) -> list[int]: ...

        def plain_prompt(self, query: str) -> list[int]: ...

        def generate(self, prompts: list[list[int]], **hooks) -> list[Generation]: ...

    def heldout_ppl(self) -> float:
        """Perplexity of the --heldout text as the model stands; ranks split the texts and add up the losses."""
        ranks = self.ranks
        if ranks.size == 1:
            return heldout_perplexity(self.model, self.tokenizer, self.inputs.heldout)
        nll, count = heldout_nll(self.model, self.tokenizer, self.inputs.heldout[ranks.rank :: ranks.size])
        total_nll, total_count = ranks.sum([nll, count], "measuring held-out perplexity")
        return math.exp(total_nll / max(total_count, 1))

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
            gens = self.monitor_generate(prompted + plain, derived_seed(cfg.seed, 7))
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

    def monitor_generate(self, prompts: list[list[int]], seed: int) -> list[Generation]:
        """The monitor's sampling: the run's settings, and a seed that is the same on every rank."""
        mx.random.seed(seed)
        return self.generate(prompts)

    def heldout_mi(self, probe: Probe, gens: list[Generation]) -> float | None:
        """log N - SAMI loss of the model's own answers to the held-out queries (groups with an empty
        answer left out): what training raises, measured on queries it never saw."""
        n, c = self.inputs.num_variants, self.inputs.constitution
        groups = [
            Group(qi, self.inputs.queries[qi], [variant_from_label(v) for v in labels], gens[i * n : (i + 1) * n])
            for i, (qi, labels) in enumerate(zip(probe.query_ids, probe.variants))
        ]
        groups = [g for g in groups if all(gen.tokens for gen in g.generations)]
        if not groups:
            return None
        order = list(range(len(c.principles)))  # file order, as at evaluation
        per_variant = training_orders(groups, self.cfg, len(c.principles), orders=[order] * len(groups))
        batch = scoring_batch(self.tokenizer, self.cfg, c, self.inputs.training_template, groups, per_variant)
        # One training micro-batch's worth of groups at a time: the estimate that chose it covers this pass.
        S = score_micro_batches(self.model, batch, self.cfg.groups_per_micro_batch, self.cfg.scoring == "shared")
        return mi_lower_bound(float(sami_loss(S)), n)

    def verdict(self, drifts: dict[str, float], ppl_ratio: float | None) -> str:
        """'' when healthy, else what went past --max-ppl-ratio, in words; every rank agrees."""
        cfg, problem = self.cfg, ""
        limit = cfg.max_ppl_ratio
        # With the constitution SAMI is meant to move the model, so that drift has a looser limit;
        # --max-ppl-ratio off turns both guards off.
        limits = {"plain": limit, "prompted": cfg.max_prompted_ratio if limit is not None else None}
        for kind, value in drifts.items():
            bound = limits[kind]
            if bound is not None and not (math.isfinite(value) and value <= bound):
                where = "with the constitution" if kind == "prompted" else "without a constitution"
                problem = problem or (
                    f"the base model's held-out answers ({where}) became {value:.2f}x less "
                    f"likely (perplexity ratio; limit {bound:g}x)"
                )
        if limit is not None:
            if ppl_ratio is not None and not (math.isfinite(ppl_ratio) and ppl_ratio <= limit):
                problem = problem or f"--heldout text perplexity reached {ppl_ratio:.2f}x the base's (limit {limit:g}x)"
        tripped = self.ranks.any(bool(problem), "agreeing on the drift check")
        return (problem or "another rank's drift check failed") if tripped else ""

    def mid_iteration_check(self, state: RunState) -> bool:
        """Drift only (forward passes, no sampling); a healthy step becomes the one to roll back to."""
        self.model.eval()
        assert self.probe is not None  # the loop checks only with the monitor on
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

    def full_check(self, state: RunState, iteration: int, step: int) -> FullCheck:
        """The monitor at an iteration's end: drift, the model's own held-out answers (length, token
        limit, distinct-2, repetition) and their MI bound, and the --heldout text's perplexity."""
        check = FullCheck()
        if self.inputs.heldout:
            check.heldout_ppl = ppl = self.heldout_ppl()
            assert state.base_ppl is not None  # measured when the run started
            check.ppl_ratio = ppl / state.base_ppl
        drifts: dict[str, float] = {}
        if self.probe:
            probe = self.probe
            prompts = [a.prompt for a in probe.prompted] + [a.prompt for a in probe.plain]
            gens = self.monitor_generate(prompts, derived_seed(self.cfg.seed, 11, iteration, step))
            drifts = drift(self.model, probe)
            check.drift_prompted, check.drift_plain = drifts["prompted"], drifts["plain"]
            check.heldout_mi = self.heldout_mi(probe, gens[: len(probe.prompted)])
            check.answers = answer_stats(gens)
        self.problem = self.verdict(drifts, check.ppl_ratio)
        check.healthy = not self.problem
        self.emit(
            ev.MonitorChecked(
                iteration=iteration,
                step=step,
                drift_prompted=check.drift_prompted,
                drift_plain=check.drift_plain,
                healthy=check.healthy,
                limit=self.cfg.max_ppl_ratio,
                **fields_of(ev.MonitorChecked, check.to_dict(), MONITOR_EXTRA),
            )
        )
        return check

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

    def snapshot(self, source: str) -> dict[str, mx.array] | None:
        """Adapters saved in RUN/<source>, from memory (this process saved them) or from disk."""
        if source in self.snapshots:
            return self.snapshots[source]
        path = self.out / source / "adapters.safetensors"
        # a .safetensors file loads as a dict (mlx annotates mx.load with every format's result)
        return dict(cast(dict, mx.load(str(path)))) if path.is_file() else None

    def roll_back(self, state: RunState, iteration: int, step: int) -> None:
        """The monitor tripped at `step` of `iteration`: end the run with the best healthy adapters,
        a healthy step of this iteration among them (measured in full first, as an iteration's end)."""
        self.model.eval()
        h = state.healthy or {}
        weights = self.snapshot(HEALTHY) if h and h["iteration"] == iteration and h["step"] < step else None
        # The full check talks to the other ranks: all of them measure the healthy step, or none does.
        missing = self.ranks.any(weights is None, "agreeing on the step to roll back to")
        if weights is not None and not missing:
            set_adapter_weights(self.model, weights)
            problem = self.problem
            partial = {
                "iteration": iteration,
                "step": h["step"],
                "adapters": HEALTHY,
                "partial": True,
                **self.full_check(state, iteration, h["step"]).to_dict(),
            }
            state.iterations.append(partial)
            self.problem = problem
        self.keep_adapters(state)
        kept = state.kept
        assert kept is not None  # keep_adapters() set it
        state.stopped = (
            f"stopped at iteration {iteration}, step {step}: {self.problem}; RUN/adapters.safetensors "
            f"holds {kept['name']}{describe_kept(kept, ' (', ')')}. Lower --learning-rate "
            "or raise --kl-beta / --anchor-beta"
        )
        state.finished = True
        self.emit(ev.RunWarning(state.stopped))
        if self.ranks.primary:
            atomic_write_json(self.out / "state.json", state.to_dict())
        self.load_kept(state)


def fields_of(cls: type, values: dict, keys: Sequence[str] | None = None) -> dict:
    """The entries of `values` that are fields of the event class `cls` (and among `keys`, if given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and (keys is None or k in keys)}


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
