import math

import mlx.core as mx
import numpy as np
import pytest

from sami_mlx.objective import accuracies, mi_lower_bound, sami_loss


def reference_loss(S: np.ndarray) -> float:
    """An independent re-derivation: explicit softmax probabilities, loop over rows and columns."""
    S = np.asarray(S, dtype=np.float64)
    n = S.shape[0]
    row = [-math.log(math.exp(S[i, i]) / sum(math.exp(S[i, j]) for j in range(n))) for i in range(n)]
    col = [-math.log(math.exp(S[j, j]) / sum(math.exp(S[i, j]) for i in range(n))) for j in range(n)]
    return 0.5 * (sum(row) / n + sum(col) / n)


def test_hand_computed_2x2():
    S = mx.array([[0.0, -1.0], [-2.0, 0.0]])
    # rows: log(1 + e^-1), log(1 + e^-2); columns: log(1 + e^-2), log(1 + e^-1)
    expected = 0.5 * (math.log1p(math.exp(-1)) + math.log1p(math.exp(-2)))
    assert sami_loss(S).item() == pytest.approx(expected, abs=1e-6)
    assert expected == pytest.approx(0.22009, abs=1e-5)


def test_asymmetric_matrix_uses_both_directions():
    # Rows and columns disagree here, so a loss that only used one direction would differ.
    S = mx.array([[-1.0, -3.0, -0.5], [-2.0, -0.2, -4.0], [-0.1, -5.0, -2.0]])
    row_only = float(np.mean([np.log(np.exp(r).sum()) - r[i] for i, r in enumerate(np.array(S))]))
    got = sami_loss(S).item()
    assert got == pytest.approx(reference_loss(np.array(S)), abs=1e-5)
    assert abs(got - row_only) > 1e-2


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_matches_reference_on_random_matrices(n):
    rng = np.random.default_rng(n)
    for _ in range(5):
        S = rng.normal(-3, 2, size=(n, n))
        assert sami_loss(mx.array(S)).item() == pytest.approx(reference_loss(S), abs=1e-5)


def test_batch_is_mean_of_groups():
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(5, 4, 4))
    each = [reference_loss(s) for s in batch]
    assert sami_loss(mx.array(batch)).item() == pytest.approx(np.mean(each), abs=1e-5)


def test_uniform_scores_give_log_n_and_zero_bound():
    for n in (2, 4, 16):
        loss = sami_loss(mx.full((n, n), -2.5)).item()
        assert loss == pytest.approx(math.log(n), abs=1e-5)
        assert mi_lower_bound(loss, n) == pytest.approx(0.0, abs=1e-5)


def test_separated_diagonal_approaches_log_n_bound():
    n = 4
    S = mx.full((n, n), -50.0) + mx.eye(n) * 49.0
    loss = sami_loss(S).item()
    assert loss < 1e-6
    assert mi_lower_bound(loss, n) == pytest.approx(math.log(n), abs=1e-5)


def test_accuracies_count_diagonal_wins():
    S = mx.array([[1.0, -1.0, -1.0], [0.5, 0.0, -1.0], [-1.0, -1.0, 0.0]])
    row, col = accuracies(S)
    assert row == pytest.approx(2 / 3)  # row 1 prefers response 0
    assert col == pytest.approx(1.0)  # every column still prefers its own constitution


def test_gradient_raises_diagonal():
    S = mx.array([[-1.0, -1.0], [-1.0, -1.0]])
    g = mx.grad(sami_loss)(S)
    assert (mx.diagonal(g) < 0).all().item()  # descending the loss raises the diagonal
    assert (g[0, 1] > 0).item() and (g[1, 0] > 0).item()


def test_rejects_non_square():
    with pytest.raises(ValueError):
        sami_loss(mx.zeros((2, 3)))
