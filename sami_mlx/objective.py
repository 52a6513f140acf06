"""The SAMI objective: a symmetric InfoNCE over the constitution x response log-prob matrix, the KL
terms that regularise it, and the figures a step reports (MI bound, accuracies)."""

from __future__ import annotations

import math
from typing import NamedTuple

import mlx.core as mx


def sami_loss(S: mx.array) -> mx.array:
    """Loss of an N x N score matrix (or a batch [B, N, N]), S[i, j] = log p(y_j | c_i, x).

    Half the cross-entropy of each row picking its own response (softmax over j) plus half
    that of each column picking its own constitution (softmax over i), averaged over the batch.
    """
    if S.ndim == 2:
        S = S[None]
    if S.ndim != 3 or S.shape[1] != S.shape[2]:
        raise ValueError(f"sami_loss expects [N, N] or [B, N, N], got shape {tuple(S.shape)}")
    S = S.astype(mx.float32)
    diag = mx.diagonal(S, axis1=1, axis2=2)  # [B, N]
    row_ce = mx.logsumexp(S, axis=2) - diag  # softmax over responses j for each row i
    col_ce = mx.logsumexp(S, axis=1) - diag  # softmax over constitutions i for each column j
    return 0.5 * (row_ce.mean() + col_ce.mean())


class LossTerms(NamedTuple):
    """A step's loss and its parts: total = sami + kl_beta * kl + anchor_beta * anchor."""

    total: mx.array  # what the gradient is taken of
    sami: mx.array  # sami_loss(scores)
    scores: mx.array  # the score matrices S, [B, N, N]
    kl: mx.array  # per-token KL to the base after the constitution's prompts (0 when off)
    anchor: mx.array  # per-token KL to the base after prompts with no constitution (0 when off)


def regularised_loss(S: mx.array, kl: mx.array, anchor: mx.array, kl_beta: float, anchor_beta: float) -> LossTerms:
    """The SAMI loss of S plus the weighted KL terms, with each part kept for reporting."""
    sami = sami_loss(S)
    return LossTerms(sami + kl_beta * kl + anchor_beta * anchor, sami, S, kl, anchor)


def mi_lower_bound(loss: float, n: int) -> float:
    """log N - loss: the InfoNCE lower bound on I(Y; C | X), in nats."""
    return math.log(n) - loss


def diagonal_wins(S: mx.array) -> tuple[int, int]:
    """(row wins, column wins) over the matrices S ([N, N] or [B, N, N]): how many constitutions pick
    their own response (S[i, i] is the largest of row i) and how many responses pick their own
    constitution (S[j, j] is the largest of column j). Counts, so that ranks can add them up."""
    if S.ndim == 2:
        S = S[None]
    idx = mx.arange(S.shape[1])
    return int((mx.argmax(S, axis=2) == idx).sum()), int((mx.argmax(S, axis=1) == idx).sum())


def accuracies(S: mx.array) -> tuple[float, float]:
    """(row accuracy, column accuracy), the diagonal_wins of S as shares of its B x N rows. Row
    accuracy: how often each constitution picks its own response (S[i, i] is the largest of row i, a
    softmax over responses j); column accuracy: how often each response picks its own constitution
    (S[j, j] is the largest of column j)."""
    rows, cols = diagonal_wins(S)
    pairs = S.shape[-1] * (S.shape[0] if S.ndim == 3 else 1)
    return rows / pairs, cols / pairs
