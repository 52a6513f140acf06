import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from helpers import randomise_lora_b
from mlx.utils import tree_flatten

from sami_mlx.loop.adapters import adapters_disabled, attach_adapters
from sami_mlx.loop.scoring import ScoringBatch, build_pairs, kl_sum, score_naive, score_shared


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return mlx_lm.load(str(tiny_model))


def per_sequence_score(model, prompt, response):
    """log p(response | prompt) averaged over response tokens, one unpadded sequence at a time."""
    seq = mx.array([prompt + response])
    logits = model(seq[:, :-1]).astype(mx.float32)
    logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    targets = seq[0, 1:]
    positions = range(len(prompt) - 1, len(prompt) + len(response) - 1)
    return float(np.mean([logp[0, t, targets[t]].item() for t in positions]))


def make_groups(tokenizer, rng):
    prompts, responses = [], []
    for q in ["Human: hello there", "Human: what is the capital of France? it is a long question"]:
        prompts.append(
            [tokenizer.encode(f"{k}. Be {w}.\n{q}\nAssistant:") for k, w in enumerate(["kind", "rude", "brief"])]
        )
        responses.append([list(rng.integers(5, 300, size=int(rng.integers(1, 9)))) for _ in range(3)])
    return prompts, [[[int(t) for t in r] for r in g] for g in responses]


@pytest.mark.parametrize("score", [score_naive, score_shared])
def test_score_matrix_equals_per_sequence_computation(loaded, score):
    model, tok = loaded
    prompts, responses = make_groups(tok, np.random.default_rng(0))
    S = score(model, ScoringBatch(prompts, responses))
    assert S.shape == (2, 3, 3)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                ref = per_sequence_score(model, prompts[b][i], responses[b][j])
                assert S[b, i, j].item() == pytest.approx(ref, abs=1e-4)


def test_prefix_shared_scores_and_gradients_match_naive(tiny_model):
    from sami_mlx.loop.adapters import attach_adapters
    from sami_mlx.objective import sami_loss

    model, tok = mlx_lm.load(str(tiny_model))
    mx.random.seed(0)
    attach_adapters(model, rank=4, scale=20.0, num_layers=-1)
    randomise_lora_b(model)
    prompts, responses = make_groups(tok, np.random.default_rng(1))
    batch = ScoringBatch(prompts, responses)
    results = []
    for score in (score_naive, score_shared):
        loss_and_grad = nn.value_and_grad(model, lambda m, score=score: sami_loss(score(m, batch)))
        loss, grads = loss_and_grad(model)
        results.append((score(model, batch), loss, dict(tree_flatten(grads))))
    (s_naive, l_naive, g_naive), (s_shared, l_shared, g_shared) = results
    assert np.abs(np.array(s_naive) - np.array(s_shared)).max() < 1e-4
    assert l_naive.item() == pytest.approx(l_shared.item(), abs=1e-5)
    assert g_naive.keys() == g_shared.keys() and len(g_naive) > 0
    for k in g_naive:
        assert np.abs(np.array(g_naive[k]) - np.array(g_shared[k])).max() < 1e-4, k
    assert max(np.abs(np.array(g)).max() for g in g_naive.values()) > 1e-3  # gradients are not trivially zero


def test_mask_covers_response_tokens_only(loaded):
    _, tok = loaded
    prompts = [[[1, 10, 11, 12], [1, 20]]]
    responses = [[[30, 31, 32], [40]]]
    batch = build_pairs(prompts, responses)
    counts = batch.mask.sum(axis=1).tolist()
    assert counts == [3, 1, 3, 1]  # (i, j) row-major: the count is the response's length
    # Row (0, 0): prompt of 4 then 3 response tokens; targets at positions 3..5 are the response.
    row = batch.mask[0].tolist()
    assert row[:3] == [0, 0, 0] and row[3:6] == [1, 1, 1] and not any(row[6:])
    assert batch.targets[0, 3:6].tolist() == [30, 31, 32]


