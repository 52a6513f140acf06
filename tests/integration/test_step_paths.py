"""The trainer's own step: which scoring path it takes (prefix-shared or naive), with or without
mx.compile, and that every path computes the same scores and gradients as the naive oracle."""

import random

import mlx.core as mx
import numpy as np
import pytest
from helpers import randomise_lora_b
from mlx.utils import tree_flatten

from sami_mlx.inputs.constitution import Variant
from sami_mlx.loop import loss, scoring
from sami_mlx.loop.loss import step_inputs
from sami_mlx.loop.rollout import Generation, Group
from sami_mlx.loop.train_step import train_step


@pytest.fixture(params=["llama", "qwen2"])
def arch_model(request, tiny_model, tiny_qwen2):
    return {"llama": tiny_model, "qwen2": tiny_qwen2}[request.param]


@pytest.fixture
def make_loop(tiny_loop):
    """`make_loop(model_dir, out, **settings)`: a loop with rank-4 adapters on every block, set to random
    non-zero values (lora_b starts at zero) so that the gradients reach every adapter matrix."""

    def make(model_dir, out, **kw):
        loop = tiny_loop(model=model_dir, out=out, learning_rate=1e-3, lora_rank=4, lora_layers=-1, **kw)
        mx.random.seed(5)
        randomise_lora_b(loop.model, 0.05)
        return loop

    return make


def make_groups(seed=0, lengths=(3, 7, 1)):
    rng = np.random.default_rng(seed)
    return [
        Group(
            q,
            f"query number {q}" + " and more" * q,
            [Variant((True, True)), Variant((False, True))],
            [Generation([int(t) for t in rng.integers(5, 300, n + j)], "", "length") for j in range(2)],
        )
        for q, n in enumerate(lengths)
    ]


def step_outputs(loop, groups, **kw):
    """(loss, S, gradients) of the trainer's step function on `groups`, in training mode."""
    batch = loop.step_parts.scoring_batch(groups, random.Random(0))
    loop.model.train()
    terms, grads = loop.step_parts.loss_and_grad(
        step_inputs(batch, loop.step_parts.settings), batch.shape[1], mx.array(100.0), True
    )
    mx.eval(terms.total, terms.scores, grads)
    return terms.total.item(), np.array(terms.scores), {k: np.array(v) for k, v in tree_flatten(grads)}


def spy(monkeypatch):
    """Count calls of the two scoring paths the trainer's step takes."""
    calls = {"shared": 0, "naive": 0}
    shared, naive = loss.shared_terms, scoring.score_pairs

    def count_shared(*a, **k):
        calls["shared"] += 1
        return shared(*a, **k)

    def count_naive(*a, **k):
        calls["naive"] += 1
        return naive(*a, **k)

    monkeypatch.setattr(loss, "shared_terms", count_shared)
    monkeypatch.setattr(scoring, "score_pairs", count_naive)
    return calls


def assert_same(a, b, tol=1e-4):
    (loss_a, S_a, g_a), (loss_b, S_b, g_b) = a, b
    assert loss_a == pytest.approx(loss_b, abs=1e-5)
    assert np.abs(S_a - S_b).max() < tol
    assert g_a.keys() == g_b.keys() and g_a
    for k in g_a:
        assert np.abs(g_a[k] - g_b[k]).max() < tol, k
    assert max(np.abs(g).max() for g in g_a.values()) > 1e-3  # not trivially zero


def test_trainer_step_shares_prefixes_and_matches_the_naive_oracle(arch_model, make_loop, tmp_path, monkeypatch):
    """llama's make_cache returns plain KVCaches: it must take the shared path, as qwen2 does."""
    calls = spy(monkeypatch)
    shared = make_loop(arch_model, tmp_path / "s", kl_beta=0.3, anchor_beta=0.2)
    assert shared.shared
    got = step_outputs(shared, make_groups())
    assert calls == {"shared": 1, "naive": 0}

    naive = make_loop(arch_model, tmp_path / "n", kl_beta=0.3, anchor_beta=0.2, scoring="naive")
    assert not naive.shared
    assert_same(got, step_outputs(naive, make_groups()))
    assert calls == {"shared": 1, "naive": 1}

    # And through train_step itself: the logged scores and loss agree.
    a = train_step(shared.step_parts, make_groups(), random.Random(1))
    b = train_step(naive.step_parts, make_groups(), random.Random(1))
    assert a.loss == pytest.approx(b.loss, abs=1e-5)
    assert np.abs(np.array(a.scores) - np.array(b.scores)).max() < 1e-4
    # The shared pass's KL terms (its own diagonal against the base's) equal the naive full-sequence ones.
    assert a.kl == pytest.approx(b.kl, rel=1e-3) and a.kl > 1e-4
    assert a.anchor_kl == pytest.approx(b.anchor_kl, rel=1e-3) and a.anchor_kl > 1e-4
    assert calls == {"shared": 2, "naive": 2}


def test_grad_checkpoint_scores_naively(tiny_model, make_loop, tmp_path, monkeypatch):
    calls = spy(monkeypatch)
    loop = make_loop(tiny_model, tmp_path, grad_checkpoint=True)
    assert not loop.shared
    step_outputs(loop, make_groups())
    assert calls == {"shared": 0, "naive": 1}


