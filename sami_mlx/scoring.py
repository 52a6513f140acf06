"""The score matrix S[b, i, j] = mean log p(y_j | training_prompt(c_i, x_b)) over response tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn


@dataclass
class PairBatch:
    """All N x N (prompt_i, response_j) sequences of B groups, right-padded, with a response mask."""

    inputs: mx.array  # [B*N*N, L-1]
    targets: mx.array  # [B*N*N, L-1]
    mask: mx.array  # [B*N*N, L-1], 1 where the target is a response token
    shape: tuple[int, int]  # (B, N)

    @property
    def num_tokens(self) -> int:
        return int(self.inputs.shape[0] * self.inputs.shape[1])


def build_pairs(prompts: Sequence[Sequence[list[int]]], responses: Sequence[Sequence[list[int]]]) -> PairBatch:
    """Pair every prompt of a group with every response of the same group (row i, column j)."""
    B, N = len(prompts), len(prompts[0])
    seqs, starts = [], []
    for b in range(B):
        for i in range(N):
            for j in range(N):
                seqs.append(list(prompts[b][i]) + list(responses[b][j]))
                starts.append(len(prompts[b][i]))
    L = max(len(s) for s in seqs)
    padded = mx.array([s + [0] * (L - len(s)) for s in seqs], dtype=mx.int32)
    lengths = mx.array([len(s) for s in seqs])
    start = mx.array(starts)
    # Target position t predicts token t+1: response tokens are those with index >= start.
    pos = mx.arange(1, L)[None, :]
    mask = (pos >= start[:, None]) & (pos < lengths[:, None])
    return PairBatch(padded[:, :-1], padded[:, 1:], mask.astype(mx.float32), (B, N))


def token_logprobs(model: nn.Module, inputs: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Log-prob of each target token, and the logits that produced them."""
    logits = model(inputs).astype(mx.float32)
    return -nn.losses.cross_entropy(logits, targets), logits


def score_matrix(model: nn.Module, batch: PairBatch) -> mx.array:
    """S as a [B, N, N] array: mean response-token log-prob of each (constitution, response) pair."""
    logp, _ = token_logprobs(model, batch.inputs, batch.targets)
    return scores_from_logprobs(logp, batch)


def scores_from_logprobs(logp: mx.array, batch: PairBatch) -> mx.array:
    """Masked mean of per-token log-probs, folded into [B, N, N]."""
    B, N = batch.shape
    per_seq = (logp * batch.mask).sum(axis=1) / mx.maximum(batch.mask.sum(axis=1), 1)
    return per_seq.reshape(B, N, N)


def diagonal_rows(batch: PairBatch) -> mx.array:
    """Indices of the (c_j, y_j) sequences: each response under the constitution it was sampled for."""
    B, N = batch.shape
    return mx.array([b * N * N + j * N + j for b in range(B) for j in range(N)])


def kl_to_base(logits: mx.array, base_logits: mx.array, mask: mx.array) -> mx.array:
    """Mean per-token KL(pi || pi_base) over masked positions."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    base = base_logits - mx.logsumexp(base_logits, axis=-1, keepdims=True)
    kl = (mx.exp(logp) * (logp - base)).sum(axis=-1)
    return (kl * mask).sum() / mx.maximum(mask.sum(), 1)
