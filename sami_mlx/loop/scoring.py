"""The score matrix S[b, i, j] = mean log p(y_j | training_prompt(c_i, x_b)) over response tokens.

Two ways to compute it, with the same values and gradients:
- `score_shared` (the default) runs each prompt once into a KV cache, repeats the cache to the
  group's N responses and scores them all against it: N prompt passes instead of N², batched.
- `score_naive` runs all N² (prompt, response) sequences as one padded batch; it is the oracle.

Both also take their inputs as a dict of padded arrays (`scoring_inputs`, then `scores_from_inputs`),
which is what a compiled training step (`mx.compile`) is traced on; `bucket=True` pads lengths up to
a few fixed sizes so that the traced shapes repeat. Padding is masked, so it never changes a score.

With LoRA dropout in training mode the two paths draw masks differently: the naive batch draws one
mask per (prompt i, response j) sequence, the shared path one per prompt (its prompt tokens run once,
shared by the row's N responses) and one per (i, j) on the response tokens. Every entry of S has the
same distribution either way; the shared path's entries of a row are correlated through the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

Ids = list[int]


def bucket(n: int) -> int:
    """`n` rounded up to 16·2^k or 24·2^k (16, 24, 32, 48, 64, 96, ...): at most a third more tokens,
    and a handful of distinct shapes for a compiled step to trace."""
    size = 16
    while size < n:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size


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

    def pairs(self, bucketed: bool = False) -> PairBatch:
        """All N x N (prompt_i, response_j) sequences, row-major."""
        return build_pairs(self.prompts, self.responses, bucketed)

    def diagonal(self, bucketed: bool = False) -> PairBatch:
        """Each response after the prompt it was sampled for: (c_j, y_j)."""
        B, N = self.shape
        seqs = [(self.prompts[b][j], self.responses[b][j]) for b in range(B) for j in range(N)]
        return _pad(seqs, (B * N, 1), bucketed)

    def anchored(self, bucketed: bool = False) -> PairBatch:
        """Each response after its group's prompt with no constitution: (x_b, y_j)."""
        B, N = self.shape
        assert self.anchors is not None, "a batch built without anchor prompts"
        seqs = [(self.anchors[b], self.responses[b][j]) for b in range(B) for j in range(N)]
        return _pad(seqs, (B * N, 1), bucketed)

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

    def arrays(self) -> dict[str, mx.array]:
        """The arrays alone, as a compiled function takes them."""
        return {"inputs": self.inputs, "targets": self.targets, "mask": self.mask}


def build_pairs(
    prompts: Sequence[Sequence[Ids]], responses: Sequence[Sequence[Ids]], bucketed: bool = False
) -> PairBatch:
    """Pair every prompt of a group with every response of the same group (row i, column j)."""
    B, N = len(prompts), len(prompts[0])
    seqs = [(prompts[b][i], responses[b][j]) for b in range(B) for i in range(N) for j in range(N)]
    return _pad(seqs, (B, N), bucketed)


def _pad(seqs: list[tuple[Ids, Ids]], shape: tuple[int, int], bucketed: bool = False) -> PairBatch:
    L = max(len(p) + len(r) for p, r in seqs)
    L = bucket(L - 1) + 1 if bucketed else L  # L-1 inputs and targets per row
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
    return score_pairs(model, batch.pairs())


def score_pairs(model: nn.Module, pairs: PairBatch) -> mx.array:
    """S as [B, N, N] from the padded N² (prompt, response) sequences."""
    logp, _ = token_logprobs(model, pairs.inputs, pairs.targets)
    return scores_from_logprobs(logp, pairs)


def shared_inputs(batch: ScoringBatch, bucketed: bool = False) -> dict[str, mx.array]:
    """The prefix-shared pass's arrays: the B·N prompts left-padded (row b·N + i) with their padding,
    and the B·N responses right-padded (row b·N + j) with their lengths."""
    prompts = [list(p) for group in batch.prompts for p in group]
    responses = [list(r) for group in batch.responses for r in group]
    Lp = max(len(p) for p in prompts)
    L = max(len(r) for r in responses)
    if bucketed:
        Lp, L = bucket(Lp), bucket(L)
    pad = [Lp - len(p) for p in prompts]
    return {
        "prompts": mx.array([[0] * k + p for k, p in zip(pad, prompts)], dtype=mx.int32),
        "left_padding": mx.array(pad, dtype=mx.int32),
        "responses": mx.array([r + [0] * (L - len(r)) for r in responses], dtype=mx.int32),
        "lengths": mx.array([len(r) for r in responses], dtype=mx.int32),
    }


