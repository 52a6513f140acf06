"""Benchmark 3: the engine's rollouts (all queries × variants in one BatchGenerator) vs calling
`mlx_lm.generate` once per prompt, on the same prompts with the same number of new tokens."""

from __future__ import annotations

import argparse
import random
import time

import mlx_lm
from common import SIZES, build_model, parameters, random_ids, report

from sami_mlx.rollout import generate_batch

SETTINGS = {"tiny": dict(prompts=32, prompt=128, response=32),
            "100m": dict(prompts=16, prompt=64, response=16)}


def run(size: str) -> dict:
    s = SETTINGS[size]
    model, tok = mlx_lm.load(str(build_model(size)))
    # No EOS during the benchmark: both sides generate exactly `response` tokens.
    tok._eos_token_ids = set()
    rng = random.Random(0)
    prompts = [random_ids(s["prompt"], tok.vocab_size, rng) for _ in range(s["prompts"])]
    generate_batch(model, tok, prompts[:2], 4)  # warm-up
    t0 = time.perf_counter()
    gens = generate_batch(model, tok, prompts, s["response"], batch_size=len(prompts))
    t_batch = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in prompts:
        mlx_lm.generate(model, tok, p, max_tokens=s["response"])
    t_seq = time.perf_counter() - t0
    tokens = sum(len(g.tokens) for g in gens)
    assert tokens == s["prompts"] * s["response"], tokens
    print(f"[{size}] {parameters(model) / 1e6:.1f}M params, {s['prompts']} prompts of {s['prompt']} tokens, "
          f"{s['response']} new tokens each")
    print(f"  mlx_lm.generate per prompt: {t_seq:7.2f} s ({tokens / t_seq:8.1f} tok/s)")
    print(f"  engine rollouts (batched) : {t_batch:7.2f} s ({tokens / t_batch:8.1f} tok/s)")
    print(f"  speed-up {t_seq / t_batch:.2f}x")
    return {"ratio": t_seq / t_batch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", nargs="*", default=list(SIZES), choices=list(SIZES))
    args = parser.parse_args()
    for size in args.sizes:
        report(f"rollouts/{size}", **run(size))


if __name__ == "__main__":
    main()