@pytest.mark.parametrize("scoring_path", ["shared", "naive"])
def test_compiled_step_matches_uncompiled(arch_model, make_loop, tmp_path, scoring_path):
    """--compile pads lengths to buckets and traces the step: same loss, scores and gradients."""
    kw = dict(scoring=scoring_path, kl_beta=0.3, anchor_beta=0.2)
    plain = step_outputs(make_loop(arch_model, tmp_path / "p", **kw), make_groups())
    loop = make_loop(arch_model, tmp_path / "c", compile=True, **kw)
    compiled = step_outputs(loop, make_groups())
    assert_same(plain, compiled)
    # Traced again on other lengths in the same buckets, and reused: the model is still usable after.
    again = step_outputs(loop, make_groups(lengths=(2, 6, 2)))
    assert np.isfinite(again[0])
    assert mx.isfinite(loop.model(mx.array([[1, 2, 3]]))).all().item()


def arrays_and_scores(model, batch, shared: bool, bucketed: bool) -> tuple[list[mx.array], mx.array]:
    """The 2-D arrays a step would be traced on, and S computed from them (shared pass or naive batch)."""
    if shared:
        inputs = scoring.shared_inputs(batch, bucketed)
        arrays = [inputs["prompts"], *(c["responses"] for c in inputs["chunks"])]
        return arrays, scoring.shared_terms(model, inputs, 2)[0]
    pairs = batch.pairs(bucketed).arrays()
    return list(pairs.values()), scoring.score_pair_inputs(model, pairs, 2)


def test_bucket_padding_does_not_change_scores(tiny_model):
    import mlx_lm

    model, _ = mlx_lm.load(str(tiny_model))
    groups = make_groups(3, lengths=(5, 2))
    prompts = [[[1] + [10 + q] * (4 + 3 * q + i) for i in range(2)] for q in range(2)]
    batch = scoring.ScoringBatch(prompts, [[g.tokens for g in group.generations] for group in groups])
    for shared in (True, False):
        _, exact = arrays_and_scores(model, batch, shared, bucketed=False)
        arrays, padded = arrays_and_scores(model, batch, shared, bucketed=True)
        assert max(a.shape[-1] for a in arrays if a.ndim == 2) >= 16  # really padded
        assert np.abs(np.array(exact) - np.array(padded)).max() < 1e-5


def test_bucket_sizes_repeat():
    assert [scoring.bucket(n) for n in (1, 16, 17, 25, 33, 49, 65, 97, 129, 300)] == [
        16,
        16,
        24,
        32,
        48,
        64,
        96,
        128,
        192,
        384,
    ]
    assert all(n <= scoring.bucket(n) < 1.5 * n + 16 for n in range(1, 2000))


def test_lora_dropout_shared_path_draws_one_mask_per_prompt(tiny_model, make_loop, tmp_path):
    """Documented difference: with dropout, the shared path's prompt tokens run once per prompt, so a
    row's entries share one prompt mask; the naive batch draws a mask per (prompt, response) pair."""
    # One-token responses, the same in every column: an entry depends only on its prompt's pass.
    groups = [
        Group(
            q,
            f"query {q}",
            [Variant((True, True)), Variant((False, True))],
            [Generation([40 + q], "", "length") for _ in range(2)],
        )
        for q in range(3)
    ]
    rows = {}
    for path in ("shared", "naive"):
        loop = make_loop(tiny_model, tmp_path / path, scoring=path, lora_dropout=0.5)
        mx.random.seed(0)
        _, S, _ = step_outputs(loop, groups)
        rows[path] = np.abs(S[:, :, 0] - S[:, :, 1]).max()
        loop.model.eval()  # without dropout the two columns are the same response: equal
        batch = loop.step_parts.scoring_batch(groups, random.Random(0))
        S_eval = scoring.score_matrix(loop.model, batch, shared=loop.shared)
        assert np.abs(np.array(S_eval[:, :, 0] - S_eval[:, :, 1])).max() < 1e-6
    assert rows["shared"] < 1e-6  # one mask per prompt: a row's equal responses score equally
    assert rows["naive"] > 1e-3  # one mask per pair: they differ


def test_compiled_run_resumes_bit_identical(tiny_config, tmp_path):
    """--compile keeps resume exact: a run stopped after its first step ends with the same adapters."""
    from sami_mlx import events as ev
    from sami_mlx.loop.trainer import resume, train

    # the perplexity guard at its default: the monitor's state is resumed too
    compiled = dict(steps=2, learning_rate=5e-3, lora_dropout=0.1, compile=True, seed=3, max_ppl_ratio=1.5)
    train(tiny_config(compiled, out=tmp_path / "full"))
    seen = []
    train(
        tiny_config(compiled, out=tmp_path / "part"),
        callbacks=[lambda e: seen.append(e) if isinstance(e, ev.StepCompleted) else None],
        should_stop=lambda: len(seen) >= 1,
    )
    resume(tmp_path / "part")
    a, b = (mx.load(str(tmp_path / d / "adapters.safetensors")) for d in ("full", "part"))
    assert a.keys() == b.keys() and all(mx.array_equal(a[k], b[k]).item() for k in a)
