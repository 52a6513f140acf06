"""Benchmark: the engine's rollouts (`generate_batch`: one BatchGenerator, token ids kept, stop
strings watched) vs `mlx_lm.batch_generate`, its real peer, on the same prompts with the same number
of new tokens and the same batch sizes. Prints throughput and peak memory; ends with a JSON line."""

from __future__ import annotations

import random
import time

import mlx.core as mx
import mlx_lm
from common import build_model, main_by_size, parameters, random_ids

from sami_mlx.loop.rollout import generate_batch

SETTINGS = {"tiny": dict(prompts=32, prompt=128, response=32), "100m": dict(prompts=16, prompt=64, response=16)}


def measured(fn) -> tuple[float, float, object]:
    """(seconds, peak bytes above what was resident, result) of fn()."""
    mx.clear_cache()
    resident = mx.get_active_memory()
    mx.reset_peak_memory()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, mx.get_peak_memory() - resident, out


def run(size: str) -> dict:
    s = SETTINGS[size]
    model, tok = mlx_lm.load(str(build_model(size)))
    # No EOS during the benchmark: both sides generate exactly `response` tokens.
    tok._eos_token_ids = set()
    rng = random.Random(0)
    prompts = [random_ids(s["prompt"], tok.vocab_size, rng) for _ in range(s["prompts"])]
    n = len(prompts)
    generate_batch(model, tok, prompts[:2], 4)  # warm-up
    mlx_lm.batch_generate(model, tok, prompts[:2], max_tokens=4)
    # Stop strings that random tokens never form: the watch runs on every token but never cuts.
    stops = ["\x00never\x00", "\x01stop\x01"]
    results = {}
    for name, fn in (
        (
            "batch_generate",
            lambda: mlx_lm.batch_generate(
                model, tok, prompts, max_tokens=s["response"], completion_batch_size=n, prefill_batch_size=8
            ),
        ),
        ("engine", lambda: generate_batch(model, tok, prompts, s["response"], stop_strings=stops, batch_size=n)),
    ):
        runs = [measured(fn) for _ in range(2)]  # the faster of two: this machine is shared
        results[name] = (min(r[0] for r in runs), max(r[1] for r in runs), runs[-1][2])
    (t_peer, m_peer, peer), (t_ours, m_ours, gens) = results["batch_generate"], results["engine"]
    tokens = sum(len(g.tokens) for g in gens)
    assert tokens == n * s["response"] and len(peer.texts) == n, tokens
    print(
        f"[{size}] {parameters(model) / 1e6:.1f}M params, {n} prompts of {s['prompt']} tokens, "
        f"{s['response']} new tokens each"
    )
    print(f"  mlx_lm.batch_generate : {t_peer:7.2f} s ({tokens / t_peer:8.1f} tok/s), peak {m_peer / 2**20:7.1f} MiB")
    print(f"  engine rollouts       : {t_ours:7.2f} s ({tokens / t_ours:8.1f} tok/s), peak {m_ours / 2**20:7.1f} MiB")
    print(f"  speed ratio {t_peer / t_ours:.2f}x, memory ratio {m_ours / max(m_peer, 1):.2f}")
    return {"ratio": t_peer / t_ours, "peak_memory_ratio": m_ours / max(m_peer, 1)}


def main() -> None:
    main_by_size("rollouts_vs_batch_generate", run, __doc__)


if __name__ == "__main__":
    main()
