"""The score matrix S[b, i, j] = mean log p(y_j | training_prompt(c_i, x_b)) over response tokens.

Two ways to compute it, with the same values and gradients:
- `score_shared` (the default) runs each prompt once into a KV cache, repeats the cache to the
  group's N responses and scores them all against it: N prompt passes instead of N², batched, the
  responses in a few batches of similar length so that short ones are not padded to the longest.
  The training step's KL terms come from the same pass (`shared_terms`).
- `score_naive` runs all N² (prompt, response) sequences as one padded batch; it is the oracle.

Both also take their inputs as a dict of padded arrays (`shared_inputs` for `shared_terms`,
`PairBatch.arrays` for `score_pair_inputs`), which is what a compiled training step (`mx.compile`) is
traced on; `bucket=True` pads lengths up to a few fixed sizes so that the traced shapes repeat.
Padding is masked, so it never changes a score.

With LoRA dropout in training mode the two paths draw masks differently: the naive batch draws one
mask per (prompt i, response j) sequence, the shared path one per prompt (its prompt tokens run once,
shared by the row's N responses) and one per (i, j) on the response tokens. Every entry of S has the
same distribution either way; the shared path's entries of a row are correlated through the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import BatchKVCache, KVCache, make_prompt_cache

from sami_mlx.loop.adapters import adapters_disabled
from sami_mlx.loop.logits import OutputLayer, output_layer, token_logprobs

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

    def groups(self, start: int, stop: int) -> ScoringBatch:
        """Groups `start` to `stop` (exclusive) of this batch."""
        anchors = None if self.anchors is None else self.anchors[start:stop]
        return ScoringBatch(self.prompts[start:stop], self.responses[start:stop], anchors)

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
    return scores_from_logprobs(token_logprobs(model, pairs.inputs, pairs.targets), pairs)


CHUNKS = 4  # the shared pass scores responses in at most this many groups of similar length
MERGE = 1.25  # ... and runs two neighbouring groups as one when the longer is at most this much longer


def length_groups(lengths: Sequence[int]) -> list[list[int]]:
    """Indices of `lengths` sorted by length, in up to CHUNKS groups of equal count; neighbours whose
    longest lengths are within MERGE of each other run as one (one bigger batch beats two that would
    save little padding, and equal lengths make one group, as before sorting)."""
    order = sorted(range(len(lengths)), key=lambda r: lengths[r])
    size = -(-len(order) // CHUNKS)
    groups: list[list[int]] = []
    for part in (order[k : k + size] for k in range(0, len(order), size)):
        if groups and lengths[part[-1]] <= MERGE * lengths[groups[-1][-1]]:
            groups[-1] += part
        else:
            groups.append(part)
    return groups


def shared_inputs(
    batch: ScoringBatch, bucketed: bool = False, diagonal: bool = False, anchored: bool = False
) -> dict[str, Any]:
    """The prefix-shared pass's arrays. "prompts": the B·N prompts (row b·N + i; with `anchored`, then
    the B prompts with no constitution, row B·N + b) left-padded, with their "left_padding". The
    responses, sorted by length, in up to CHUNKS "chunks" padded to their own longest: each holds
    "responses" and "lengths" (one row per response b·N + j), "rows" (the prompt row of each scoring
    row: response j under every prompt i of its group), with `diagonal` "diagonal" (each response's
    own prompt row, and its scoring row among "rows"), with `anchored` "anchors". "order" puts the
    scores of the chunks back in (b, i, j) order. Grouping by length wastes few tokens on padding:
    responses of 3 and 40 tokens no longer run as 40 each (`length_groups`)."""
    B, N = batch.shape
    prompts = [list(p) for group in batch.prompts for p in group]
    if anchored:
        assert batch.anchors is not None, "a batch built without anchor prompts"
        prompts += [list(a) for a in batch.anchors]
    responses = [list(r) for group in batch.responses for r in group]
    Lp = max(len(p) for p in prompts)
    Lp = bucket(Lp) if bucketed else Lp
    pad = [Lp - len(p) for p in prompts]
    chunks, flat = [], []
    # Bucketed (a compiled step), the groups are formed on the padded lengths: fewer distinct layouts.
    padded = [bucket(len(r)) if bucketed else len(r) for r in responses]
    for part in length_groups(padded):
        L = max(padded[r] for r in part)
        chunk = {
            "responses": mx.array([responses[r] + [0] * (L - len(responses[r])) for r in part], dtype=mx.int32),
            "lengths": mx.array([len(responses[r]) for r in part], dtype=mx.int32),
            "rows": mx.array([r // N * N + i for r in part for i in range(N)], dtype=mx.int32),
        }
        if diagonal:  # response b·N + j was sampled for prompt b·N + j: scoring row k·N + j of the chunk
            chunk["diagonal"] = mx.array(part, dtype=mx.int32)
            chunk["diagonal_rows"] = mx.array([k * N + r % N for k, r in enumerate(part)], dtype=mx.int32)
        if anchored:
            chunk["anchors"] = mx.array([B * N + r // N for r in part], dtype=mx.int32)
        chunks.append(chunk)
        flat += [r // N * N * N + i * N + r % N for r in part for i in range(N)]
    return {
        "prompts": mx.array([[0] * k + p for k, p in zip(pad, prompts)], dtype=mx.int32),
        "left_padding": mx.array(pad, dtype=mx.int32),
        "chunks": chunks,
        "order": mx.array(sorted(range(len(flat)), key=flat.__getitem__), dtype=mx.int32),
    }


def score_shared(model: nn.Module, batch: ScoringBatch) -> mx.array:
    """S as [B, N, N]: all B·N prompts run once (left-padded, batched) into a KV cache, and each
    prompt scores its group's N responses against that cache, in batches of similar length."""
    return shared_terms(model, shared_inputs(batch), batch.shape[1])[0]


