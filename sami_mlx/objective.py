"""The SAMI objective: a symmetric InfoNCE over the constitution x response log-prob matrix."""

from __future__ import annotations

import math

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


def mi_lower_bound(loss: float, n: int) -> float:
    """log N - loss: the InfoNCE lower bound on I(Y; C | X), in nats."""
    return math.log(n) - loss


def accuracies(S: mx.array) -> tuple[float, float]:
    """(row accuracy, column accuracy). Row accuracy: how often each constitution picks its own
    response (S[i, i] is the largest of row i, a softmax over responses j); column accuracy: how
    often each response picks its own constitution (S[j, j] is the largest of column j)."""
    if S.ndim == 2:
        S = S[None]
    idx = mx.arange(S.shape[1])
    row = (mx.argmax(S, axis=2) == idx).astype(mx.float32).mean()
    col = (mx.argmax(S, axis=1) == idx).astype(mx.float32).mean()
    return float(row), float(col)
