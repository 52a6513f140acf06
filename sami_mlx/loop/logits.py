"""Per-token log-probabilities and KL terms without the full logits.

A score matrix needs log p(token) at every response token of N² sequences, and the KL terms need
the whole distribution there: with a real vocabulary (32k-152k) the [tokens, V] logits would dwarf
everything else a step holds. So the model runs up to its final norm (the hidden states, [tokens, H]),
and the output layer (lm_head, or the tied embedding as a linear layer, quantized or not) with its
log-softmax runs a chunk of tokens at a time, the way fused linear cross-entropy does: the forward
pass keeps only each chunk's per-token result, and the backward pass (a custom vjp) rebuilds one
chunk's logits at a time, so memory grows with the chunk, not with tokens x V.

MLX encodes work ahead of the computation (on the CPU about a hundred operations, ten chunks or so),
so a step holds a few chunks at once: measured, about ten chunks' logits whatever the number of tokens.

A model whose output layer is not found this way keeps today's path: its full logits, as one chunk.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

# Logits one chunk holds: 2**22 floats (16 MiB in fp32) is 85 tokens of a 49k vocabulary, 32 of a
# 128k one. Measured on the CPU (SmolLM2's head, 1k-4k tokens): about ten chunks in flight, 160 MiB
# for the log-probs' forward and backward passes, where 32 MiB chunks held 330 MiB, at the same speed.
CHUNK_LOGITS = 2**22

# mlx-lm architectures whose Model.__call__ is `self.model(inputs, cache)` (ending in the final norm)
# followed by `lm_head`, or `model.embed_tokens.as_linear` with tied embeddings (mistral loads as llama).
SPLIT_ARCHITECTURES = frozenset({"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3"})


def _identity(x: mx.array) -> mx.array:
    return x


@dataclass(frozen=True)
class OutputLayer:
    """A model cut before its output layer: `body(inputs, cache=None)` gives the features and
    `head(features)` the logits; `chunk` tokens go through the head at a time (0: the features are
    the full logits already, today's path)."""

    body: Callable[..., mx.array]
    head: Callable[[mx.array], mx.array]
    chunk: int

    def logprobs(self, features: mx.array, targets: mx.array) -> mx.array:
        """log p(targets) at each position, shaped like `targets` (fp32)."""
        return self._per_token(_logprob, features, targets)

    def kl(self, features: mx.array, base_features: mx.array) -> mx.array:
        """Per-token KL(pi || pi_base) between the distributions of `features` and `base_features`
        (the base's taken as constants: no gradient reaches them)."""
        return self._per_token(_kl, features, mx.stop_gradient(base_features))

    def _per_token(self, fn: Callable[..., mx.array], features: mx.array, other: mx.array) -> mx.array:
        if not self.chunk:  # the full logits: one chunk, no recomputation (the fallback)
            return fn(features.astype(mx.float32), other if _is_ids(other) else other.astype(mx.float32))
        shape = features.shape[:-1]
        T = math.prod(shape)
        flat, flat_other = features.reshape(T, -1), other.reshape(T, *other.shape[len(shape) :])
        return _chunked(fn, self.head, self.chunk)(flat, flat_other).reshape(shape)


def _chunked(fn: Callable[..., mx.array], head: Callable[[mx.array], mx.array], size: int) -> Callable:
    """(features [T, H], other [T] or [T, H]) -> fn(logits, other's) [T], `size` tokens at a time.

    Forward and backward each run the chunks one after another: each chunk's input depends on the
    previous chunk's result (mx.depends), or MLX's scheduler, which runs independent branches side by
    side, would hold every chunk's logits at once. The backward pass rebuilds a chunk's logits from
    its features instead of keeping them. The head's own parameters get no gradient: they are frozen
    (the adapters sit on the blocks)."""

    def one(h: mx.array, other: mx.array) -> mx.array:
        return fn(head(h).astype(mx.float32), other if _is_ids(other) else head(other).astype(mx.float32))

    def spans(T: int) -> list[tuple[int, int]]:
        return [(s, min(s + size, T)) for s in range(0, T, size)]

    @mx.custom_function
    def run(features: mx.array, other: mx.array) -> mx.array:
        parts: list[mx.array] = []
        for a, b in spans(features.shape[0]):
            h = features[a:b] if not parts else mx.depends(features[a:b], parts[-1])
            parts.append(one(h, other[a:b]))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)

    @run.vjp
    def run_vjp(primals: list[mx.array], cotangent: mx.array, output: mx.array) -> tuple[mx.array, mx.array]:
        features, other = primals
        grads: list[mx.array] = []
        for a, b in spans(features.shape[0]):
            h = mx.depends(features[a:b], grads[-1] if grads else output)
            _, (g,) = mx.vjp(lambda x, o=other[a:b]: one(x, o), [h], [cotangent[a:b]])
            grads.append(g)
        grad = grads[0] if len(grads) == 1 else mx.concatenate(grads)
        return grad, mx.zeros_like(other)  # the ids and the base's features take no gradient

    return run


def _is_ids(x: mx.array) -> bool:
    return mx.issubdtype(x.dtype, mx.integer)


def _logprob(logits: mx.array, targets: mx.array) -> mx.array:
    # As nn.losses.cross_entropy computes it (negated); indices carry no gradient.
    score = mx.take_along_axis(logits, mx.stop_gradient(targets)[..., None], axis=-1).squeeze(-1)
    return score - mx.logsumexp(logits, axis=-1)


def _kl(logits: mx.array, base_logits: mx.array) -> mx.array:
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    base = mx.stop_gradient(base_logits - mx.logsumexp(base_logits, axis=-1, keepdims=True))
    return (mx.exp(logp) * (logp - base)).sum(axis=-1)


def output_layer(model: nn.Module, chunk_logits: int | None = None) -> OutputLayer:
    """`model` cut before its output layer, with chunks of `chunk_logits` logits (default
    CHUNK_LOGITS); a model of another architecture gets its full logits (chunk 0)."""
    inner, args = getattr(model, "model", None), getattr(model, "args", None)
    tied = getattr(args, "tie_word_embeddings", None)
    head: Callable[[mx.array], mx.array] | None = None
    if type(model).__module__ in SPLIT_ARCHITECTURES and inner is not None and tied is not None:
        head = inner.embed_tokens.as_linear if tied else getattr(model, "lm_head", None)
    vocab = getattr(args, "vocab_size", 0)
    if inner is None or head is None or not vocab:
        return OutputLayer(model, _identity, 0)
    chunk = max(1, (chunk_logits or CHUNK_LOGITS) // vocab)
    return OutputLayer(lambda inputs, cache=None: inner(inputs, cache), head, chunk)


def token_logprobs(model: nn.Module, inputs: mx.array, targets: mx.array) -> mx.array:
    """log p(targets[t] | inputs[: t + 1]) at each position of a batch of sequences (fp32)."""
    layer = output_layer(model)
    return layer.logprobs(layer.body(inputs), targets)
