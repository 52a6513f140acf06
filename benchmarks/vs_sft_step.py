"""Benchmark 2: a SAMI training step vs mlx-lm's own SFT step over the same N² sequences.

The baseline is `mlx_lm.tuner.trainer.default_loss` under `nn.value_and_grad` on the B·N²
(prompt_i + response_j) sequences, masked to the responses; the SAMI step scores the same
pairs with prefix sharing and takes the SAMI loss. Same model, adapters and optimizer.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from common import main_by_size, parameters, step_setup, timed
from mlx_lm.tuner.trainer import default_loss

from sami_mlx.loop.scoring import score_shared
from sami_mlx.objective import sami_loss


def run(size: str, n: int = 4) -> dict:
    model, batch, s = step_setup(size, n)
    prompts, responses = batch.prompts, batch.responses
    seqs = [p + r for g in range(s["groups"]) for p in prompts[g] for r in responses[g]]
    sft_batch = mx.array(seqs)
    lengths = mx.array([[s["prompt"], s["prompt"] + s["response"] - 1]] * len(seqs))

    def make_step(loss_fn):
        opt = optim.AdamW(learning_rate=1e-5)
        loss_and_grad = nn.value_and_grad(model, loss_fn)

        def step():
            out, grads = loss_and_grad(model)
            opt.update(model, grads)
            mx.eval(out, model.trainable_parameters(), opt.state)

        return step

    t_sft, m_sft = timed(make_step(lambda m: default_loss(m, sft_batch, lengths)), s["reps"])
    t_sami, m_sami = timed(make_step(lambda m: sami_loss(score_shared(m, batch))), s["reps"])
    print(
        f"[{size}] {parameters(model) / 1e6:.1f}M params, N={n}, {s['groups']} groups, "
        f"{len(seqs)} sequences of {s['prompt']} + {s['response']} tokens"
    )
    print(f"  mlx-lm SFT step (default_loss): {t_sft * 1e3:8.1f} ms, step memory {m_sft / 2**20:8.1f} MiB")
    print(f"  SAMI step (prefix-shared)     : {t_sami * 1e3:8.1f} ms, step memory {m_sami / 2**20:8.1f} MiB")
    print(f"  speed-up {t_sft / t_sami:.2f}x, step memory ratio {m_sami / m_sft:.2f}")
    return {"ratio": t_sft / t_sami, "peak_memory_ratio": m_sami / m_sft}


def main() -> None:
    main_by_size("vs_sft_step", run, __doc__)


if __name__ == "__main__":
    main()