def test_prompt_tokens_do_not_count(loaded):
    model, tok = loaded
    response = [[tok.encode("Paris", add_special_tokens=False)] * 2]
    a = score_naive(model, ScoringBatch([[tok.encode("Human: capital?"), tok.encode("x y z")]], response))
    b = score_naive(model, ScoringBatch([[tok.encode("Human: capital?"), tok.encode("x y z q r s t u v")]], response))
    # Row 0 shares its prompt in both batches, so it must not move when another prompt grows.
    assert np.allclose(np.array(a[0, 0]), np.array(b[0, 0]), atol=1e-5)
    assert not np.allclose(np.array(a[0, 1]), np.array(b[0, 1]), atol=1e-3)


def test_diagonal_pairs_each_response_with_its_own_prompt(loaded):
    prompts = [[[1, 2], [1, 3]], [[1, 4], [1, 5]]]
    responses = [[[7], [8]], [[9], [10]]]
    diag = ScoringBatch(prompts, responses).diagonal()
    assert diag.inputs[:, :2].tolist() == [[1, 2], [1, 3], [1, 4], [1, 5]]
    assert diag.targets[:, 1].tolist() == [7, 8, 9, 10]
    assert diag.mask.sum(axis=1).tolist() == [1, 1, 1, 1]


def test_adapters_off_gives_base_model_and_kl(tiny_model):
    model, tok = mlx_lm.load(str(tiny_model))
    x = mx.array([tok.encode("Human: hello there, how are you?")])
    base = model(x)
    mx.random.seed(0)
    attach_adapters(model, rank=4, scale=20.0, num_layers=-1)
    # Give the adapters weight so the adapted model really differs from the base.
    randomise_lora_b(model)
    adapted = model(x)
    with adapters_disabled(model):
        off = model(x)
    back = model(x)
    assert np.allclose(np.array(off), np.array(base), atol=1e-5)
    assert not np.allclose(np.array(adapted), np.array(base), atol=1e-3)
    assert np.allclose(np.array(back), np.array(adapted), atol=1e-6)
    mask = mx.ones(x.shape)
    assert kl_sum(adapted, adapted, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_sum(adapted, base, mask).item() > 1e-4


def test_count_eos_adds_one_scored_token(loaded):
    model, tok = loaded
    prompts = [[tok.encode("Human: hi"), tok.encode("Human: yo")]]
    plain = build_pairs(prompts, [[[50, 51], [60]]])
    with_eos = build_pairs(prompts, [[[50, 51, tok.eos_token_id], [60, tok.eos_token_id]]])
    assert (with_eos.mask.sum(axis=1) - plain.mask.sum(axis=1)).tolist() == [1, 1, 1, 1]


def test_shared_pass_pads_each_length_group_to_its_own_longest(loaded):
    """Responses are scored in groups of similar length: two 40-token replies do not make the six
    2-token replies of the same step run as 40 tokens, and the scores still equal the naive oracle's."""
    from sami_mlx.loop.scoring import length_groups, shared_inputs

    model, tok = loaded
    rng = np.random.default_rng(3)
    lengths = [2, 40, 2, 2, 2, 40, 2, 2]  # one group of eight variants
    responses = [[[int(t) for t in rng.integers(5, 300, n)] for n in lengths]]
    prompts = [[tok.encode(f"{k}. Be brief.\nHuman: hi\nAssistant:") for k in range(8)]]
    batch = ScoringBatch(prompts, responses)
    inputs = shared_inputs(batch)
    assert sorted(c["responses"].shape[1] for c in inputs["chunks"]) == [2, 40]
    # Equal lengths make one batch; groups split only where the lengths jump.
    assert length_groups([16] * 8) == [list(range(8))]
    assert [len(g) for g in length_groups([3, 4, 8, 9, 20, 21, 40, 40])] == [2, 2, 2, 2]
    assert np.abs(np.array(score_shared(model, batch)) - np.array(score_naive(model, batch))).max() < 1e-4
