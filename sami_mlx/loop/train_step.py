"""One optimizer step over a step's groups: the groups in --grad-accumulation micro-batches (this rank's
share of them), each one's loss and gradient from loss.py, the totals summed over ranks, clipping,
the non-finite guard, and the update."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from sami_mlx.config import TrainConfig
from sami_mlx.inputs.constitution import principle_order
from sami_mlx.loop.batches import response_ids, scoring_batch, training_orders
from sami_mlx.loop.distributed import Ranks
from sami_mlx.loop.faults import fault_point
from sami_mlx.loop.loss import StepSettings, step_function, step_inputs
from sami_mlx.loop.prepare import RunInputs
from sami_mlx.loop.rollout import Group
from sami_mlx.loop.scoring import ScoringBatch
from sami_mlx.memory import GiB
from sami_mlx.objective import diagonal_wins, mi_lower_bound


class NonFiniteStep(Exception):
    """The step's loss or gradient was not finite: nothing was updated."""

    def __init__(self, loss: float):
        super().__init__(f"loss {loss} is not finite")
        self.loss = loss


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
    and then over ranks: gradients, the loss and its parts, tokens, and this rank's score matrices."""

    grads: dict | None = None
    loss: float = 0.0  # the total, KL terms included
    sami: float = 0.0  # the SAMI loss alone
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
        self.sami += other.sami
        self.kl += other.kl
        self.anchor += other.anchor
        self.tokens += other.tokens
        self.scores += other.scores

    def reduce(self, ranks: Ranks, params: dict, pairs: int) -> StepTotals:
        """The sum over ranks (a rank with no groups adds zeros shaped like `params`); `pairs` is the
        step's number of (prompt, response) rows. The score matrices stay this rank's own."""
        grads = self.grads if self.grads is not None else tree_map(mx.zeros_like, params)
        grads = ranks.sum_gradients(grads, "summing gradients")
        row_hits, col_hits = diagonal_wins(mx.concatenate(self.scores, axis=0)) if self.scores else (0, 0)
        per_rank = ranks.gather(
            [self.loss, self.sami, self.kl, self.anchor, self.tokens, row_hits, col_hits, mx.get_peak_memory() / GiB],
            "summing step metrics",
        )
        loss, sami, kl, anchor, tokens, rows, cols = (sum(r[i] for r in per_rank) for i in range(7))
        peak = max(r[7] for r in per_rank)
        reduced = (rows / pairs, cols / pairs, peak)
        return StepTotals(grads, loss, sami, kl, anchor, int(tokens), self.scores, reduced)

    def accuracy_and_peak(self) -> tuple[float, float, float]:
        """(row accuracy, column accuracy, peak GiB): the ranks' reduced figures, else this process's."""
        if self.reduced is not None:
            return self.reduced
        rows, cols = diagonal_wins(mx.concatenate(self.scores, axis=0))
        pairs = sum(S.shape[0] * S.shape[1] for S in self.scores)
        return rows / pairs, cols / pairs, mx.get_peak_memory() / GiB


@dataclass
class StepParts:
    """What an optimizer step works on: the run's settings and inputs, the model, its optimizer (the
    paper schedule makes a new one every iteration), the micro-batch's loss-and-gradient function
    (loss.step_function) and the ranks that share the step."""

    cfg: TrainConfig
    inputs: RunInputs
    model: nn.Module
    tokenizer: Any  # mlx-lm's TokenizerWrapper
    optimizer: optim.Optimizer
    settings: StepSettings
    loss_and_grad: Callable  # (inputs, n, kl_tokens, training) -> (LossTerms, grads)
    ranks: Ranks = field(default_factory=Ranks)

    @classmethod
    def build(cls, cfg: TrainConfig, inputs: RunInputs, model: nn.Module, tokenizer, shared: bool, ranks: Ranks):
        """The parts for a model with its adapters attached: a fresh optimizer, the step compiled with --compile."""
        settings = StepSettings(cfg.kl_beta, cfg.anchor_beta, shared, bucketed=cfg.compile)
        loss_and_grad = step_function(model, settings, cfg.compile)
        return cls(cfg, inputs, model, tokenizer, make_optimizer(cfg), settings, loss_and_grad, ranks)

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


