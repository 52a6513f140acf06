"""The loss of one micro-batch through the model: its score matrices and KL terms, combined by
objective.regularised_loss, and the compiled loss-and-gradient function. Plain functions of the model
and arrays; train_step.py adds the micro-batches up over ranks and applies the update."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn

from sami_mlx.loop.adapters import adapters_disabled
from sami_mlx.loop.logits import output_layer
from sami_mlx.loop.scoring import PairBatch, ScoringBatch, score_pair_inputs, shared_inputs, shared_terms
from sami_mlx.objective import LossTerms, regularised_loss

StepInputs = dict[str, dict[str, Any]]


@dataclass(frozen=True)
class StepSettings:
    """What the step's maths reads from the run's settings."""

    kl_beta: float = 0.0  # --kl-beta: KL to the base after the constitution's prompts
    anchor_beta: float = 0.0  # --anchor-beta: KL to the base after prompts with no constitution
    shared: bool = True  # score a group's prompts through one KV cache per prompt (else pair by pair)
    bucketed: bool = False  # lengths rounded up so that a compiled step retraces rarely


def step_inputs(batch: ScoringBatch, settings: StepSettings) -> StepInputs:
    """The padded arrays one micro-batch's loss reads (the shared pass's carry the KL terms' too)."""
    kl, anchor = settings.kl_beta > 0, settings.anchor_beta > 0
    if settings.shared:
        return {"scores": shared_inputs(batch, settings.bucketed, diagonal=kl, anchored=anchor)}
    inputs = {"scores": batch.pairs(settings.bucketed).arrays()}
    if settings.kl_beta > 0:
        inputs["diagonal"] = batch.diagonal(settings.bucketed).arrays()
    if settings.anchor_beta > 0:
        inputs["anchored"] = batch.anchored(settings.bucketed).arrays()
    return inputs


def step_loss(model: nn.Module, inputs: StepInputs, n: int, kl_tokens: mx.array, settings: StepSettings) -> LossTerms:
    """The loss of one micro-batch and its parts: the SAMI loss of the score matrices S plus the
    weighted KL terms, each KL summed over the response tokens and divided by `kl_tokens`."""
    zero = mx.array(0.0)
    if settings.shared:
        S, kl_total, anchor_total = shared_terms(model, inputs["scores"], n)
        tokens = mx.maximum(kl_tokens, 1)
        kl = zero if kl_total is None else kl_total / tokens
        anchor = zero if anchor_total is None else anchor_total / tokens
        return regularised_loss(S, kl, anchor, settings.kl_beta, settings.anchor_beta)
    S = score_pair_inputs(model, inputs["scores"], n)
    kl = anchor = zero
    if settings.kl_beta > 0:
        kl = kl_on(model, PairBatch(**inputs["diagonal"], shape=(0, n)), kl_tokens)
    if settings.anchor_beta > 0:
        anchor = kl_on(model, PairBatch(**inputs["anchored"], shape=(0, n)), kl_tokens)
    return regularised_loss(S, kl, anchor, settings.kl_beta, settings.anchor_beta)


def step_function(model: nn.Module, settings: StepSettings, compiled: bool) -> Callable:
    """(inputs, n, kl_tokens, training) -> (LossTerms, gradients of its total), compiled with
    --compile as mlx-lm compiles its SFT step: the model's arrays and the random state (dropout)
    are the traced state, and `training` is a constant so that train/eval mode retraces."""

    def loss(model, inputs, n, kl_tokens):
        return tuple(step_loss(model, inputs, n, kl_tokens, settings))  # the total first: its gradient

    loss_and_grad = nn.value_and_grad(model, loss)

    def step(inputs: StepInputs, n: int, kl_tokens: mx.array, training: bool):
        return loss_and_grad(model, inputs, n, kl_tokens)

    if compiled:
        state = [model.state, mx.random.state]
        step = mx.compile(step, inputs=state, outputs=state)

    def terms_and_grad(inputs: StepInputs, n: int, kl_tokens: mx.array, training: bool):
        values, grads = step(inputs, n, kl_tokens, training)
        return LossTerms(*values), grads

    return terms_and_grad


def kl_on(model: nn.Module, pairs, tokens: float | mx.array | None = None) -> mx.array:
    """Per-token KL(policy || base) over the response tokens of `pairs`, summed and divided by
    `tokens` (default: their count); the base is the model with its adapters switched off. The
    output layer runs a chunk of tokens at a time (sami_mlx.loop.logits)."""
    layer = output_layer(model)
    features = layer.body(pairs.inputs)
    with adapters_disabled(model):
        base = mx.stop_gradient(layer.body(pairs.inputs))
    total = (layer.kl(features, base) * pairs.mask).sum()
    return total / (mx.maximum(pairs.mask.sum(), 1) if tokens is None else mx.maximum(tokens, 1))