@dataclass
class Prefill:
    """Prompts run once: the features (hidden states, or the logits of a model not cut at its output
    layer) at their last position and each layer's keys and values."""

    last: mx.array  # [P, 1, H]
    kv: list[tuple[mx.array, mx.array]]
    left_padding: mx.array  # [P]

    @classmethod
    def run(cls, model: nn.Module, layer: OutputLayer, tokens: mx.array, left_padding: mx.array) -> Prefill:
        P, Lp = tokens.shape
        # Any: mlx-lm's caches declare keys and values as None until their first update.
        cache: list[Any] = [BatchKVCache([0] * P) for _ in make_prompt_cache(model)]
        for c in cache:  # allocate exactly what is needed, not generation's 256-token blocks
            c.step = Lp
            c.left_padding, c.offset = left_padding, -left_padding
        # Left padding: every prompt ends at the last position, whose features predict response token 0.
        last = layer.body(tokens, cache=cache)[:, -1:, :]
        return cls(last, [(c.keys[..., : c._idx, :], c.values[..., : c._idx, :]) for c in cache], left_padding)

    def continue_with(self, layer: OutputLayer, rows: mx.array, responses: mx.array) -> mx.array:
        """Features [R, L, H] predicting each of `responses` (right-padded [R, L]) after prompt
        `rows[r]`; right padding at the end of a response is harmless under the causal mask."""
        L, Lp = responses.shape[1], self.kv[0][0].shape[2]
        features = mx.take(self.last, rows, axis=0)
        if L > 1:
            cache: list[Any] = []
            for keys, values in self.kv:
                c: Any = BatchKVCache([0] * rows.shape[0])  # keys and values are declared None until set
                c.keys, c.values = mx.take(keys, rows, axis=0), mx.take(values, rows, axis=0)
                c._idx, c.step = Lp, L - 1
                c.left_padding = mx.take(self.left_padding, rows)
                c.offset = Lp - c.left_padding
                cache.append(c)
            features = mx.concatenate([features, layer.body(responses[:, :-1], cache=cache)], axis=1)
        return features


