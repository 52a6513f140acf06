"""Benchmark 1: a SAMI training step with prefix-shared scoring vs the naive N² batch.

Same model, adapters and inputs; prints time and peak memory of each, the speed-up, and the
largest difference between the two score matrices. N=4, prompt:response length 4:1.
"""

from __future__ import annotations

import argparse

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from common import SIZES, parameters, report, step_setup, timed
from mlx.utils import tree_flatten, tree_unflatten

from sami_mlx.adapters import adapter_weights, set_adapter_weights
from sami_mlx.objective import sami_loss
from sami_mlx.scoring import score_naive, score_shared


def run(size: str, n: int = 4) -> dict:
    model, batch, s = step_setup(size, n)
    # Non-zero adapters, so the comparison covers the adapted model, not just the base.
    model.update(tree_unflatten([(k, mx.random.normal(v.shape) * 0.01)
                                 for k, v in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b")]))
    start = adapter_weights(model)
    diff = mx.abs(score_naive(model, batch) - score_shared(model, batch)).max().item()
    results = {}
    for name, score in (("naive", score_naive), ("shared", score_shared)):
        set_adapter_weights(model, start)
        opt = optim.AdamW(learning_rate=1e-5)
        loss_and_grad = nn.value_and_grad(model, lambda m, score=score: sami_loss(score(m, batch)))

        def step(loss_and_grad=loss_and_grad, opt=opt):
            loss, grads = loss_and_grad(model)
            opt.update(model, grads)
            mx.eval(loss, model.trainable_parameters(), opt.state)

        results[name] = timed(step, s["reps"])
    (t_naive, m_naive), (t_shared, m_shared) = results["naive"], results["shared"]
    print(f"[{size}] {parameters(model) / 1e6:.1f}M params, N={n}, {s['groups']} groups, "
          f"prompt {s['prompt']} : response {s['response']} tokens")
    print(f"  naive N² batch : {t_naive * 1e3:8.1f} ms/step, step memory {m_naive / 2**20:8.1f} MiB")
    print(f"  prefix-shared  : {t_shared * 1e3:8.1f} ms/step, step memory {m_shared / 2**20:8.1f} MiB")
    print(f"  speed-up {t_naive / t_shared:.2f}x, step memory ratio {m_shared / m_naive:.2f}, "
          f"max |S_naive - S_shared| = {diff:.2e}")
    return {"ratio": t_naive / t_shared, "peak_memory_ratio": m_shared / m_naive, "max_abs_diff": diff}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    for size in args.sizes:
        report(f"scoring_step/{size}", **run(size))


if __name__ == "__main__":
    main()
