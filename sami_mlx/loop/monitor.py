"""The degeneration monitor: checks inside an iteration (drift only) and at its end (drift, the model's
own held-out answers and their MI bound, the --heldout text's perplexity), each returned as a Check
that says whether the run is healthy and, if not, why. What the loop does about it (keep, roll back)
is the loop's; how drift is measured is drift.py's."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np

from sami_mlx import events as ev
from sami_mlx.inputs.constitution import sample_variants
from sami_mlx.loop.adapters import adapters_disabled
from sami_mlx.loop.batches import scoring_batch, training_orders
from sami_mlx.loop.drift import KINDS, Answer, Probe, answer_of, answer_stats, drift, mean_nll
from sami_mlx.loop.heldout import heldout_nll, heldout_perplexity
from sami_mlx.loop.rollout import Generation, Group
from sami_mlx.loop.sampling import Sampler, derived_seed, variant_from_label
from sami_mlx.loop.scoring import score_micro_batches
from sami_mlx.objective import mi_lower_bound, sami_loss

MONITOR_EXTRA = ("heldout_mi", "mean_length", "limit_rate", "distinct_2", "repetition", "ppl_ratio")


@dataclass
class Check:
    """One reading of the monitor: whether the run is healthy and, if not, the `problem` in words.
    The --heldout text's figures are None without --heldout; drift and the model's own held-out
    answers None (empty) with the monitor off or inside an iteration, where only drift is measured."""

    healthy: bool = True
    problem: str = ""
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


def find_problem(
    drifts: dict[str, float], ppl_ratio: float | None, max_ppl_ratio: float | None, max_prompted_ratio: float | None
) -> str:
    """What went past the limits, in words ('' when nothing did): drift without the constitution and
    the --heldout perplexity ratio against --max-ppl-ratio, drift with it against --max-prompted-ratio."""
    problem = ""
    # With the constitution SAMI is meant to move the model, so that drift has a looser limit;
    # --max-ppl-ratio off turns both guards off.
    limits = {"plain": max_ppl_ratio, "prompted": max_prompted_ratio if max_ppl_ratio is not None else None}
    for kind, value in drifts.items():
        bound = limits[kind]
        if bound is not None and not (math.isfinite(value) and value <= bound):
            where = "with the constitution" if kind == "prompted" else "without a constitution"
            problem = problem or (
                f"the base model's held-out answers ({where}) became {value:.2f}x less "
                f"likely (perplexity ratio; limit {bound:g}x)"
            )
    if (
        max_ppl_ratio is not None
        and ppl_ratio is not None
        and not (math.isfinite(ppl_ratio) and ppl_ratio <= max_ppl_ratio)
    ):
        problem = problem or f"--heldout text perplexity reached {ppl_ratio:.2f}x the base's (limit {max_ppl_ratio:g}x)"
    return problem


class Monitor:
    """Watches a run for degeneration. `start()` takes the base model's answers to the held-out
    queries (the probe; None with the monitor off); `check_drift` and `check_in_full` then measure
    the model as it stands and emit MonitorChecked. The ranks split the measuring (the forward passes
    always, the answers when they are greedy) and agree on the verdict."""

    def __init__(self, sampler: Sampler):
        # The monitor measures the model the sampler samples, with the same run, ranks and events.
        self.sampler = sampler
        self.cfg, self.inputs, self.out, self.emit = sampler.cfg, sampler.inputs, sampler.out, sampler.emit
        self.model, self.tokenizer, self.ranks = sampler.model, sampler.tokenizer, sampler.ranks
        self.probe: Probe | None = None  # the base model's held-out answers (None: monitor off)

    def heldout_ppl(self) -> float:
        """Perplexity of the --heldout text as the model stands; ranks split the texts and add up the losses."""
        ranks = self.ranks
        if ranks.size == 1:
            return heldout_perplexity(self.model, self.tokenizer, self.inputs.heldout)
        nll, count = heldout_nll(self.model, self.tokenizer, self.inputs.heldout[ranks.rank :: ranks.size])
        total_nll, total_count = ranks.sum([nll, count], "measuring held-out perplexity")
        return math.exp(total_nll / max(total_count, 1))

    def start(self) -> Probe | None:
        """The base model's answers to the held-out queries: read back from RUN/monitor.json on
        resume, else sampled now with the adapters off and a seed every rank shares."""
        self.probe = self._probe()
        return self.probe

    def _probe(self) -> Probe | None:
        cfg, inputs, sampler = self.cfg, self.inputs, self.sampler
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
        variants = [sample_variants(sampler.strategy, k, rng) for _ in inputs.monitor_ids]
        prompted = [
            sampler.generation_prompt(v, inputs.queries[qi]) for qi, vs in zip(inputs.monitor_ids, variants) for v in vs
        ]
        plain = [sampler.plain_prompt(inputs.queries[qi]) for qi in inputs.monitor_ids]
        eos = self.tokenizer.eos_token_id
        with adapters_disabled(self.model):
            gens = self.generate(prompted + plain, derived_seed(cfg.seed, 7))
            probe = Probe(
                list(inputs.monitor_ids),
                [[v.label for v in vs] for vs in variants],
                [Answer(p, answer_of(g, eos)) for p, g in zip(prompted, gens)],
                [Answer(p, answer_of(g, eos)) for p, g in zip(plain, gens[len(prompted) :])],
                {},
            )
            probe.base_nll = {kind: mean_nll(self.model, getattr(probe, kind), ranks=self.ranks) for kind in KINDS}
            probe.base_mi = self.heldout_mi(probe, gens[: len(prompted)])
        if self.ranks.primary:
            probe.save(path)
        self.emit(ev.StageProgress("monitor: base answers", 1, 1))
        return probe

    def generate(self, prompts: list[list[int]], seed: int) -> list[Generation]:
        """The monitor's answers, with the run's settings. A greedy answer depends on its prompt alone,
        so the ranks split the prompts and share what they wrote; sampled answers are drawn from a seed
        every rank shares, each rank drawing them all (a split would draw other tokens)."""
        mx.random.seed(seed)
        ranks = self.ranks
        if ranks.size == 1 or self.cfg.temperature > 0:
            return self.sampler.generate(prompts)
        mine = self.sampler.generate([prompts[i] for i in ranks.shard(len(prompts))])
        return self.sampler.gather_generations(mine, len(prompts), per=1)

    def heldout_mi(self, probe: Probe, gens: list[Generation]) -> float | None:
        """log N - SAMI loss of the model's own answers to the held-out queries (groups with an empty
        answer left out): what training raises, measured on queries it never saw. The ranks split the
        groups and share their rows of S."""
        n = self.inputs.num_variants
        groups = [
            Group(qi, self.inputs.queries[qi], [variant_from_label(v) for v in labels], gens[i * n : (i + 1) * n])
            for i, (qi, labels) in enumerate(zip(probe.query_ids, probe.variants))
        ]
        groups = [g for g in groups if all(gen.tokens for gen in g.generations)]
        if not groups:
            return None
        ranks = self.ranks
        mine = [groups[i] for i in ranks.shard(len(groups))]
        S = self.score(mine)
        if ranks.size > 1:
            # Rank r scored groups r, r + size, ...; its rows are padded to the longest share for the wire.
            width = -(-len(groups) // ranks.size) * n * n
            flat: list[float] = np.asarray(S.astype(mx.float32)).reshape(-1).tolist()
            per_rank = ranks.gather(flat + [0.0] * (width - len(flat)), "measuring the held-out MI")
            rows = [mx.array(per_rank[i % ranks.size]).reshape(-1, n, n)[i // ranks.size] for i in range(len(groups))]
            S = mx.stack(rows)
        return mi_lower_bound(float(sami_loss(S)), n)

    def score(self, groups: list[Group]) -> mx.array:
        """S of `groups` ([B, N, N]; empty for none), each scored under the constitution in file order."""
        n, c = self.inputs.num_variants, self.inputs.constitution
        if not groups:
            return mx.zeros((0, n, n))
        order = list(range(len(c.principles)))  # file order, as at evaluation
        per_variant = training_orders(groups, self.cfg, len(c.principles), orders=[order] * len(groups))
        batch = scoring_batch(self.tokenizer, self.cfg, c, self.inputs.training_template, groups, per_variant)
        # One training micro-batch's worth of groups at a time: the estimate that chose it covers this pass.
        return score_micro_batches(self.model, batch, self.cfg.groups_per_micro_batch, self.cfg.scoring == "shared")

    def agreed_problem(self, drifts: dict[str, float], ppl_ratio: float | None) -> str:
        """find_problem with the run's limits, agreed by every rank: '' when every rank is healthy."""
        problem = find_problem(drifts, ppl_ratio, self.cfg.max_ppl_ratio, self.cfg.max_prompted_ratio)
        tripped = self.ranks.any(bool(problem), "agreeing on the drift check")
        return (problem or "another rank's drift check failed") if tripped else ""

    def check_drift(self, iteration: int, step: int) -> Check:
        """Drift only (forward passes, no sampling), as inside an iteration; needs the probe."""
        assert self.probe is not None  # the loop checks only with the monitor on
        drifts = drift(self.model, self.probe, self.ranks)
        problem = self.agreed_problem(drifts, None)
        check = Check(not problem, problem, drift_prompted=drifts["prompted"], drift_plain=drifts["plain"])
        return self.report(iteration, step, check)

    def check_in_full(self, iteration: int, step: int, base_ppl: float | None) -> Check:
        """The check at an iteration's end: drift, the model's own held-out answers (length, token
        limit, distinct-2, repetition) and their MI bound, and the --heldout text's perplexity as a
        multiple of `base_ppl` (the base model's)."""
        check = Check()
        if self.inputs.heldout:
            check.heldout_ppl = ppl = self.heldout_ppl()
            assert base_ppl is not None  # measured when the run started
            check.ppl_ratio = ppl / base_ppl
        drifts: dict[str, float] = {}
        if self.probe:
            probe = self.probe
            prompts = [a.prompt for a in probe.prompted] + [a.prompt for a in probe.plain]
            gens = self.generate(prompts, derived_seed(self.cfg.seed, 11, iteration, step))
            drifts = drift(self.model, probe, self.ranks)
            check.drift_prompted, check.drift_plain = drifts["prompted"], drifts["plain"]
            check.heldout_mi = self.heldout_mi(probe, gens[: len(probe.prompted)])
            check.answers = answer_stats(gens)
        check.problem = self.agreed_problem(drifts, check.ppl_ratio)
        check.healthy = not check.problem
        return self.report(iteration, step, check, **fields_of(ev.MonitorChecked, check.to_dict(), MONITOR_EXTRA))

    def report(self, iteration: int, step: int, check: Check, **extra: Any) -> Check:
        """Emit `check` as MonitorChecked (with `extra` fields, measured only at an iteration's end); return it."""
        self.emit(
            ev.MonitorChecked(
                iteration=iteration,
                step=step,
                drift_prompted=check.drift_prompted,
                drift_plain=check.drift_plain,
                healthy=check.healthy,
                limit=self.cfg.max_ppl_ratio,
                **extra,
            )
        )
        return check


def fields_of(cls: type, values: dict, keys: Sequence[str] | None = None) -> dict:
    """The entries of `values` that are fields of the event class `cls` (and among `keys`, if given)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: v for k, v in values.items() if k in names and (keys is None or k in keys)}