def make_optimizer(cfg: TrainConfig) -> optim.Optimizer:
    """The optimizer --optimizer names, at --learning-rate."""
    if cfg.optimizer == "rmsprop":
        return optim.RMSprop(learning_rate=cfg.learning_rate)
    return optim.AdamW(learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay)


def train_step(parts: StepParts, groups: list[Group], rng: random.Random, seed: int = 0) -> StepResult:
    """One optimizer step over `groups` in grad_accumulation micro-batches; NonFiniteStep (and no
    update) when the loss or the gradient is not finite.

    With several ranks each scores its share of the groups and the weighted gradients are summed,
    so every rank applies the update one process would have computed from all the groups.
    """
    cfg, ranks, model = parts.cfg, parts.ranks, parts.model
    mx.random.seed(ranks.seed(seed))  # dropout draws, so that a resumed run repeats them
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    ga, k = cfg.micro_batches, len(parts.inputs.constitution.principles)
    split = [list(range(len(groups)))[i::ga] for i in range(ga)]
    # Principle orders are drawn for every group, in one process's order, before taking a share.
    orders = {n: principle_order(k, rng, cfg.shuffle_principles) for part in split for n in part}
    mine = set(ranks.shard(len(groups)))
    first = next((n for part in split for n in part if n in mine), None)
    # The KL terms average over all the step's response tokens: each part divides its sum by that
    # count over its weight, so the weighted parts (and ranks) add up to one process's mean.
    eos = parts.tokenizer.eos_token_id
    step_tokens = sum(len(r) for g in groups for r in response_ids(g.generations, eos, cfg.count_eos))
    totals = StepTotals()
    for part in ([n for n in part if n in mine] for part in split):
        if part:
            w = len(part) / len(groups)
            totals.add(micro_batch(parts, [groups[n] for n in part], [orders[n] for n in part], w, step_tokens))
    if ranks.size > 1:
        pairs = len(groups) * parts.inputs.num_variants
        totals = totals.reduce(ranks, model.trainable_parameters(), pairs)
    grads, grad_norm = totals.grads, 0.0
    assert grads is not None  # every step scores a group on some rank, and reduce() fills in the others
    if cfg.max_grad_norm > 0:
        grads, norm = optim.clip_grad_norm(grads, cfg.max_grad_norm)
        grad_norm = float(norm)
    if not (math.isfinite(totals.loss) and math.isfinite(grad_norm)):
        raise NonFiniteStep(totals.loss)
    parts.optimizer.update(model, grads)
    mx.eval(model.trainable_parameters(), parts.optimizer.state)
    fault_point("update")
    row_acc, col_acc, peak = totals.accuracy_and_peak()
    seconds = time.perf_counter() - t0
    shown = first if totals.scores else None  # the group whose matrix `scores` is
    return StepResult(
        loss=totals.sami,
        mi_bound=mi_lower_bound(totals.sami, parts.inputs.num_variants),
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
        variants=[v.label for v in groups[shown].variants] if shown is not None else [],
        query=groups[shown].query if shown is not None else "",
    )


def micro_batch(
    parts: StepParts, groups: list[Group], orders: list[list[int]], w: float, step_tokens: int
) -> StepTotals:
    """One micro-batch's loss and gradients, weighted by `w` (its share of the step's groups)."""
    batch = parts.scoring_batch(groups, orders=orders)
    inputs = step_inputs(batch, parts.settings)
    terms, g = parts.loss_and_grad(inputs, batch.shape[1], mx.array(step_tokens * w), parts.model.training)
    mx.eval(g)
    fault_point("scoring")
    g = tree_map(lambda x: x * w, g)
    mx.eval(g, terms)
    return StepTotals(
        g,
        float(terms.total) * w,
        float(terms.sami) * w,
        float(terms.kl) * w,
        float(terms.anchor) * w,
        batch.num_tokens,
        [terms.scores],
    )