def shared_terms(model: nn.Module, inputs: dict[str, Any], n: int) -> tuple[mx.array, mx.array | None, mx.array | None]:
    """(S [B, N, N], KL sum, anchor KL sum) from `shared_inputs`' arrays: each KL term is summed over
    the response tokens (None when the inputs were built without it). The KL's policy side is the
    scoring pass's own diagonal; the base (adapters off) runs the same prompts and responses. The
    output layer runs a chunk of tokens at a time (sami_mlx.loop.logits): no full logits are held."""
    chunks, layer = inputs["chunks"], output_layer(model)
    policy = Prefill.run(model, layer, inputs["prompts"], inputs["left_padding"])
    kl_on, anchor_on = "diagonal" in chunks[0], "anchors" in chunks[0]
    base = None
    if kl_on or anchor_on:
        with adapters_disabled(model):
            base = Prefill.run(model, layer, inputs["prompts"], inputs["left_padding"])
    scores, kl, anchor = [], mx.array(0.0), mx.array(0.0)
    for chunk in chunks:
        resp, m = chunk["responses"], chunk["responses"].shape[0]
        mask = (mx.arange(resp.shape[1])[None, :] < chunk["lengths"][:, None]).astype(mx.float32)
        rows, repeated = chunk["rows"], mx.repeat(resp, n, axis=0)  # row k·N + i: response k under prompt i
        if anchor_on:
            rows, repeated = mx.concatenate([rows, chunk["anchors"]]), mx.concatenate([repeated, resp])
        features = policy.continue_with(layer, rows, repeated)
        logp = layer.logprobs(features[: m * n], repeated[: m * n])
        row_mask = mx.repeat(mask, n, axis=0)
        scores.append((logp * row_mask).sum(axis=1) / mx.maximum(row_mask.sum(axis=1), 1))
        if base is None:
            continue
        wanted = [chunk[k] for k, on in (("diagonal", kl_on), ("anchors", anchor_on)) if on]
        base_rows, base_responses = mx.concatenate(wanted), mx.concatenate([resp] * len(wanted))
        with adapters_disabled(model):
            base_features = mx.stop_gradient(base.continue_with(layer, base_rows, base_responses))
        if kl_on:
            diagonal = mx.take(features, chunk["diagonal_rows"], axis=0)
            kl = kl + (layer.kl(diagonal, base_features[:m]) * mask).sum()
        if anchor_on:
            anchor = anchor + (layer.kl(features[m * n :], base_features[-m:]) * mask).sum()
    S = mx.take(mx.concatenate(scores), inputs["order"]).reshape(-1, n, n)
    return S, kl if kl_on else None, anchor if anchor_on else None


def shared_scoring_supported(model: nn.Module) -> bool:
    """Prefix sharing needs plain KV caches (not rotating, quantized or recurrent state): decided by
    the caches the model asks for, so llama-family models (whose make_cache returns plain KVCaches
    unless a layer uses a sliding window) share their prefixes too."""
    caches = make_prompt_cache(model)
    return bool(caches) and all(type(c) is KVCache for c in caches)


def score_pair_inputs(model: nn.Module, inputs: dict[str, mx.array], n: int) -> mx.array:
    """S as [B, N, N] from the naive batch's arrays (`PairBatch.arrays`), for groups of `n` variants."""
    M = inputs["inputs"].shape[0]
    return score_pairs(model, PairBatch(**inputs, shape=(M // (n * n), n)))


def score_matrix(model: nn.Module, batch: ScoringBatch, shared: bool = True) -> mx.array:
    """S as [B, N, N]: prefix-shared where the model's cache allows it, else the naive batch."""
    if shared and shared_scoring_supported(model):
        return score_shared(model, batch)
    return score_naive(model, batch)


def score_micro_batches(
    model: nn.Module,
    batch: ScoringBatch,
    groups: int,
    shared: bool = True,
    on_progress: Callable[[int, int], None] | None = None,
) -> mx.array:
    """S as [B, N, N], scored `groups` query groups at a time and evaluated one part after another, as
    training scores its micro-batches: a pass with no gradients (the monitor's held-out MI, eval's
    intrinsic metric) holds no more than one training micro-batch. `on_progress(done, total)` after each."""
    B, parts = batch.shape[0], []
    for start in range(0, B, max(groups, 1)):
        stop = min(start + max(groups, 1), B)
        S = score_matrix(model, batch.groups(start, stop), shared)
        mx.eval(S)
        parts.append(S)
        if on_progress is not None:
            on_progress(stop, B)
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=0)


def kl_sum(logits: mx.array, base_logits: mx.array, mask: mx.array) -> mx.array:
    """Per-token KL(pi || pi_base) summed over the positions where `mask` is 1."""
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    base = base_logits - mx.logsumexp(base_logits, axis=-1, keepdims=True)
    return ((mx.exp(logp) * (logp - base)).sum(axis=-1) * mask).sum()
