"""The score matrix S[b, i, j] = mean log p(y_j | training_prompt(c_i, x_b)) over response tokens.

Two ways to compute it, with the same values and gradients:
- `score_shared` (the default) runs each prompt once into a KV cache, repeats the cache to the
  group's N responses and scores them all against it: N prompt passes instead of N², batched.
- `score_naive` runs all N² (prompt, response) sequences as one padded batch; it is the oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

Ids = list[int]


@dataclass
class ScoringBatch:
    """B groups: prompts[b][i] is constitution i's training prompt, responses[b][j] response j's ids;
    anchors[b], if given, is group b's prompt with no constitution."""

    prompts: Sequence[Sequence[Ids]]
    responses: Sequence[Sequence[Ids]]
    anchors: Sequence[Ids] | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.prompts), len(self.prompts[0])

    def pairs(self) -> PairBatch:
        """All N x N (prompt_i, response_j) sequences, row-major."""
        return build_pairs(self.prompts, self.responses)

    def diagonal(self) -> PairBatch:
        """Each response after the prompt it was sampled for: (c_j, y_j)."""
        B, N = self.shape
        return _pad([(self.prompts[b][j], self.responses[b][j]) for b in range(B) for j in range(N)], (B * N, 1))

    def anchored(self) -> PairBatch:
        """Each response after its group's prompt with no constitution: (x_b, y_j)."""
        B, N = self.shape
        assert self.anchors is not None, "a batch built without anchor prompts"
        return _pad([(self.anchors[b], self.responses[b][j]) for b in range(B) for j in range(N)], (B * N, 1))

    @property
    def num_tokens(self) -> int:
        """Tokens a naive N x N pass would process (the unit of tokens/s)."""
        return sum(len(p) + len(r) for ps, rs in zip(self.prompts, self.responses) for p in ps for r in rs)


@dataclass
class PairBatch:
    """Right-padded sequences with a mask over the response tokens among the targets."""

    inputs: mx.array  # [M, L-1]
    targets: mx.array  # [M, L-1]
    mask: mx.array  # [M, L-1], 1 where the target is a response token
    shape: tuple[int, int]  # (B, N)


def build_pairs(prompts: Sequence[Sequence[Ids]], responses: Sequence[Sequence[Ids]]) -> PairBatch:
    """Pair every prompt of a group with every response of the same group (row i, column j)."""
    B, N = len(prompts), len(prompts[0])
    seqs = [(prompts[b][i], responses[b][j]) for b in range(B) for i in range(N) for j in range(N)]
    return _pad(seqs, (B, N))


def _pad(seqs: list[tuple[Ids, Ids]], shape: tuple[int, int]) -> PairBatch:
    L = max(len(p) + len(r) for p, r in seqs)
    padded = mx.array([list(p) + list(r) + [0] * (L - len(p) - len(r)) for p, r in seqs], dtype=mx.int32)
    start = mx.array([len(p) for p, _ in seqs])
    end = mx.array([len(p) + len(r) for p, r in seqs])
    # Target position t predicts token t+1: response tokens are those with index >= start.
    pos = mx.arange(1, L)[None, :]
    mask = (pos >= start[:, None]) & (pos < end[:, None])
    return PairBatch(padded[:, :-1], padded[:, 1:], mask.astype(mx.float32), shape)


def token_logprobs(model: nn.Module, inputs: mx.array, targets: mx.array) -> tuple[mx.array, mx.array]:
    """Log-prob of each target token, and the logits that produced them."""
    logits = model(inputs).astype(mx.float32)
    return -nn.losses.cross_entropy(logits, targets), logits


def scores_from_logprobs(logp: mx.array, batch: PairBatch) -> mx.array:
    """Masked mean of per-token log-probs, folded into [B, N, N]."""
    B, N = batch.shape
    per_seq = (logp * batch.mask).sum(axis=1) / mx.maximum(batch.mask.sum(axis=1), 1)
    return per_seq.reshape(B, N, N)


def score_naive(model: nn.Module, batch: ScoringBatch) -> mx.array:
    """S as [B, N, N] from one padded forward pass over all N² sequences."""
    pairs = batch.pairs()
    logp, _ = token_logprobs(model, pairs.inputs, pairs.targets)
    return scores_from_logprobs(logp, pairs)


def score_shared(model: nn.Module, batch: ScoringBatch) -> mx.array:
    """S as [B, N, N]: all B·N prompts run once (left-padded, batched) into a KV cache, which is
    repeated N times so that each prompt scores its group's N responses in one batched pass."""
    B, N = batch.shape
    prompts = [list(p) for group in batch.prompts for p in group]  # row b*N + i
    Lp = max(len(p) for p in prompts)
    pad = [Lp - len(p) for p in prompts]
    cache = [BatchKVCache(pad) for _ in model.layers]
    for c in cache:  # allocate exactly what is needed, not generation's 256-token blocks
        c.step = Lp
    tokens = mx.array([[0] * k + p for k, p in zip(pad, prompts)], dtype=mx.int32)
    # Left padding: every prompt ends at the last position, whose logits predict response token 0.
    last = model(tokens, cache=cache)[:, -1:, :]
    for c in cache:  # row (b, i) -> rows (b, i, j) for the N responses j
        c.keys = mx.repeat(c.keys[..., : c._idx, :], N, axis=0)
        c.values = mx.repeat(c.values[..., : c._idx, :], N, axis=0)
        c.offset = mx.repeat(c.offset, N)
        c.left_padding = mx.repeat(c.left_padding, N)
    responses = [list(batch.responses[b][j]) for b in range(B) for _ in range(N) for j in range(N)]
    L = max(len(r) for r in responses)
    resp = mx.array([r + [0] * (L - len(r)) for r in responses], dtype=mx.int32)  # [B*N*N, L]
    mask = (mx.arange(L)[None, :] < mx.array([len(r) for r in responses])[:, None]).astype(mx.float32)
    for c in cache:
        c.step = max(L - 1, 1)
    logits = mx.repeat(last, N, axis=0)
    if L > 1:  # right padding at the end of a response is harmless under the causal mask
        logits = mx.concatenate([logits, model(resp[:, :-1], cache=cache)], axis=1)
    logp = -nn.losses.cross_entropy(logits.astype(mx.float32), resp)
    return ((logp * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1)).reshape(B, N, N)


def shared_scoring_supported(model: nn.Module) -> bool:
    """Prefix sharing needs plain KV caches (not rotating, quantized or recurrent state)."""
    return not hasattr(model, "make_cache") and all(type(c) is KVCache for c in make_prompt_cache(model))


def score_matrix(model: nn.Module, batch: ScoringBatch, shared: bool = True) -> mx.array:
    """S as [B, N, N]: prefix-shared where the model's cache allows it, else the naive batch."""
    if shared and shared_scoring_supported(model):
        return score_shared(model, batch)
    return score_naive(model, batch)


def kl_to_base(logits: mx.array, base_logits: mx.array, mask: mx.array, tokens: float | None = None) -> mx.array:
    """Per-token KL(pi || pi_base) summed over masked positions and divided by `tokens` (default:
    their count, the mean); a part of a bigger batch passes the whole batch's count."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    base = base_logits - mx.logsumexp(base_logits, axis=-1, keepdims=True)
    kl = (mx.exp(logp) * (logp - base)).sum(axis=-1)
    return (kl * mask).sum() / (mx.maximum(mask.sum(), 1) if tokens is None else max(tokens, 1))
