"""One optimizer step of the loop: the step's groups in --grad-accumulation micro-batches (this rank's
share of them), the totals summed over ranks, clipping, the non-finite guard, and the update."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map

from sami_mlx import events as ev
from sami_mlx.errors import RunAborted
from sami_mlx.inputs.constitution import principle_order
from sami_mlx.loop.batches import response_ids, scoring_batch, training_orders
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.faults import fault_point
from sami_mlx.loop.parts import LoopParts
from sami_mlx.loop.rollout import Group
from sami_mlx.loop.scoring import ScoringBatch
from sami_mlx.loop.step import StepInputs, StepSettings, step_inputs
from sami_mlx.objective import accuracies, mi_lower_bound

MAX_BAD_STEPS = 3


@dataclass
class StepResult:
    """What one optimizer step measured, as StepCompleted reports it."""

    loss: float  # the SAMI loss, without the KL terms
    mi_bound: float
    row_accuracy: float
    column_accuracy: float
    kl: float
    anchor_kl: float
    learning_rate: float
    grad_norm: float
    tokens_per_sec: float
    peak_memory_gb: float
    scores: list  # the first group's N x N score matrix
    variants: list = field(default_factory=list)  # that group's variant labels, e.g. "+-"
    query: str = ""  # that group's query, so a dashboard can say which one the matrix is


@dataclass
class StepTotals:
    """What a step adds up over its micro-batches (each weighted by its share of the step's groups)
    and then over ranks: gradients, losses, tokens, and this rank's score matrices."""

    grads: dict | None = None
    loss: float = 0.0
    kl: float = 0.0
    anchor: float = 0.0
    tokens: int = 0
    scores: list[mx.array] = field(default_factory=list)
    # After reduce(): (row accuracy, column accuracy, peak GiB) over all ranks.
    reduced: tuple[float, float, float] | None = None

    def add(self, other: StepTotals) -> None:
        """Add another micro-batch's totals (its gradients summed and evaluated now)."""
        if other.grads is not None:
            self.grads = other.grads if self.grads is None else tree_map(mx.add, self.grads, other.grads)
            mx.eval(self.grads)
        self.loss += other.loss
        self.kl += other.kl
        self.anchor += other.anchor
        self.tokens += other.tokens
        self.scores += other.scores

    def reduce(self, ranks: Ranks, params: dict, pairs: int) -> StepTotals:
        """The sum over ranks (a rank with no groups adds zeros shaped like `params`); `pairs` is the
        step's number of (prompt, response) rows. The score matrices stay this rank's own."""
        grads = self.grads if self.grads is not None else tree_map(mx.zeros_like, params)
        grads = ranks.sum_gradients(grads, "summing gradients")
        row_hits = col_hits = 0
        if self.scores:
            S = mx.concatenate(self.scores, axis=0)
            idx = mx.arange(S.shape[1])
            row_hits = int((mx.argmax(S, axis=2) == idx).sum())
            col_hits = int((mx.argmax(S, axis=1) == idx).sum())
        per_rank = ranks.gather(
            [self.loss, self.kl, self.anchor, self.tokens, row_hits, col_hits, mx.get_peak_memory() / 2**30],
            "summing step metrics",
        )
        loss, kl, anchor, tokens, rows, cols = (sum(r[i] for r in per_rank) for i in range(6))
        peak = max(r[6] for r in per_rank)
        return StepTotals(grads, loss, kl, anchor, int(tokens), self.scores, (rows / pairs, cols / pairs, peak))

    def accuracy_and_peak(self) -> tuple[float, float, float]:
        """(row accuracy, column accuracy, peak GiB): the ranks' reduced figures, else this process's."""
        if self.reduced is not None:
            return self.reduced
        row, col = accuracies(mx.concatenate(self.scores, axis=0))
        return row, col, mx.get_peak_memory() / 2**30  # GiB, as every memory figure


class Stepping(LoopParts):
    """SamiLoop's optimizer step (a mixin: SamiLoop sets the attributes of LoopParts and those below)."""

    optimizer: optim.Optimizer
    settings: StepSettings
    step_fn: Callable  # step.step_function: (inputs, n, kl_tokens, training) -> ((loss, S, kl, anchor), grads)
    bad_steps: int

    def scoring_batch(
        self, groups: list[Group], rng: random.Random | None = None, orders: list[list[int]] | None = None
    ) -> ScoringBatch:
        """Training prompts for every variant of each group and the sampled response ids.

        Each group's principle order is drawn from `rng`, or given in `orders`.
        """
        inputs, cfg = self.inputs, self.cfg
        per_variant = training_orders(groups, cfg, len(inputs.constitution.principles), rng, orders)
        return scoring_batch(
            self.tokenizer,
            cfg,
            inputs.constitution,
            inputs.training_template,
            groups,
            per_variant,
            inputs.anchor_template,
        )

    def response_ids(self, g: Group) -> list[list[int]]:
        """The token ids each response is scored on (with its EOS under --count-eos)."""
        return response_ids(g.generations, self.tokenizer.eos_token_id, self.cfg.count_eos)

    def step_inputs(self, batch: ScoringBatch) -> StepInputs:
        """The padded arrays one micro-batch's loss reads (lengths bucketed when the step is compiled)."""
        return step_inputs(batch, self.settings)

    def train_step(self, groups: list[Group], rng: random.Random, seed: int = 0) -> StepResult | None:
        """One optimizer step over `groups` in grad_accumulation micro-batches; None if it was skipped.

        With several ranks each scores its share of the groups and the weighted gradients are summed,
        so every rank applies the update one process would have computed from all the groups.
        """
        cfg, ranks = self.cfg, self.ranks
        mx.random.seed(ranks.seed(seed))  # dropout draws, so that a resumed run repeats them
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        ga, k = cfg.micro_batches, len(self.inputs.constitution.principles)
        parts = [list(range(len(groups)))[i::ga] for i in range(ga)]
        # Principle orders are drawn for every group, in one process's order, before taking a share.
        orders = {n: principle_order(k, rng, cfg.shuffle_principles) for part in parts for n in part}
        mine = set(ranks.shard(len(groups)))
        first = next((n for part in parts for n in part if n in mine), None)  # whose matrix `scores` is
        # The KL terms average over all the step's response tokens: each part divides its sum by that
        # count over its weight, so the weighted parts (and ranks) add up to one process's mean.
        step_tokens = sum(len(r) for g in groups for r in self.response_ids(g))
        totals = StepTotals()
        for part in ([n for n in part if n in mine] for part in parts):
            if part:
                w = len(part) / len(groups)
                totals.add(self.micro_batch([groups[n] for n in part], [orders[n] for n in part], w, step_tokens))
        if ranks.size > 1:
            pairs = len(groups) * self.inputs.num_variants
            totals = totals.reduce(ranks, self.model.trainable_parameters(), pairs)
        grads, grad_norm = totals.grads, 0.0
        assert grads is not None  # every step scores a group on some rank, and reduce() fills in the others
        if cfg.max_grad_norm > 0:
            grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
            grad_norm = float(norm)
        if not (math.isfinite(totals.loss) and math.isfinite(grad_norm)):
            self._skip_step(totals.loss)
            return None
        self.bad_steps = 0
        self.optimizer.update(self.model, grads)
        mx.eval(self.model.trainable_parameters(), self.optimizer.state)
        fault_point("update")
        row_acc, col_acc, peak = totals.accuracy_and_peak()
        seconds = time.perf_counter() - t0
        sami = totals.loss - cfg.kl_beta * totals.kl - cfg.anchor_beta * totals.anchor
        return StepResult(
            loss=sami,
            mi_bound=mi_lower_bound(sami, self.inputs.num_variants),
            row_accuracy=row_acc,
            column_accuracy=col_acc,
            kl=totals.kl,
            anchor_kl=totals.anchor,
            learning_rate=cfg.learning_rate,
            grad_norm=grad_norm,
            tokens_per_sec=totals.tokens / max(seconds, 1e-9),
            peak_memory_gb=peak,
            # a 2-D array's tolist() is a list of lists (mlx annotates any tolist() as list or scalar)
            scores=cast(list, totals.scores[0][0].tolist()) if totals.scores else [],
            variants=[v.label for v in groups[first].variants] if totals.scores and first is not None else [],
            query=groups[first].query if totals.scores and first is not None else "",
        )

    def micro_batch(self, groups: list[Group], orders: list[list[int]], w: float, step_tokens: int) -> StepTotals:
        """One micro-batch's loss and gradients, weighted by `w` (its share of the step's groups)."""
        batch = self.scoring_batch(groups, orders=orders)
        (loss, S, kl, anchor), g = self.step_fn(
            self.step_inputs(batch), batch.shape[1], mx.array(step_tokens * w), self.model.training
        )
        mx.eval(g)
        fault_point("scoring")
        g = tree_map(lambda x: x * w, g)
        mx.eval(g, loss, S, kl, anchor)
        return StepTotals(g, float(loss) * w, float(kl) * w, float(anchor) * w, batch.num_tokens, [S])

    def _skip_step(self, loss: float) -> None:
        """A NaN/inf loss or gradient: skip the update; several in a row end the run."""
        self.bad_steps += 1
        if self.bad_steps == 1:
            self.emit(ev.RunWarning(f"loss {loss} is not finite: step skipped (counted as skipped_steps)"))
        if self.bad_steps >= MAX_BAD_STEPS:
            raise RunAborted(
                f"{MAX_BAD_STEPS} steps in a row had a non-finite loss; the last good step state is kept "
                f"in {self.out}; lower --learning-rate and resume, or start again"
            )
