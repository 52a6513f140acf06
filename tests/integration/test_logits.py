"""The output layer a chunk of tokens at a time (sami_mlx.loop.logits): the same scores, KL terms and
LoRA gradients as the full logits, on every head this project loads, and less memory."""

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from helpers import randomise_lora_b
from mlx.utils import tree_flatten
from mlx_lm.models import llama

from sami_mlx.loop import logits
from sami_mlx.loop.adapters import adapters_disabled, attach_adapters
from sami_mlx.loop.loss import StepSettings, step_function, step_inputs
from sami_mlx.loop.scoring import ScoringBatch, kl_sum, scores_from_logprobs
from sami_mlx.objective import sami_loss

KL_BETA, ANCHOR_BETA = 0.3, 1.0


def llama_model(vocab: int = 384, hidden: int = 64, layers: int = 2, tied: bool = True, seed: int = 0) -> nn.Module:
    """A random fp32 llama built in memory (no tokenizer needed: the batches are token ids)."""
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=2 * hidden,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-5,
        vocab_size=vocab,
        tie_word_embeddings=tied,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def random_batch(
    seed: int, vocab: int, groups: int = 2, n: int = 3, response: tuple[int, int] = (1, 12)
) -> ScoringBatch:
    """Groups of `n` prompts and responses of random ids and lengths, with anchor prompts."""
    rng = np.random.default_rng(seed)

    def ids(lo: int, hi: int) -> list[int]:
        return [int(t) for t in rng.integers(1, vocab, size=int(rng.integers(lo, hi)))]

    prompts = [[ids(3, 15) for _ in range(n)] for _ in range(groups)]
    responses = [[ids(*response) for _ in range(n)] for _ in range(groups)]
    return ScoringBatch(prompts, responses, [ids(2, 8) for _ in range(groups)])


def full_logits_step(model, batch: ScoringBatch, kl_tokens: float):
    """Today's computation, written out: the N² sequences' full logits, cross-entropy, and the KL terms
    from the full logits of the diagonal and anchored sequences with and without adapters."""

    def kl(pairs):
        policy = model(pairs.inputs).astype(mx.float32)
        with adapters_disabled(model):
            base = mx.stop_gradient(model(pairs.inputs).astype(mx.float32))
        return kl_sum(policy, base, pairs.mask) / kl_tokens

    def loss_fn(model):
        pairs = batch.pairs()
        logp = -nn.losses.cross_entropy(model(pairs.inputs).astype(mx.float32), pairs.targets)
        S = scores_from_logprobs(logp, pairs)
        k, a = kl(batch.diagonal()), kl(batch.anchored())
        return sami_loss(S) + KL_BETA * k + ANCHOR_BETA * a, S, k, a

    (loss, S, k, a), grads = nn.value_and_grad(model, loss_fn)(model)
    return loss, S, k, a, grads


def chunked_step(model, batch: ScoringBatch, kl_tokens: float, shared: bool, compiled: bool = False):
    settings = StepSettings(KL_BETA, ANCHOR_BETA, shared, bucketed=compiled)
    step = step_function(model, settings, compiled)
    terms, grads = step(step_inputs(batch, settings), batch.shape[1], mx.array(kl_tokens), True)
    return terms.total, terms.scores, terms.kl, terms.anchor, grads


def assert_same(got, want, tol=1e-5):
    for name, g, w in zip(("loss", "S", "kl", "anchor"), got[:4], want[:4]):
        assert np.abs(np.array(g) - np.array(w)).max() < tol, (name, np.array(g), np.array(w))
    g_got, g_want = dict(tree_flatten(got[4])), dict(tree_flatten(want[4]))
    assert g_got.keys() == g_want.keys() and g_got
    for key in g_want:
        assert np.abs(np.array(g_got[key]) - np.array(g_want[key])).max() < tol, key
    # Not trivially equal: the adapters move the model, and gradients reach them.
    assert float(want[2]) > 1e-4 and max(np.abs(np.array(v)).max() for v in g_want.values()) > 1e-3


def adapted(model: nn.Module) -> nn.Module:
    attach_adapters(model, rank=4, scale=20.0, num_layers=-1)
    randomise_lora_b(model)
    mx.eval(model.parameters())
    return model


def heads():
    """(name, builder) of each output layer this project meets: tied embeddings (llama, qwen2), an
    untied lm_head, and 4-bit quantized heads of both kinds."""

    def quantized(tied):
        def build(_):
            model = llama_model(tied=tied)
            nn.quantize(model, group_size=32, bits=4)
            return model

        return build

    return [
        ("llama-tied", lambda paths: mlx_lm.load(str(paths["llama"]))[0]),
        ("qwen2-tied", lambda paths: mlx_lm.load(str(paths["qwen2"]))[0]),
        ("llama-lm_head", lambda _: llama_model(tied=False)),
        ("quantized-embedding", quantized(True)),
        ("quantized-lm_head", quantized(False)),
    ]