def score_shared(model: nn.Module, batch: ScoringBatch) -> mx.array:
    """S as [B, N, N]: all B·N prompts run once (left-padded, batched) into a KV cache, which is
    repeated N times so that each prompt scores its group's N responses in one batched pass."""
    return score_shared_inputs(model, shared_inputs(batch), batch.shape[1])


def score_shared_inputs(model: nn.Module, inputs: dict[str, mx.array], n: int) -> mx.array:
    """`score_shared` on the arrays of `shared_inputs`, for groups of `n` variants."""
    tokens, pad = inputs["prompts"], inputs["left_padding"]
    BN, Lp = tokens.shape
    B, N, L = BN // n, n, inputs["responses"].shape[1]
    # Any: mlx-lm's caches declare keys and values as None until their first update.
    cache: list[Any] = [BatchKVCache([0] * BN) for _ in make_prompt_cache(model)]
    for c in cache:  # allocate exactly what is needed, not generation's 256-token blocks
        c.step = Lp
        c.left_padding, c.offset = pad, -pad
    # Left padding: every prompt ends at the last position, whose logits predict response token 0.
    last = model(tokens, cache=cache)[:, -1:, :]
    for c in cache:  # row (b, i) -> rows (b, i, j) for the N responses j
        c.keys = mx.repeat(c.keys[..., : c._idx, :], N, axis=0)
        c.values = mx.repeat(c.values[..., : c._idx, :], N, axis=0)
        c.offset = mx.repeat(c.offset, N)
        c.left_padding = mx.repeat(c.left_padding, N)
        c.step = max(L - 1, 1)
    # Row (b, i, j) scores response (b, j): the group's N responses repeat for each of its N prompts.
    resp = mx.broadcast_to(inputs["responses"].reshape(B, 1, N, L), (B, N, N, L)).reshape(B * N * N, L)
    lengths = mx.broadcast_to(inputs["lengths"].reshape(B, 1, N), (B, N, N)).reshape(-1)
    mask = (mx.arange(L)[None, :] < lengths[:, None]).astype(mx.float32)
    logits = mx.repeat(last, N, axis=0)
    if L > 1:  # right padding at the end of a response is harmless under the causal mask
        logits = mx.concatenate([logits, model(resp[:, :-1], cache=cache)], axis=1)
    logp = -nn.losses.cross_entropy(logits.astype(mx.float32), resp)
    return ((logp * mask).sum(axis=1) / mx.maximum(mask.sum(axis=1), 1)).reshape(B, N, N)


def shared_scoring_supported(model: nn.Module) -> bool:
    """Prefix sharing needs plain KV caches (not rotating, quantized or recurrent state): decided by
    the caches the model asks for, so llama-family models (whose make_cache returns plain KVCaches
    unless a layer uses a sliding window) share their prefixes too."""
    caches = make_prompt_cache(model)
    return bool(caches) and all(type(c) is KVCache for c in caches)


def scoring_inputs(batch: ScoringBatch, shared: bool, bucketed: bool = False) -> dict[str, mx.array]:
    """The arrays `scores_from_inputs` takes: the shared pass's or the naive batch's."""
    return shared_inputs(batch, bucketed) if shared else batch.pairs(bucketed).arrays()


def scores_from_inputs(model: nn.Module, inputs: dict[str, mx.array], n: int, shared: bool) -> mx.array:
    """S as [B, N, N] from `scoring_inputs`' arrays (`shared` as they were built)."""
    if shared:
        return score_shared_inputs(model, inputs, n)
    M = inputs["inputs"].shape[0]
    return score_pairs(model, PairBatch(**inputs, shape=(M // (n * n), n)))


def score_matrix(model: nn.Module, batch: ScoringBatch, shared: bool = True) -> mx.array:
    """S as [B, N, N]: prefix-shared where the model's cache allows it, else the naive batch."""
    if shared and shared_scoring_supported(model):
        return score_shared(model, batch)
    return score_naive(model, batch)


def kl_to_base(
    logits: mx.array, base_logits: mx.array, mask: mx.array, tokens: float | mx.array | None = None
) -> mx.array:
    """Per-token KL(pi || pi_base) summed over masked positions and divided by `tokens` (default:
    their count, the mean); a part of a bigger batch passes the whole batch's count."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    base = base_logits - mx.logsumexp(base_logits, axis=-1, keepdims=True)
    kl = (mx.exp(logp) * (logp - base)).sum(axis=-1)
    return (kl * mask).sum() / (mx.maximum(mask.sum(), 1) if tokens is None else mx.maximum(tokens, 1))