@pytest.fixture(scope="module")
def model_paths(tiny_model, tiny_qwen2):
    return {"llama": tiny_model, "qwen2": tiny_qwen2}


@pytest.mark.parametrize("path", ["shared", "naive", "compiled"])
@pytest.mark.parametrize(("name", "build"), heads(), ids=[h[0] for h in heads()])
def test_chunked_scores_kl_and_gradients_equal_the_full_logits(monkeypatch, model_paths, name, build, path):
    model = adapted(build(model_paths))
    layer = logits.output_layer(model)
    assert layer.chunk > 0, "the output layer of this model was not found"
    vocab = model.args.vocab_size
    batch = random_batch(1, vocab)
    tokens = float(sum(len(r) for g in batch.responses for r in g))
    want = full_logits_step(model, batch, tokens)
    # Five tokens a chunk: a dozen uneven chunks per pass, the last one short.
    monkeypatch.setattr(logits, "CHUNK_LOGITS", 5 * vocab)
    assert logits.output_layer(model).chunk == 5
    got = chunked_step(model, batch, tokens, shared=path != "naive", compiled=path == "compiled")
    assert_same(got, want)


def test_a_model_whose_head_is_not_found_keeps_its_full_logits(tiny_model):
    """Another architecture (here a wrapper) is scored from its full logits, with the same numbers."""
    model = mlx_lm.load(str(tiny_model))[0]

    class Wrapped(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def __call__(self, inputs, cache=None):
            return self.inner(inputs, cache=cache)

    wrapped = Wrapped(model)
    assert logits.output_layer(wrapped).chunk == 0 and logits.output_layer(model).chunk > 0
    x = mx.array([[1, 5, 9, 13, 17, 21]])
    full = model(x[:, :-1])
    want = -nn.losses.cross_entropy(full, x[:, 1:])
    for m in (model, wrapped):
        assert np.abs(np.array(logits.token_logprobs(m, x[:, :-1], x[:, 1:]) - want)).max() < 1e-5


def peak_above(fn) -> float:
    """MLX's peak memory while `fn()` is evaluated, above what was allocated before (bytes)."""
    mx.eval(mx.zeros(1))
    base = mx.get_active_memory()
    mx.reset_peak_memory()
    mx.eval(fn())
    return mx.get_peak_memory() - base


def test_chunks_lower_the_peak_memory_of_a_training_step(monkeypatch):
    """With a 16k vocabulary the full logits of a step's N² sequences and KL rows dominate its memory;
    a chunk at a time they do not: the step's peak drops by more than half, with the same loss."""
    vocab = 16384
    model = adapted(llama_model(vocab=vocab, hidden=32, layers=1, tied=False))
    batch = random_batch(2, vocab, groups=2, n=3, response=(16, 24))
    settings = StepSettings(KL_BETA, ANCHOR_BETA, shared=True)
    inputs = step_inputs(batch, settings)
    step = step_function(model, settings, False)
    results = {}

    def run():
        (loss, *_), grads = step(inputs, 3, mx.array(100.0), True)
        results.setdefault("loss", []).append(loss)
        return loss, grads

    monkeypatch.setattr(logits, "CHUNK_LOGITS", 2**18)  # 8 tokens a chunk: many more chunks than MLX runs at once
    chunked = peak_above(run)
    monkeypatch.setattr(logits, "SPLIT_ARCHITECTURES", frozenset())  # the full logits, as before
    full = peak_above(run)
    scored = 3 * sum(len(r) for g in batch.responses for r in g)  # each response under its group's 3 prompts
    assert full > scored * vocab * 4, full  # the full path really holds the N² sequences' logits
    assert chunked < 0.5 * full, (chunked / 2**20, full / 2**20)
    a, b = results["loss"]
    assert abs(a.item() - b.item()) < 1e-5


def test_passes_without_gradients_score_in_training_micro_batches(tiny_model):
    """The monitor's held-out MI and eval's intrinsic metric score a few groups at a time, as training
    does: the same matrices as one batch, and each part evaluated before the next is built."""
    from sami_mlx.loop.scoring import score_matrix, score_micro_batches

    model = mlx_lm.load(str(tiny_model))[0]
    batch = random_batch(3, model.args.vocab_size, groups=5, n=2)
    done = []
    S = score_micro_batches(model, batch, 2, on_progress=lambda d, t: done.append((d, t)))
    assert done == [(2, 5), (4, 5), (5, 5)]
    assert S.shape == (5, 2, 2)
    assert np.abs(np.array(S) - np.array(score_matrix(model, batch))).max() < 1e-5
